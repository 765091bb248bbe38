"""The run's worker processes: start one from its spec, stop them all, publish their pids.

Every worker starts in pipeline/worker/boot.py: spawned (multiprocessing, `spawn` method) or, for a
backend whose infer workers run under another interpreter (`Backend.worker_python`, the sim
backend's TPU-MLIR Python 3.10), as a plain subprocess `python -m pipeline.worker.boot SPEC`
(`ForeignProcess`, with the methods of a multiprocessing.Process the pool uses).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pipeline.config import Config
from pipeline.data.rundir import RunDir
from pipeline.worker.boot import boot
from pipeline.worker.loop import CHECKOUT, Slot, subprocess_environ, worker_environment
from pipeline.worker.spec import WorkerSpec


@dataclass
class Worker:
    """One worker slot of the run: its spec, its shared Slot, the live process, its history."""

    spec: WorkerSpec
    slot: Slot
    proc: Any = None
    restarts: int = 0
    ready: bool = False
    removed: bool = False
    started: float = 0.0
    streak: int = 0  # deaths since the worker last became ready (non-infer roles)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def index(self) -> int:
        return self.spec.index

    @property
    def device(self) -> str | None:
        return self.spec.device_name

    @property
    def alive(self) -> bool:
        """Started, not taken out of the run, not exited."""
        return not self.removed and self.proc is not None and self.proc.exitcode is None


class WorkerPool:
    """The processes of one run, by worker name, in the order they are started."""

    def __init__(self, cfg: Config, backend: Any, rundir: RunDir, root: str, specs: tuple[WorkerSpec, ...]):
        self.cfg, self.backend, self.rundir, self.root = cfg, backend, rundir, root
        self.workers: dict[str, Worker] = {s.name: Worker(s, Slot(self.slot_path(s.name, 0))) for s in specs}

    def __getitem__(self, name: str) -> Worker:
        return self.workers[name]

    def __iter__(self):
        return iter(list(self.workers.values()))

    def of_role(self, role: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.role == role]

    def slot_path(self, name: str, generation: int) -> str:
        return os.path.join(self.root, f"slot-{name}-{generation}")

    def spawn(self, w: Worker) -> None:
        """Start (or restart) `w`: a new slot per generation, the spec with that generation."""
        old, w.slot = w.slot, Slot(self.slot_path(w.name, w.restarts))
        if w.role == "source":
            w.slot.sent_upto = old.sent_upto  # the ledger's re-issue bound survives a source restart
        w.spec = replace(w.spec, generation=w.restarts)
        python = self.backend.worker_python(self.cfg) if w.role == "infer" else None
        if python:
            w.proc = ForeignProcess(python, w.spec, w.slot, os.path.join(self.root, f"spec-{w.name}"))
        else:
            ctx = mp.get_context("spawn")
            # pipeline.worker.boot.boot: a light target whose argument is plain bytes, so the child asks for
            # the parent-death signal before importing anything heavy
            w.proc = ctx.Process(target=boot, args=(pickle.dumps((w.spec, w.slot), protocol=4),),
                                 name=f"clip-pipeline:{w.name}", daemon=True)
        env = self.backend.worker_env(self.cfg, w.device) if w.role == "infer" else {}
        with worker_environment(env):
            w.proc.start()
        w.started = time.monotonic()
        w.ready = w.role == "source"
        self.publish_pids()

    def publish_pids(self) -> None:
        """OUT/.workers.json: worker name -> pid of the live process (for operators and the fault
        tests, which kill -9 a named worker). Rewritten atomically on every spawn; removed at the end."""
        pids = {w.name: w.proc.pid for w in self.workers.values()
                if w.proc is not None and not w.removed and w.proc.pid is not None}
        try:
            self.rundir.write_workers(pids)
        except OSError:
            pass  # informational only: never fail a run over it

    def stop_all(self, hurry: Callable[[], bool] = lambda: False) -> None:
        """SIGTERM every live worker, wait up to 10 s in all (or until `hurry()`: a second
        SIGINT/SIGTERM), then SIGKILL what is left."""
        # a process whose start() failed (fork refused, ...) has no pid: nothing to stop, and
        # terminate() on it would raise over the error that is on its way out
        procs = [w.proc for w in self.workers.values() if w.proc is not None and w.proc.pid is not None]
        for p in procs:
            if p.exitcode is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in procs:
            while p.exitcode is None and not hurry() and time.monotonic() < deadline:
                p.join(0.1)  # a second SIGINT/SIGTERM kills what is left at once
            if p.exitcode is None:
                p.kill()
                p.join(2)

    def kill(self, w: Worker) -> None:
        w.proc.kill()
        w.proc.join(5)


class ForeignProcess:
    """A worker under another Python interpreter, with the multiprocessing.Process methods we use."""

    def __init__(self, python: str, spec: WorkerSpec, slot: Slot, spec_path: str):
        with open(spec_path, "wb") as fh:
            pickle.dump((spec, slot), fh, protocol=4)
        self.args = [python, "-m", "pipeline.worker.boot", spec_path]
        self.popen = None

    def start(self) -> None:
        # called inside worker_environment (WorkerPool.spawn), so os.environ already holds its variables
        self.popen = subprocess.Popen(self.args, env=subprocess_environ({}, foreign=True), cwd=CHECKOUT,
                                      stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def exitcode(self) -> int | None:
        code = self.popen.poll()
        return None if code is None else code

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
