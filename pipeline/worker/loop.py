"""The one generic process loop every stage worker runs (spawned by the supervisor).

A stage supplies a *core* (stages/*.py, contract: stages/base.py StageCore): `setup()`,
`handle(header, frames) -> outputs`, `flush(now) -> outputs`, `deadline()`, `close()`. This loop owns everything else: sockets,
poll timeouts, backpressure, stats, the shared slot the supervisor reads for crash attribution
and stall detection, signals, and reporting exceptions with the worker and item named.

Outputs are (target, header, buffers) with target "next" (the next stage), "sink" or "control".
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

import zmq

from pipeline.backends.base import DeviceError
from pipeline.wire import messages, transport
from pipeline.wire.dispatch import CreditReturner, CreditSender, window_for
from pipeline.worker.pdeath import PARENT_ENV, set_parent_death_signal
from pipeline.worker.spec import WorkerSpec
from stages.base import FatalError, Output, StageCore

MAX_SLOT_IDS = 1024
STATS_INTERVAL_S = 0.5
SEND_TIMEOUT_MS = 200

# Exit codes of workers (the supervisor reads them).
EXIT_OK = 0
EXIT_CRASH = 70  # unexpected exception in the stage core
EXIT_DEVICE = 71  # the device failed (DeviceError)
EXIT_SETUP = 72  # setup failed (model load, device open)
EXIT_FATAL = 73  # the run cannot continue (e.g. output disk full)

class Slot:
    """Shared memory between one worker slot and the supervisor (no locks: single writer).

    A small file-backed mmap (in the run's private temp dir), so it also works for workers that
    run under another interpreter (the TPU-MLIR simulator device runs under Python 3.10).
    floats: [busy_since (monotonic, 0 = idle), last_beat, pid, sent_upto, item_id, item_since]
            item_*: the one input a decoder is reading right now (per-input deadline, progress)
    ids:    [n, id0, id1, ...] the ids inside the current unit of work
    """

    NFLOATS = 6
    SIZE = 8 * (NFLOATS + 1 + MAX_SLOT_IDS)

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            with open(path, "wb") as fh:
                fh.write(b"\0" * self.SIZE)
        self._map()

    def _map(self) -> None:
        import mmap

        import numpy as np

        with open(self.path, "r+b") as fh:
            self._mm = mmap.mmap(fh.fileno(), self.SIZE)
        self.floats = np.ndarray((self.NFLOATS,), dtype=np.float64, buffer=self._mm, offset=0)
        self.ids = np.ndarray((MAX_SLOT_IDS + 1,), dtype=np.int64, buffer=self._mm, offset=8 * self.NFLOATS)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._map()

    def begin(self, ids: Iterable[int]) -> None:
        ids = list(ids)[:MAX_SLOT_IDS]
        self.ids[1:len(ids) + 1] = ids
        self.ids[0] = len(ids)
        self.floats[0] = time.monotonic()

    def end(self) -> None:
        self.floats[0] = 0.0
        self.ids[0] = 0

    def begin_item(self, item_id: int) -> None:
        self.floats[4] = float(item_id)
        self.floats[5] = time.monotonic()

    def end_item(self) -> None:
        self.floats[5] = 0.0

    def current_item(self) -> tuple[int, float] | None:
        """(id, since) of the one input being read right now, or None."""
        since = float(self.floats[5])
        return (int(self.floats[4]), since) if since else None

    def current_ids(self) -> list[int]:
        n = int(self.ids[0])
        return [int(i) for i in self.ids[1:n + 1]]

    @property
    def busy_since(self) -> float:
        return float(self.floats[0])

    @property
    def sent_upto(self) -> int:
        return int(self.floats[3])

    @sent_upto.setter
    def sent_upto(self, value: int) -> None:
        self.floats[3] = float(value)


# Environment of spawned workers: one process per core is the design, so libraries must not add
# thread pools of their own (an idle OpenBLAS pool spin-waits: on a loaded 2-core host it tripled
# the fake device's CPU time). Only set where the user has not chosen a value.
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


#: the checkout these modules come from: a worker started as `python -m ...` imports it from here
CHECKOUT = str(Path(__file__).resolve().parents[2])


def worker_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ as a worker inherits it: WORKER_ENV where the user has not chosen a value, `extra`
    (the backend's per-worker variables, Backend.worker_env: always set) and this process's pid as
    the worker's supervisor (a worker whose parent is another has lost it: pdeath.orphaned)."""
    env = dict(os.environ)
    for k, v in WORKER_ENV.items():
        env.setdefault(k, v)
    env.update(extra or {})
    env[PARENT_ENV] = str(os.getpid())
    return env


def subprocess_environ(extra: dict[str, str] | None = None, *, foreign: bool) -> dict[str, str]:
    """worker_environ for a worker started as `python -m ...` of this checkout (not through
    multiprocessing): under another interpreter (`foreign`) only the checkout on its path and no
    PYTHONHOME (that interpreter's own site-packages hold the device library); under this one, the
    checkout ahead of the user's PYTHONPATH."""
    env = worker_environ(extra)
    if foreign:
        env["PYTHONPATH"] = CHECKOUT
        env.pop("PYTHONHOME", None)
    else:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT, env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def worker_environment(extra: dict[str, str] | None = None):
    """Around Process.start() (multiprocessing children inherit os.environ): os.environ becomes
    worker_environ(extra), and every variable it changed gets its value back afterwards."""
    env = worker_environ(extra)
    saved = {k: os.environ.get(k) for k, v in env.items() if os.environ.get(k) != v}
    os.environ.update({k: env[k] for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Stop(Exception):
    pass


class Loop:
    """Sockets and bookkeeping of one worker process."""

    def __init__(self, spec: WorkerSpec, slot: Slot):
        self.spec = spec
        self.slot = slot
        self.stopping = False
        self.core: StageCore | None = None  # set once made (the orphan watchdog asks it about device calls)
        self.parent = int(os.environ.get(PARENT_ENV) or os.getppid())
        self.ctx = zmq.Context()
        self.control = transport.push(self.ctx, [spec.control_addr], hwm=10000, linger_ms=1000)
        self.next = None
        # A sender into the infer stage with credit dispatch (pipeline/wire/dispatch.py): one PUSH
        # per device, and a PULL where the devices return credits.
        self.credited: CreditSender | None = None
        if spec.next_addrs and spec.credit_addr:
            self.credited = CreditSender(self.ctx, spec.next_addrs, spec.out_hwm, spec.credit_addr, spec.index,
                                         spec.generation)
        elif spec.next_addrs:
            self.next = transport.push(self.ctx, spec.next_addrs, spec.out_hwm)
        # An infer process with credit-dispatching senders returns credits (started once its device
        # is ready: start_credits)
        self.returner: CreditReturner | None = None
        self.sink = transport.push(self.ctx, [spec.sink_addr], spec.sink_hwm) if spec.sends_to_sink else None
        self.stats: dict[str, float] = {"in": 0, "out": 0, "sink_out": 0, "busy_s": 0.0, "blocked_s": 0.0,
                                        "idle_s": 0.0}
        self.last_stats = 0.0
        # SIGTERM writes a byte here (signal.set_wakeup_fd and on_term); the stage loop polls it, so a
        # stop is seen at once instead of at the end of the current poll (up to STATS_INTERVAL_S:
        # ~0.5 s of every run's shutdown)
        self.stop_r, self.stop_w = os.pipe()
        os.set_blocking(self.stop_w, False)

    def request_stop(self) -> None:
        self.stopping = True
        try:
            os.write(self.stop_w, b"x")
        except OSError:  # full (a wake-up is pending anyway)
            pass

    # -- sending with backpressure but without going deaf to signals or a dead parent --------
    def send(self, target: str, header: dict, buffers: tuple = ()) -> None:
        # Every send is non-blocking with a poll between tries: a blocking send to a peer that is
        # gone (ZMQ_IMMEDIATE: no peer = no pipe) would never return, and the worker would
        # outlive the supervisor (issue #12: orphans blocked in report_stats).
        if target == "next" and self.credited is not None:
            t0 = time.monotonic()
            self.credited.send(header, buffers, self.check_alive)
            self.stats["blocked_s"] += time.monotonic() - t0
            self.stats["out"] += 1
            return
        sock = {"control": self.control, "next": self.next}.get(target, self.sink)
        t0 = time.monotonic()
        while True:
            try:
                transport.send(sock, header, *buffers, flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                self.check_alive()
                sock.poll(SEND_TIMEOUT_MS, zmq.POLLOUT)
        if target == "control":
            return
        self.stats["blocked_s"] += time.monotonic() - t0
        self.stats["out" if target == "next" else "sink_out"] += 1  # queue fill (progress.queue_fill)
        if self.returner is not None and target == "sink":
            self.returner.finished(header)
        if header.get("t") == "emb":
            now = time.monotonic()  # the dispatch tail (report.json "dispatch")
            self.stats["first_result_t"] = self.stats.get("first_result_t") or now
            self.stats["last_result_t"] = now

    def start_credits(self, addrs: tuple[str, ...], window: int) -> None:
        self.returner = CreditReturner(self.ctx, addrs, window, self.spec.index, self.spec.generation)

    def return_credits(self) -> None:
        if self.returner is not None:
            self.returner.return_credits()

    def emit(self, outputs: Iterable[Output] | None) -> None:
        for target, header, buffers in outputs or ():
            self.send(target, header, buffers)

    def check_alive(self) -> None:
        if self.stopping:
            raise _Stop()
        if os.getppid() != self.parent:  # the supervisor died: don't linger as an orphan
            raise _Stop()

    def report_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_stats >= STATS_INTERVAL_S:
            self.last_stats = now
            self.slot.floats[1] = now
            self.send("control", messages.stats(self.spec.name, self.spec.role, self.spec.index, self.stats))

    def error(self, kind: str, exc: BaseException, ids: list[int]) -> None:
        self.send("control", messages.error(kind, self.spec.name, self.spec.role, self.spec.index, ids[:64],
                                            type(exc).__name__, str(exc), traceback.format_exc()))

    def close(self) -> None:
        for s in (self.next, self.sink):
            if s is not None:
                s.close(0)
        for c in (self.credited, self.returner):
            if c is not None:
                c.close()
        self.control.close(1000)
        self.ctx.term()


# An orphan (the supervisor died) that has not left its loop this long after SIGTERM exits hard:
# nothing it holds can be written anywhere any more. A device call in flight is waited for (up to
# run.stall_timeout_s), so a device is never torn down under a running call.
ORPHAN_GRACE_S = 1.5

def _orphan_watchdog(loop: Loop, stall_s: float) -> None:
    import threading

    def run() -> None:
        t0 = time.monotonic()
        while True:
            time.sleep(0.05)
            waited = time.monotonic() - t0
            in_call = loop.core is not None and loop.core.in_device_call()
            if waited >= ORPHAN_GRACE_S and (not in_call or waited >= stall_s):
                os._exit(EXIT_OK)

    threading.Thread(target=run, daemon=True, name="orphan-watchdog").start()


def _install_signals(loop: Loop) -> None:
    # Ctrl-C reaches the whole process group: only the supervisor decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watchdog = []

    def on_term(signum, frame):  # noqa: ARG001
        loop.request_stop()
        if os.getppid() != loop.parent and not watchdog:  # parent death (PR_SET_PDEATHSIG)
            watchdog.append(True)
            _orphan_watchdog(loop, loop.spec.cfg.run.stall_timeout_s)

    signal.signal(signal.SIGTERM, on_term)
    # The signal may land on any thread (a device library's pool: OpenVINO's TBB workers), where it
    # interrupts no poll of ours; the C-level handler then writes to this fd, which the stage loop
    # polls, so the main thread wakes and runs on_term at once (not at its next 0.5 s poll timeout)
    signal.set_wakeup_fd(loop.stop_w, warn_on_full_buffer=False)
    set_parent_death_signal(signal.SIGTERM)  # already asked by pipeline.worker.boot; harmless again
    # The supervisor may have died before prctl took effect: then no signal will ever come.
    if os.getppid() != loop.parent:
        on_term(signal.SIGTERM, None)


def worker_main(spec: WorkerSpec, slot: Slot) -> None:
    """Entry point of every spawned stage worker."""
    loop = Loop(spec, slot)
    _install_signals(loop)
    slot.floats[2] = os.getpid()
    code = EXIT_OK
    try:
        code = spec.main(slot, loop, _run_core)
    except _Stop:
        code = EXIT_OK
    except FatalError as exc:
        loop.error("fatal", exc, slot.current_ids())
        code = EXIT_FATAL
    except Exception as exc:  # noqa: BLE001 - reported to the supervisor with context
        loop.error("crash", exc, slot.current_ids())
        code = EXIT_CRASH
    finally:
        try:
            # final stats only to a live supervisor: with it gone (SIGKILLed, e.g. with its Ray
            # worker) the control socket has no peer and the send would block this orphan forever
            if os.getppid() == loop.parent:
                loop.report_stats(force=True)
        except Exception:  # noqa: BLE001
            pass
        loop.close()
    # Out without the interpreter's teardown: everything this process owes the run is done (the core
    # closed, its files written through, the sockets flushed and closed by loop.close), and tearing
    # down a loaded device library (OpenVINO's or onnxruntime's thread pools, 350 MB of weights)
    # took 70-170 ms on the path of every run's end: stop_all waits for each worker's exit. What
    # the kernel frees at exit it frees as after any crash or kill -9 (tested: a worker killed
    # mid-run); on SOPHON hardware that path is SAIL's own and was not checked here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_core(spec: WorkerSpec, slot: Slot, loop: Loop) -> int:
    core = spec.make_core(slot)
    loop.core = core
    # The input is bound, and an infer process's window granted, *before* the setup (a model load:
    # ~0.4-1 s on a CPU, seconds on a chip): the senders' pushes (ZMQ_IMMEDIATE) connect now
    # instead of at their next reconnect try (ZeroMQ retries every 100 ms), and a sender fills this
    # device's window while the model loads: the messages wait in this socket, the decode worker
    # goes on decoding, and the first batches are ready when the device is. A device that fails
    # its setup dies with what it holds, which the supervisor re-issues as after any death.
    inp = transport.pull(loop.ctx, spec.in_addr, spec.in_hwm)
    addrs = spec.credit_returns()
    infer_batches = spec.cfg.queues.infer_batches
    if addrs:
        loop.start_credits(addrs, window_for(spec.cfg.model.batch_size, infer_batches, len(addrs)))
    try:
        core.setup()
    except FatalError:
        inp.close(0)
        raise
    except Exception as exc:  # noqa: BLE001
        inp.close(0)
        loop.error("setup", exc, [])
        return EXIT_SETUP
    loop.send("control", messages.ready(spec.name, spec.role, spec.index, os.getpid(), core.info))
    if addrs and core.info.get("batch_size"):  # a fixed-batch model's own batch (a bmodel's)
        loop.returner.set_window(window_for(int(core.info["batch_size"]), infer_batches, len(addrs)))
    poller = zmq.Poller()
    poller.register(inp, zmq.POLLIN)
    poller.register(loop.stop_r, zmq.POLLIN)  # readable after SIGTERM: check_alive stops the loop
    wake = core.wake_fd()
    if wake is not None:  # the core finishes work on a thread of its own: wake up to send its results
        poller.register(wake, zmq.POLLIN)
    per_item = spec.per_item  # one input per message (decode, preprocess): crashes are attributed to it
    try:
        while True:
            loop.check_alive()
            now = time.monotonic()
            deadline = core.deadline()
            timeout = STATS_INTERVAL_S if deadline is None else max(0.0, min(STATS_INTERVAL_S, deadline - now))
            t0 = time.monotonic()
            ready = dict(poller.poll(int(timeout * 1000)))
            loop.stats["idle_s"] += time.monotonic() - t0
            if ready.get(inp):
                header, frames = transport.recv(inp)
                loop.stats["in"] += len(header["ids"]) if "ids" in header and header["t"] != "emb" else 1
                if loop.returner is not None:
                    loop.returner.received(header)
                t0 = time.monotonic()
                if per_item:
                    slot.begin(header["ids"] if "ids" in header else [header["id"]])
                try:
                    outputs = list(core.handle(header, frames) or ())
                except DeviceError as exc:
                    slot.end()  # the device failed, not these items: don't blame them
                    loop.error("device", exc, [])
                    return EXIT_DEVICE
                if per_item:
                    slot.end()
                loop.stats["busy_s"] += time.monotonic() - t0
                loop.emit(outputs)
            t0 = time.monotonic()
            try:
                outputs = list(core.flush(time.monotonic()) or ())
            except DeviceError as exc:
                slot.end()
                loop.error("device", exc, [])
                return EXIT_DEVICE
            loop.stats["busy_s"] += time.monotonic() - t0
            loop.emit(outputs)
            own_busy = core.busy_s()
            if own_busy is not None:  # work done on a thread of the core's own (infer.overlap)
                loop.stats["busy_s"] = own_busy
            loop.return_credits()
            loop.report_stats()
    finally:
        try:
            core.close()
        finally:
            inp.close(0)


if __name__ == "__main__":
    # Entry for workers launched under another interpreter (see Backend.worker_python); the
    # supervisor uses `python -m pipeline.worker.boot SPEC.pickle`, which guards against orphans first.
    import pickle

    with open(sys.argv[1], "rb") as fh:
        worker_main(*pickle.load(fh))
