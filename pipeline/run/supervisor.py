"""The supervisor: supervision of one run, and only that.

It starts the run (pipeline/run/start.py), starts the workers of the run plan (plan.py, pure)
through the pool (pool.py), runs the control loop, keeps the ledger, watches the workers and
applies the failure policy (policy.py, pure) to deaths and overdue workers, re-issues lost work,
and hands the end to finish.py. It runs in the main process and is the only one that draws
progress (telemetry.py makes the line). It never blocks on a child: the control socket is polled
with a timeout, process deaths are seen from exit codes, stalls from the shared slots.
See ARCHITECTURE.md for the full picture.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import zmq

from pipeline.backends import get_backend
from pipeline.config import Config
from pipeline.data import rundir
from pipeline.data.rundir import SYNTHETIC_NOTE, RunDir
from pipeline.run.finish import RunAborted, RunResult, finish_run, sync_with_disk
from pipeline.run.ledger import Ledger
from pipeline.run.plan import RunPlan, plan_run
from pipeline.run.policy import FailurePolicy
from pipeline.run.pool import Worker, WorkerPool
from pipeline.run.progress import Progress
from pipeline.run.signals import SignalGuard
from pipeline.run.start import OutputHold, RunStart
from pipeline.run.telemetry import PathNames, ProgressView, Telemetry
from pipeline.wire import messages, transport
from pipeline.wire.messages import Failure
from pipeline.worker.loop import EXIT_OK

# Called with (monotonic time, number of newly resolved inputs) on every `resolved` message from
# the sink, in the control loop (keep it cheap). `clip-pipeline bench` uses it to find the steady
# window of a run.
ResolvedHook = Callable[[float, int], None]


class Supervisor:
    """Process supervision of one run: starts the planned workers, watches and restarts them, runs
    the control loop. The output directory is a RunDir, the measurements are a Telemetry;
    `on_resolved` is the documented hook for observers (see ResolvedHook)."""

    def __init__(self, cfg: Config, *, out: str | os.PathLike | None = None, restart: bool = False,
                 progress: Progress | None = None, log: Callable[[str], None] | None = None,
                 on_resolved: ResolvedHook | None = None, id_range: tuple[int, int] | None = None,
                 listing: str | os.PathLike | None = None):
        """out: the directory the run writes into, cfg.output.dir (the configured output) unless
        given (an attempt or work directory: pipeline/run/attempt.py). id_range + listing: a
        cluster range run (pipeline/cluster/rangerun.py) embeds only the input ids [lo, hi) of a
        planned listing (read-only, ids and shard names stay global); lo is a multiple of
        output.shard_size."""
        self.cfg = cfg
        self.restart = restart
        self.out = Path(cfg.output.dir if out is None else out)
        self.rundir = RunDir(self.out)
        self.id_range = id_range
        self.listing_path = Path(listing) if listing is not None else self.rundir.listing
        self.progress = progress or Progress(cfg.run.progress, cfg.run.log_interval_s)
        self.log = log or self.progress.message
        self.on_resolved = on_resolved
        self.backend = get_backend(cfg.infer.backend)
        self.ledger = Ledger(cfg.output.shard_size,
                             first_shard=id_range[0] // cfg.output.shard_size if id_range else 0)
        self.telemetry = Telemetry()
        self.warnings: list[str] = []
        self.errors: list[dict] = []
        self.abort_reason: str | None = None
        # SIGINT/SIGTERM (signals.py); the CLI sets `signals.keep`: a signal after the manifest is
        # written changes nothing, the process is about to print its result and exit
        self.signals = SignalGuard()
        self.held: contextlib.ExitStack | None = None  # set by run(): holds the output's lock
        self.hold = OutputHold(self.out, "run-range" if id_range is not None else "run")
        self.outbox = transport.Outbox()
        self.reissue_pending: set[int] = set()
        self.dim: int | None = None  # embedding width, from the first device that gets ready
        self.path_of = PathNames(self.listing_path)  # input id -> path, for the few inputs named as stuck
        self.start: RunStart | None = None  # set by prepare(), with:
        self.devices: list[str] = []
        self.model: dict[str, Any] = {}
        self.resumed_count = 0  # inputs resolved by an earlier run
        self.ep: transport.Endpoints | None = None  # set by plan(), with the topology, pool and policy
        self.topology: RunPlan | None = None
        self.pool: WorkerPool | None = None
        self.policy: FailurePolicy | None = None
        self.view: ProgressView | None = None  # the progress line (telemetry.py)
        self.ctx = self.control = self.to_sink = self.to_first = None  # run(): zmq context and sockets

    # -- preparation ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Checks, model, output directory and resume state (pipeline/run/start.py)."""
        self.start = RunStart.prepare(self.cfg, self.backend, self.rundir, self.ledger, restart=self.restart,
                                      log=self.log, listing_path=self.listing_path, id_range=self.id_range,
                                      after_checks=self.lock_output)
        self.cfg, self.devices, self.model = self.start.cfg, self.start.devices, self.start.model
        self.warnings = self.start.warnings
        self.resumed_count = self.ledger.embedded + self.ledger.failed

    def lock_output(self) -> None:
        if self.held is not None:  # a run (not a test driving prepare() alone) holds OUT's lock
            self.hold.take(self.held)

    def write_manifest(self, status: str, extra: dict | None = None) -> None:
        self.start.write_manifest(status, self.ledger, extra)

    # -- processes ------------------------------------------------------------------------------
    def plan(self) -> None:
        """The topology (pipeline/run/plan.py), its worker pool and the failure policy."""
        files_mode = self.backend.input_kind(self.cfg) == "files"
        self.ep = transport.Endpoints.create()
        self.topology = plan_run(self.cfg, self.devices, self.ep, files_mode=files_mode,
                                 tail_pieces=self.backend.tail_pieces(self.cfg), out_dir=str(self.out),
                                 listing_path=str(self.listing_path),
                                 done_shards=tuple(self.start.done_shards), listing_complete=self.start.listing_complete,
                                 id_range=self.id_range)
        self.pool = WorkerPool(self.cfg, self.backend, self.rundir, self.ep.root, self.topology.specs)
        self.policy = FailurePolicy(self.cfg, files_mode)
        self.telemetry.set_topology(self.topology.roles(), list(self.topology.stage_order), self.topology.capacity)
        self.view = ProgressView(self.telemetry, self.ledger, self.pool, self.cfg, self.path_of,
                                 id_range=self.id_range, resumed=self.resumed_count)

    @property
    def workers(self) -> dict[str, Worker]:
        return self.pool.workers

    def source(self) -> Worker:
        return self.pool["source-0"]

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        with contextlib.ExitStack() as self.held:  # the output's lock, taken by prepare(), freed at the end
            return self._run()

    def _run(self) -> RunResult:
        """The run, with SIGINT/SIGTERM handled from the first check to the last manifest write
        (signals.py: a signal before the workers start stops at once, after it stops the run in
        order); the previous handlers come back only after finish."""
        t_start = time.monotonic()
        with self.signals:
            self.prepare()
            self.plan()
            self.ctx = zmq.Context()
            topo = self.topology
            self.control = transport.pull(self.ctx, topo.control_addr, hwm=100000)
            self.to_sink = transport.push(self.ctx, [topo.sink_addr], hwm=100000)
            self.to_first = transport.push(self.ctx, list(topo.first_stage_addrs), hwm=topo.first_stage_hwm)
            self.signals.start()
            if self.model.get("synthetic"):
                self.log(f"Note: model {self.model.get('path') or self.cfg.infer.backend} has {SYNTHETIC_NOTE}.")
            self.telemetry.start(time.monotonic())
            try:
                for w in self.pool:
                    self.pool.spawn(w)
                self.loop()
            except RunAborted as exc:
                self.abort_reason = str(exc)
            finally:
                self.pool.stop_all(hurry=lambda: self.signals.hurry)
                self.drain_stats()
                self.rundir.remove_workers()
                for sock in (self.control, self.to_sink, self.to_first):
                    sock.close(0)
                self.ctx.term()
                self.ep.cleanup()
            return finish_run(self, time.monotonic() - t_start)

    def loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        total_sent = False
        self.telemetry.begin_loop(time.monotonic())
        last_tick = 0.0
        while True:
            if self.signals.signum is not None:
                return
            for _ in range(1000):
                if not poller.poll(0 if _ else 100):
                    break
                header, _frames = transport.recv(self.control)
                self.on_control(header)
            if self.ledger.listing_done and not total_sent:
                self.queue_to_sink(messages.total(self.ledger.listed))
                total_sent = True
            self.check_workers()
            self.pump_outbox()
            now = time.monotonic()
            if now - last_tick >= 0.5:
                last_tick = now
                self.view.tick(now, self.progress)
                if self.hold.gone():
                    raise RunAborted(self.hold.reason)
            if self.ledger.complete():
                return
            if self.abort_reason:
                raise RunAborted(self.abort_reason)

    def on_control(self, h: dict) -> None:
        t = h.get("t")
        if t == "stats":
            self.telemetry.on_stats(h["worker"], h["stats"])
        elif t == "ready":
            w = self.workers.get(h["worker"])
            if w is not None:
                w.ready = True
                w.streak = 0
                if w.role == "infer":
                    self.telemetry.on_device_ready(time.monotonic())
            dim = (h.get("info") or {}).get("dim")
            if dim and self.dim is None:
                self.dim = int(dim)
                self.queue_to_sink(messages.dim(self.dim))
        elif t == "resolved":
            now = time.monotonic()
            self.telemetry.on_result(now)
            self.ledger.on_resolved(h["ids"], h["embedded"], h["failed"])
            if self.on_resolved is not None:
                self.on_resolved(now, len(h["ids"]))
        elif t == "shard":
            self.ledger.on_shard_written(h["k"], h["rows"], h["failed"])
        elif t == "listed":
            self.ledger.listed = max(self.ledger.listed, h["n"])
            if h.get("done"):
                self.ledger.listing_done = True
        elif t == "warning":
            if len(self.warnings) < 1000:
                self.warnings.append(h["message"])
            self.log(f"warning: {h['message']}")
        elif t == "error":
            self.errors.append({k: h.get(k) for k in ("kind", "worker", "exc_type", "message", "ids", "traceback")})
            if h["kind"] == "fatal":
                self.abort_reason = h["message"]
            else:
                where = f" (items {h['ids'][:8]})" if h.get("ids") else ""
                self.log(f"{h['worker']}: {h['kind']} error: {h['exc_type']}: {h['message']}{where}")

    def queue_to_sink(self, header: dict) -> None:
        self.outbox.put(self.to_sink, header)

    def pump_outbox(self) -> None:
        if self.outbox.pump() and self.reissue_pending:
            self.send_reissues()

    def send_reissues(self) -> None:
        paths = rundir.listing_paths(self.listing_path, self.reissue_pending)
        self.reissue_pending.clear()
        for i in sorted(paths):
            self.outbox.put(self.to_first, messages.item(i, paths[i], suspect=bool(self.ledger.crash_counts.get(i))))

    # -- failures of workers -----------------------------------------------------------------
    def check_workers(self) -> None:
        if self.signals.signum is not None:
            return  # a group-wide SIGINT/SIGTERM also stops the workers: that is not a death
        now = time.monotonic()
        for w in self.pool:
            if w.removed or w.proc is None:
                continue
            code = w.proc.exitcode
            if code is None:
                self.check_live(w, now)
            elif w.role == "source" and code == EXIT_OK:
                w.proc = None  # listing done; it was stopped by nobody: fine
            else:
                self.on_death(w, f"exit code {code}")

    def check_live(self, w: Worker, now: float) -> None:
        """A running worker over one of its limits (FailurePolicy.overdue) is killed and handled as a death."""
        o = self.policy.overdue(w, now)
        if o is None:
            return
        if o.kind == "start":
            raise RunAborted(f"{w.name} did not start within run.start_timeout_s={self.cfg.run.start_timeout_s:g}s")
        if o.kind == "input":
            self.log(f"{w.name}: input #{o.item} {self.path_of(o.item)} {o.message}; failing it as timeout and "
                     "restarting the worker.")
            self.ledger.failed_here[o.item] = Failure(o.item, b"", "timeout", f"reading and decoding {o.message}",
                                                      "decode")
        else:
            self.log(f"{w.name} {o.message}; killing and restarting it.")
        self.pool.kill(w)
        self.on_death(w, "timed out on one input" if o.kind == "input" else "stalled", blame=o.kind != "input")

    def on_death(self, w: Worker, why: str, blame: bool = True) -> None:
        """A worker died: the failure policy (pipeline/run/policy.py) says what follows; the
        supervisor fails what it blames, restarts or removes the worker, and re-issues lost work."""
        code = w.proc.exitcode if w.proc is not None else None
        left = sum(1 for x in self.pool.of_role("infer") if not x.removed and x is not w)
        v = self.policy.on_death(w, code, w.slot.current_ids(), why, self.ledger, blame=blame, devices_left=left,
                                 last_error=self.errors[-1]["message"] if self.errors else None,
                                 fatal=self.abort_reason)
        if v.abort and not v.remove:
            raise RunAborted(v.abort)  # a fatal error, or a broken stage
        self.log(f"{w.name} died ({why}); restarting it and re-issuing its work.")
        for i in v.crashed:
            self.ledger.failed_here[i] = Failure(i, b"", "crashed_worker",
                                                 f"{w.role} worker died twice while processing this input", w.role)
        if w.role == "sink":
            self.ledger.lost_sink()
            sync_with_disk(self.rundir, self.ledger, resumed=True)  # shards whose "shard" messages died with it
        if v.remove:
            w.removed, w.proc = True, None
            if v.note:
                self.log(v.note)
            if v.abort:
                raise RunAborted(v.abort)
        else:
            if w.role == "source":
                w.spec = replace(w.spec, start_at=self.source().slot.sent_upto)
            self.pool.spawn(w)
        self.after_loss(w.role == "sink")

    def after_loss(self, sink_lost: bool) -> None:
        """Re-issue every sent id that is not resolved, written or failed; resend lost sink state."""
        if sink_lost:
            if self.ledger.listing_done:
                self.queue_to_sink(messages.total(self.ledger.listed))
            if self.dim is not None:
                self.queue_to_sink(messages.dim(self.dim))
        paths = rundir.listing_paths(self.listing_path, self.ledger.failed_here)
        for i, failure in sorted(self.ledger.failed_here.items()):
            self.queue_to_sink(replace(failure, path=paths.get(i, b"")).header())
        sent = self.source().slot.sent_upto
        self.reissue_pending.update(self.ledger.to_reissue(sent))

    # -- progress and the end ------------------------------------------------------------------
    def drain_stats(self) -> None:
        """Take the final stats the stopped workers sent on their way out (for report.json)."""
        try:
            while self.control.poll(0):
                header, _frames = transport.recv(self.control, zmq.NOBLOCK)
                if header.get("t") == "stats":
                    self.telemetry.on_stats(header["worker"], header["stats"])
        except zmq.ZMQError:
            pass


def run(cfg: Config, *, restart: bool = False, progress: Progress | None = None) -> RunResult:
    return Supervisor(cfg, restart=restart, progress=progress).run()
