"""The supervisor: prepares the output, spawns every stage, keeps the ledger, ends the run.

It runs in the main process and is the only one that draws progress. It never blocks on a child:
the control socket is polled with a timeout, process deaths are seen from exit codes, stalls from
the shared slots. See ARCHITECTURE.md for the full picture.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq

from pipeline.backends import get_backend
from pipeline.config import Config
from pipeline.data import rundir
from pipeline.data.rundir import LOCK, SYNTHETIC_NOTE, RunDir, now_iso, output_lock, remove_temp_files
from pipeline.errors import RunFailure
from pipeline.model.models import ensure_model, resolve_image_size
from pipeline.run import preflight
from pipeline.run.ledger import Ledger
from pipeline.run.preflight import fingerprint
from pipeline.run.progress import Progress
from pipeline.run.telemetry import Telemetry
from pipeline.wire import messages, transport
from pipeline.wire.messages import Failure
from pipeline.worker.boot import boot
from pipeline.worker.loop import EXIT_DEVICE, EXIT_FATAL, EXIT_OK, Slot, WorkerSpec, worker_environment

# Exit codes of `clip-pipeline run` (documented in the README).
EXIT_SUCCESS = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_WITH_FAILURES = 3
EXIT_ABORTED = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143



class InterruptedBeforeStart(KeyboardInterrupt):
    """SIGINT/SIGTERM while the run was being prepared (checks, model build): no worker ran."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class RunAborted(RunFailure):
    """The run cannot go on (no device left, disk full, inputs changed...)."""


@dataclass
class RunResult:
    exit_code: int
    message: str
    counts: dict[str, int] = field(default_factory=dict)
    out_dir: str = ""


@dataclass
class Worker:
    role: str
    index: int
    device: str | None
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


# Called with (monotonic time, number of newly resolved inputs) on every `resolved` message from
# the sink, in the control loop (keep it cheap). `clip-pipeline bench` uses it to find the steady
# window of a run.
ResolvedHook = Callable[[float, int], None]


def grouped_hwm(cfg: Config, depth: int, grouped: bool) -> int:
    """Queue depths count images; a pipe of grouped messages holds depth / items_per_message of them."""
    if not grouped:
        return depth
    return max(1, -(-depth // cfg.workers.items_per_message))


class Supervisor:
    """Process supervision of one run: plans the workers, starts, watches and restarts them, runs
    the control loop and ends the run. The output directory is a RunDir, the measurements are a
    Telemetry; `on_resolved` is the documented hook for observers (see ResolvedHook)."""

    def __init__(self, cfg: Config, *, restart: bool = False, progress: Progress | None = None,
                 log: Callable[[str], None] | None = None, on_resolved: ResolvedHook | None = None,
                 id_range: tuple[int, int] | None = None, listing: str | os.PathLike | None = None):
        """id_range + listing: a cluster range run (pipeline/cluster/rangerun.py) embeds only the
        input ids [lo, hi) of a planned listing (read-only, ids and shard names stay global); lo is
        a multiple of output.shard_size."""
        self.cfg = cfg
        self.restart = restart
        self.out = Path(cfg.output.dir)
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
        self.workers: dict[str, Worker] = {}
        self.warnings: list[str] = []
        self.errors: list[dict] = []
        self.interrupted: int | None = None
        self.abort_reason: str | None = None
        self.hurry = False  # a second signal: stop the workers now (kill), not in order
        self.held: contextlib.ExitStack | None = None  # set by run(): holds the output's lock
        # the CLI keeps this run's handlers after it returns (a signal then changes nothing: the
        # manifest is written and the process is about to print its result and exit)
        self.keep_handlers = False
        self.out_ident: tuple[int, int] | None = None  # (dev, inode) of OUT/.lock while this run holds it
        self.outbox: list[tuple[zmq.Socket, dict]] = []
        self.reissue_pending: set[int] = set()
        self.dim: int | None = None  # embedding width, from the first device that gets ready
        self.paths_cache: dict[int, str] = {}  # input id -> path, for the few inputs named as stuck
        self.input_changes: preflight.InputChanges | None = None  # inputs added/removed since an existing run listed them
        # set by prepare()
        self.devices: list[str] = []
        self.model: dict[str, Any] = {}
        self.fp: dict[str, Any] = {}
        self.created = ""
        self.resumed = False
        self.listing_complete = False
        self.done_shards: list[int] = []
        self.resumed_count = 0  # inputs resolved by an earlier run
        # set by plan()
        self.ep: transport.Endpoints | None = None
        self.files_mode = False
        self.first_stage_addrs: tuple[str, ...] = ()
        self.first_stage_hwm = cfg.queues.decode
        self.control_addr = ""
        self.sink_addr = ""
        # set by run()
        self.ctx: zmq.Context | None = None
        self.control: zmq.Socket | None = None
        self.to_sink: zmq.Socket | None = None
        self.to_first: zmq.Socket | None = None

    # -- preparation ----------------------------------------------------------------------------
    def prepare(self) -> None:
        # every refusal comes from here, before a model is built (run --dry-run makes the same checks)
        pf = preflight.check(self.cfg, restart=self.restart)
        self.lock_output()
        self.cfg = pf.cfg  # with what the backend resolved once before start (openvino.precision)
        self.devices = pf.devices
        for w in pf.warnings:
            self.log(f"warning: {w}")
            self.warnings.append(w)
        self.input_changes = pf.changes
        if pf.changes:
            note = preflight.changes_note(pf.changes, pf.manifest.get("status") == "complete")
            self.log(f"warning: {note}")
            self.warnings.append(note)
        ensure_model(self.cfg, log=self.log)
        # the crop size every worker uses comes from the model (model.image_size = 0), resolved once here
        self.cfg = self.cfg.replace(model=replace(self.cfg.model, image_size=resolve_image_size(self.cfg)))
        self.model = pf.model or self.backend.model_identity(self.cfg)
        self.fp = fingerprint(self.cfg, self.model)
        self.prepare_output_dir()

    def prepare_output_dir(self) -> None:
        prior = self.rundir.prepare(self.fp, restart=self.restart, on_existing=self.cfg.output.on_existing,
                                    log=self.log,
                                    refusal=lambda old: preflight.fingerprint_refusal(self.out, old, self.fp))
        self.resumed = prior.resumed
        self.listing_complete = prior.listing_complete
        self.done_shards = prior.done_shards
        self.warnings += [f"shard {rundir.shard_name(k)} is damaged ({why}); redone" for k, why in prior.damaged.items()]
        if self.id_range is not None:
            self.listing_complete = True  # the planned listing, replayed
        for k in self.done_shards:
            rows, failed = self.rundir.shard_counts(k)
            self.ledger.on_shard_written(k, rows, failed, resumed=True)
        self.resumed_count = self.ledger.embedded + self.ledger.failed
        self.created = prior.manifest.get("created") if prior.manifest else now_iso()
        self.write_manifest("running")
        if self.resumed and self.done_shards:
            self.log(f"Resuming the run in {self.out}: {len(self.done_shards)} shards already complete.")

    def manifest(self, status: str, extra: dict | None = None) -> dict[str, Any]:
        """This run's manifest.json (built by RunDir.manifest_of, with any published updates)."""
        extra = dict(extra or {})
        if self.id_range is not None:
            extra["range"] = {"ids": list(self.id_range), "listing": str(self.listing_path)}
        led = self.ledger
        return self.rundir.manifest_of(
            status=status, created=self.created, fingerprint=self.fp, config=self.cfg.to_dict(),
            devices=self.devices, model=self.model, listed=led.listed,
            listing_complete=led.listing_done or self.listing_complete,
            counts={"embedded": led.embedded, "failed": led.failed, "total": led.total},
            shards=led.written, shard_size=self.cfg.output.shard_size, **extra)

    def write_manifest(self, status: str, extra: dict | None = None) -> None:
        self.rundir.write_manifest(self.manifest(status, extra))

    # -- processes ------------------------------------------------------------------------------
    def plan(self) -> None:
        """The whole topology, once: every worker's addresses, queue limits (both ends of each pipe
        use the same high-water mark) and role-specific fields, onto its WorkerSpec."""
        cfg = self.cfg
        self.ep = transport.Endpoints.create()
        files_mode = self.backend.input_kind(cfg) == "files"
        self.files_mode = files_mode
        infer_addrs = tuple(self.ep.stage("infer", i) for i in range(len(self.devices)))
        sink_addr, control_addr = self.ep.addr("sink"), self.ep.addr("control")
        chain: list[tuple[str, int]] = []
        if not files_mode:
            chain.append(("decode", cfg.workers.decode))
            if not cfg.workers.fuse_decode_preprocess:
                chain.append(("preprocess", cfg.workers.preprocess))
        stage_addrs = {role: tuple(self.ep.stage(role, i) for i in range(n)) for role, n in chain}
        stage_addrs["infer"] = infer_addrs
        order = [r for r, _ in chain] + ["infer"]
        first = order[0]
        self.first_stage_addrs = stage_addrs[first]
        depth = {"decode": cfg.queues.decode, "preprocess": cfg.queues.preprocess, "infer": cfg.queues.infer,
                 "sink": cfg.queues.sink}
        # Which pipes carry groups of inputs: the source's `items` into the first stage, and the
        # fused decoder's `pxs` into infer. Everything else is one input (or one batch) per message.
        grouped = {role: False for role in depth}
        grouped[first] = True
        if "decode" in order and cfg.workers.fuse_decode_preprocess:
            grouped["infer"] = True
        hwm = {role: grouped_hwm(cfg, depth[role], grouped[role]) for role in depth}
        # the supervisor re-issues single `item`s to the first stage: its depth, ungrouped
        self.first_stage_hwm = depth[first]
        # queue fill (progress line, report timeline): edges named by the stage they feed
        stage_order = ["source", *order, "sink"]
        receivers = {**{r: n for r, n in chain}, "infer": len(self.devices), "sink": 1}
        # Credit-based dispatch into the devices (pipeline/wire/dispatch.py): each sender into the
        # infer stage binds a credit endpoint; every infer process returns credits to all of them.
        feeder, n_feeders = (chain[-1] if chain else ("source", 1))
        credit = cfg.queues.dispatch == "credit"
        credit_addrs = tuple(self.ep.addr(f"credit-{feeder}-{i}") for i in range(n_feeders)) if credit else ()
        capacity = {r: depth[r] * receivers[r] for r in stage_order[1:]}
        if credit:
            capacity["infer"] = (1 + cfg.queues.infer_batches) * cfg.model.batch_size * len(self.devices)

        def add(role: str, index: int, in_addr: str | None, nxt_role: str | None, device: str | None = None,
                **fields: Any) -> None:
            spec = WorkerSpec(role=role, index=index, cfg=cfg, in_addr=in_addr,
                              next_addrs=stage_addrs[nxt_role] if nxt_role else (),
                              sink_addr=sink_addr, control_addr=control_addr, device=device,
                              in_hwm=hwm[role] if role in hwm else 0,
                              out_hwm=hwm[nxt_role] if nxt_role else 0, sink_hwm=cfg.queues.sink, **fields)
            self.workers[spec.name] = Worker(role, index, device, spec, Slot(self.slot_path(spec.name, 0)))

        add("sink", 0, sink_addr, None)
        for i, dev in enumerate(self.devices):
            add("infer", i, infer_addrs[i], None, device=dev, credit_addrs=credit_addrs)
        for pos, (role, n) in enumerate(chain):
            for i in range(n):
                add(role, i, stage_addrs[role][i], order[pos + 1],
                    **({"credit_addr": credit_addrs[i]} if credit and role == feeder else {}))
        add("source", 0, None, first, listing_path=str(self.listing_path), done_shards=tuple(self.done_shards),
            listing_complete=self.listing_complete,
            **({"credit_addr": credit_addrs[0]} if credit and feeder == "source" else {}),
            **({"range_lo": self.id_range[0], "range_hi": self.id_range[1]} if self.id_range else {}))
        self.control_addr, self.sink_addr = control_addr, sink_addr
        self.telemetry.set_topology({w.name: w.role for w in self.workers.values()}, stage_order, capacity)

    def slot_path(self, name: str, generation: int) -> str:
        return os.path.join(self.ep.root, f"slot-{name}-{generation}")

    def spawn(self, w: Worker) -> None:
        old, w.slot = w.slot, Slot(self.slot_path(w.name, w.restarts))
        if w.role == "source":
            w.slot.sent_upto = old.sent_upto  # the ledger's re-issue bound survives a source restart
        w.spec = replace(w.spec, generation=w.restarts)
        python = self.backend.worker_python(self.cfg) if w.role == "infer" else None
        if python:
            w.proc = ForeignProcess(python, w.spec, w.slot, os.path.join(self.ep.root, f"spec-{w.name}"))
        else:
            import pickle

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

    def source(self) -> Worker:
        return self.workers["source-0"]

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        with contextlib.ExitStack() as self.held:  # the output's lock, taken by prepare(), freed at the end
            return self._run()

    def lock_output(self) -> None:
        """Take the output directory's lock (after the read-only checks, which create nothing, and
        before anything is built or written): a second process on OUT stops here (exit 2)."""
        if self.held is None:
            return
        self.held.enter_context(output_lock(self.out, "run-range" if self.id_range is not None else "run"))
        st = os.stat(self.out / LOCK)
        self.out_ident = (st.st_dev, st.st_ino)

    def out_gone(self) -> bool:
        """Whether OUT was deleted or replaced under the run (`rm -rf OUT`): its lock file is not
        the one this run holds. Writing on would scatter the run's files into a new directory."""
        if self.out_ident is None:
            return False
        try:
            st = os.stat(self.out / LOCK)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.out_ident

    def gone_reason(self) -> str:
        return f"the output directory {self.out} was deleted or moved during the run"

    def _run(self) -> RunResult:
        """The run, with SIGINT/SIGTERM handled from the first check to the last manifest write: a
        signal before the workers start stops at once (InterruptedBeforeStart); after, the first
        one stops the run in order (shards kept, manifest "interrupted", the closing message) and a
        second only hurries the workers' stop. The previous handlers come back only after finish()."""
        t_start = time.monotonic()
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        started = False

        def on_signal(signum, frame):  # noqa: ARG001
            if self.interrupted is None:
                self.interrupted = signum
                if not started:
                    raise InterruptedBeforeStart(signum)
            else:
                self.hurry = True

        for s in old:
            signal.signal(s, on_signal)
        try:
            self.prepare()
            self.plan()
            self.ctx = zmq.Context()
            self.control = transport.pull(self.ctx, self.control_addr, hwm=100000)
            self.to_sink = transport.push(self.ctx, [self.sink_addr], hwm=100000)
            self.to_first = transport.push(self.ctx, list(self.first_stage_addrs), hwm=self.first_stage_hwm)
            started = True
            if self.interrupted is not None:  # came between the last check and `started`
                raise InterruptedBeforeStart(self.interrupted)
            if self.model.get("synthetic"):
                self.log(f"Note: model {self.model.get('path') or self.cfg.infer.backend} has {SYNTHETIC_NOTE}.")
            self.telemetry.start(time.monotonic())
            try:
                for w in self.workers.values():
                    self.spawn(w)
                self.loop()
            except RunAborted as exc:
                self.abort_reason = str(exc)
            finally:
                self.stop_all()
                self.drain_stats()
                self.rundir.remove_workers()
                for sock in (self.control, self.to_sink, self.to_first):
                    sock.close(0)
                self.ctx.term()
                self.ep.cleanup()
            return self.finish(time.monotonic() - t_start)
        finally:
            if not self.keep_handlers:
                for s, h in old.items():
                    signal.signal(s, h)

    def loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        total_sent = False
        self.telemetry.begin_loop(time.monotonic())
        last_tick = 0.0
        while True:
            if self.interrupted is not None:
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
                self.tick(now)
                if self.out_gone():
                    raise RunAborted(self.gone_reason())
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
        self.outbox.append((self.to_sink, header))

    def pump_outbox(self) -> None:
        keep = []
        for i, (sock, header) in enumerate(self.outbox):
            try:
                transport.send(sock, header, flags=zmq.NOBLOCK)
            except zmq.Again:
                keep = self.outbox[i:]
                break
        self.outbox = keep
        if self.reissue_pending and not keep:
            self.send_reissues()

    def send_reissues(self) -> None:
        paths = rundir.listing_paths(self.listing_path, self.reissue_pending)
        self.reissue_pending.clear()
        for i in sorted(paths):
            self.outbox.append((self.to_first, messages.item(i, paths[i], suspect=bool(self.ledger.crash_counts.get(i)))))

    # -- failures of workers -----------------------------------------------------------------
    def check_workers(self) -> None:
        if self.interrupted is not None:
            return  # a group-wide SIGINT/SIGTERM also stops the workers: that is not a death
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.removed or w.proc is None:
                continue
            code = w.proc.exitcode
            if code is None:
                busy = w.slot.busy_since
                item = w.slot.current_item() if w.role == "decode" else None
                limit = self.cfg.preprocess.decode_timeout_s
                if item and now - item[1] > limit:
                    i = item[0]
                    self.log(f"{w.name}: input #{i} {self.path_of(i)} took longer than preprocess.decode_timeout_s="
                             f"{limit:g}s; failing it as timeout and restarting the worker.")
                    self.ledger.failed_here[i] = Failure(
                        i, b"", "timeout", f"reading and decoding took longer than preprocess.decode_timeout_s={limit:g}s",
                        "decode")
                    w.proc.kill()
                    w.proc.join(5)
                    self.on_death(w, "timed out on one input", blame=False)
                elif busy and now - busy > self.cfg.run.stall_timeout_s:
                    self.log(f"{w.name} has been busy for {now - busy:.0f}s (run.stall_timeout_s="
                             f"{self.cfg.run.stall_timeout_s:g}); killing and restarting it.")
                    w.proc.kill()
                    w.proc.join(5)
                    self.on_death(w, "stalled")
                elif not w.ready and now - w.started > self.cfg.run.start_timeout_s:
                    raise RunAborted(f"{w.name} did not start within run.start_timeout_s={self.cfg.run.start_timeout_s:g}s")
                continue
            if w.role == "source" and code == EXIT_OK:
                w.proc = None  # listing done; it was stopped by nobody: fine
                continue
            self.on_death(w, f"exit code {code}")

    def on_death(self, w: Worker, why: str, blame: bool = True) -> None:
        code = w.proc.exitcode if w.proc is not None else None
        ids = w.slot.current_ids()
        if code == EXIT_FATAL:
            raise RunAborted(self.abort_reason or f"{w.name} stopped the run ({why})")
        self.log(f"{w.name} died ({why}); restarting it and re-issuing its work.")
        # Blame the inputs a worker held only where an input can kill it: decoders, and device
        # processes that decode files themselves. A pixel-mode device process sees only
        # 224x224 crops, so its deaths are the device's, not the items'.
        blame = blame and (w.role in ("decode", "preprocess") or (w.role == "infer" and self.files_mode))
        if ids and blame and code != EXIT_DEVICE:
            for i in self.ledger.record_crash(ids):
                self.ledger.failed_here[i] = Failure(i, b"", "crashed_worker",
                                                     f"{w.role} worker died twice while processing this input", w.role)
        if w.role == "sink":
            self.ledger.lost_sink()
            # The sink may have written shards whose "shard" messages died with it: the disk is
            # the truth (a restarted sink skips them too, so they must count as written here).
            for k in self.rundir.completed_shards():
                if k not in self.ledger.written:
                    rows, failed = self.rundir.shard_counts(k)
                    self.ledger.on_shard_written(k, rows, failed, resumed=True)
        w.restarts += 1
        w.streak += 1
        # A device is taken out after max_restarts deaths in the run; any other worker only when
        # it dies max_restarts+1 times in a row without getting ready (a broken setup): deaths
        # caused by inputs are bounded by the crashed_worker rule instead.
        limit_hit = (w.restarts if w.role == "infer" else w.streak) > self.cfg.run.max_restarts
        if limit_hit:
            w.removed = True
            w.proc = None
            if w.role == "infer":
                alive = [x for x in self.workers.values() if x.role == "infer" and not x.removed]
                self.log(f"device {w.device} failed {w.restarts} times; taking it out of the run "
                         f"({len(alive)} device(s) left).")
                if not alive:
                    last = self.errors[-1]["message"] if self.errors else why
                    raise RunAborted(f"every device failed (last error: {last}); see report.json for details")
            else:
                last = self.errors[-1]["message"] if self.errors else why
                raise RunAborted(f"{w.name} failed {w.restarts} times (last error: {last})")
        else:
            if w.role == "source":
                w.spec = replace(w.spec, start_at=self.source().slot.sent_upto)
            self.spawn(w)
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

    def stop_all(self) -> None:
        # a process whose start() failed (fork refused, ...) has no pid: nothing to stop, and
        # terminate() on it would raise over the error that is on its way out
        procs = [w.proc for w in self.workers.values() if w.proc is not None and w.proc.pid is not None]
        for p in procs:
            if p.exitcode is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in procs:
            while p.exitcode is None and not self.hurry and time.monotonic() < deadline:
                p.join(0.1)  # a second SIGINT/SIGTERM (self.hurry) kills what is left at once
            if p.exitcode is None:
                p.kill()
                p.join(2)

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

    def tick(self, now: float) -> None:
        led = self.ledger
        self.telemetry.tick(now, led)
        self.progress.update(led.embedded + led.failed, self.range_total() if led.listing_done else None, led.failed,
                             self.rate(), self.stage_line())

    def stage_line(self) -> str:
        if self.telemetry.ready_s is None and self.telemetry.t0 is not None:  # not "input-bound: infer 0%"
            devices = sum(1 for w in self.workers.values() if w.role == "infer" and not w.removed)
            return (f"starting: {devices} device(s) loading the model, "
                    f"{self.telemetry.elapsed():.0f}s so far")
        line = self.telemetry.stage_line()
        stuck = self.stuck_note(time.monotonic())
        return f"{line} | {stuck}" if stuck else line

    def stuck_note(self, now: float) -> str:
        """Workers stuck on one input (or one unit of work) for a while: named with the seconds and
        the path, so a hidden stall (a decoder blocked on a file) shows on the progress line."""
        notes = []
        item_after = min(5.0, self.cfg.preprocess.decode_timeout_s / 2)
        for w in self.workers.values():
            if w.removed or w.proc is None or w.proc.exitcode is not None:
                continue
            item = w.slot.current_item() if w.role == "decode" else None
            if item and now - item[1] >= item_after:
                notes.append(f"{w.name} stuck {now - item[1]:.0f}s on {self.path_of(item[0])}")
                continue
            busy = w.slot.busy_since
            if not item and busy and now - busy >= max(30.0, self.cfg.run.stall_timeout_s / 10):
                ids = w.slot.current_ids()
                what = self.path_of(ids[0]) if len(ids) == 1 else f"{len(ids)} inputs"
                notes.append(f"{w.name} busy {now - busy:.0f}s on {what}")
        return "; ".join(notes)

    def path_of(self, i: int) -> str:
        """An input's path, from the listing (cached: only asked for the few stuck inputs)."""
        if i not in self.paths_cache:
            try:
                self.paths_cache[i] = os.fsdecode(rundir.listing_paths(self.listing_path, [i]).get(i, b"?"))
            except OSError:
                self.paths_cache[i] = f"input #{i}"
        return self.paths_cache[i]

    def rate(self) -> float:
        return self.telemetry.rate(self.ledger.embedded + self.ledger.failed - self.resumed_count)

    def range_total(self) -> int | None:
        """The number of inputs this run covers (a cluster range run covers ids [lo, hi) only)."""
        t = self.ledger.total
        return t - self.id_range[0] if t is not None and self.id_range else t

    def finish(self, wall: float) -> RunResult:
        led = self.ledger
        counts = {"embedded": led.embedded, "failed": led.failed, "total": self.range_total() or led.listed}
        done = led.embedded + led.failed
        # the last line sums up the whole run (the last interval is mostly shutdown)
        line = self.telemetry.final_line(led)
        self.progress.close(done, self.range_total(), led.failed, self.rate(), line)
        ending_early = self.interrupted is not None or bool(self.abort_reason) or not led.complete()
        if self.out_gone():  # nothing to keep, and nothing must be written into a stranger's directory
            return RunResult(EXIT_ABORTED, f"Run aborted: {self.gone_reason()}; nothing more was written. Run the "
                             "same command again to start over.", counts, str(self.out))
        if ending_early:
            # every worker is stopped and this process holds the lock: what a killed writer left
            # half-written (.part-*.tmp) goes now, not at the next start
            self.best_effort(remove_temp_files, self.out)
            self.sync_with_disk()
        report = self.report(wall)
        self.best_effort(self.rundir.write_report, report)
        if self.interrupted is not None:
            name = "SIGINT" if self.interrupted == signal.SIGINT else "SIGTERM"
            self.best_effort(self.write_manifest, "interrupted")
            msg = (f"Interrupted by {name}: {self.on_disk()} in {self.out}. "
                   "Run the same command again to resume (the rest is redone).")
            return RunResult(EXIT_SIGINT if self.interrupted == signal.SIGINT else EXIT_SIGTERM, msg, counts, str(self.out))
        if ending_early:
            reason = (self.abort_reason or "the run ended before every input was resolved").rstrip(". ")
            self.best_effort(self.write_manifest, "failed", {"error": reason})
            return RunResult(EXIT_ABORTED, f"Run aborted: {reason}. Kept: {self.on_disk()} in {self.out}; "
                             "fix the cause and run the same command again to resume.", counts, str(self.out))
        o = self.cfg.output
        try:
            manifest = self.manifest("complete")
            n_fail = self.rundir.publish(manifest, metadata=o.metadata, layout=o.layout, pickle=o.pickle)
        except OSError as exc:  # the disk filled up, or OUT was deleted, at the very end: exit 4 as mid-run
            reason = output_failure(self.out, exc)
            self.best_effort(self.write_manifest, "failed", {"error": reason})
            return RunResult(EXIT_ABORTED, f"Run aborted: {reason}. Kept: {self.on_disk()} in {self.out}; "
                             "fix the cause and run the same command again to resume.", counts, str(self.out))
        if manifest.get("updates"):  # inputs added by run --update count too (RunDir.manifest_of)
            counts = dict(manifest["counts"])
        synthetic = f" ({SYNTHETIC_NOTE})" if self.model.get("synthetic") else ""
        earlier = (f"; {self.resumed_count} of the inputs were done by an earlier run of this output, "
                   f"{led.embedded + led.failed - self.resumed_count} by this one") if self.resumed_count else ""
        msg = (f"Embedded {counts['embedded']} of {counts['total']} images in {wall:.1f}s into {self.out}{synthetic}"
               f"{earlier}.")
        if self.input_changes:
            msg += " Note: " + preflight.changes_note(self.input_changes, True) + "."
        if n_fail:
            msg += f" Completed with {n_fail} failure{'s' if n_fail != 1 else ''}: see {self.rundir.failures}."
            return RunResult(EXIT_WITH_FAILURES, msg, counts, str(self.out))
        return RunResult(EXIT_SUCCESS, msg, counts, str(self.out))

    def sync_with_disk(self) -> None:
        """After the workers stopped: a shard the sink wrote while being stopped is on disk even if
        its "shard" message never reached the supervisor; count what is on disk (issue #12: "6
        shard(s) complete" while the 7th appeared on disk right afterwards)."""
        for k in self.rundir.completed_shards():
            if k not in self.ledger.written:
                try:
                    rows, failed = self.rundir.shard_counts(k)
                except (OSError, ValueError):
                    continue
                self.ledger.on_shard_written(k, rows, failed)

    def on_disk(self) -> str:
        """What an interrupted or aborted run leaves: complete shards and the inputs they hold."""
        led = self.ledger
        total = self.range_total()
        of = f"{total}" if total is not None else f"{led.listed} listed so far"
        return (f"{len(led.written)} complete shard(s) on disk holding {led.written_rows + led.written_failed} of "
                f"{of} inputs ({led.written_rows} embedded, {led.written_failed} failed)")

    def best_effort(self, fn: Callable, *args: Any) -> None:
        """Write run metadata when the run is ending badly anyway (e.g. the disk is full): a
        failure here must not hide the real error. Shards never depend on these files."""
        try:
            fn(*args)
        except OSError as exc:
            self.log(f"warning: could not update {self.out}: {exc.strerror or exc}")

    def dispatch_summary(self) -> dict:
        """How the work was spread over the devices: images per device (this run's last process of
        each) and the tail, from the first device's last result to the last one's (a device idle
        while another still works: the cost of uneven dispatch at the end of a run)."""
        per_device, last = {}, []
        for w in self.workers.values():
            if w.role != "infer":
                continue
            st = self.telemetry.stats.get(w.name, {})
            per_device[str(w.device)] = int(st.get("in", 0))
            if st.get("last_result_t"):
                last.append(float(st["last_result_t"]))
        q = self.cfg.queues
        return {"mode": q.dispatch, "window_batches": 1 + q.infer_batches if q.dispatch == "credit" else None,
                "images_per_device": per_device,
                "tail_s": round(max(last) - min(last), 3) if len(last) > 1 else 0.0}

    def report(self, wall: float) -> dict:
        reasons = self.rundir.failures_by_reason(self.ledger.written)
        return self.telemetry.report(wall, self.ledger, self.resumed_count, reasons, {
            "dispatch": self.dispatch_summary(),
            "model": self.model,
            "devices": self.devices,
            "backend": self.cfg.infer.backend,
            "restarts": {w.name: w.restarts for w in self.workers.values() if w.restarts},
            "removed_devices": [w.device for w in self.workers.values() if w.removed and w.role == "infer"],
            "errors": self.errors[-50:],
            "warnings": self.warnings[:200],
            "synthetic_weights": bool(self.model.get("synthetic")),
        })


class ForeignProcess:
    """A worker under another Python interpreter, with the multiprocessing.Process methods we use."""

    def __init__(self, python: str, spec: WorkerSpec, slot: Slot, spec_path: str):
        with open(spec_path, "wb") as fh:
            pickle.dump((spec, slot), fh, protocol=4)
        self.args = [python, "-m", "pipeline.worker.boot", spec_path]
        self.popen = None

    def start(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = root
        env.pop("PYTHONHOME", None)
        self.popen = subprocess.Popen(self.args, env=env, cwd=root, stdin=subprocess.DEVNULL)

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


def output_failure(out: Path, exc: OSError) -> str:
    """Why writing the output failed, in words (the run's exit-4 reason)."""
    import errno

    if exc.errno == errno.ENOSPC:
        return f"the output disk is full (writing {exc.filename or out}); free space"
    if not out.is_dir():
        return f"the output directory {out} was deleted or moved during the run"
    return f"cannot write {exc.filename or out}: {exc.strerror or exc}"


def run(cfg: Config, *, restart: bool = False, progress: Progress | None = None) -> RunResult:
    return Supervisor(cfg, restart=restart, progress=progress).run()
