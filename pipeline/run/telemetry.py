"""What a run measures about itself: the workers' stats, ticks, the timeline, rates, report.json.

The supervisor feeds it (`on_stats`, `on_result`, `tick`), draws the progress line through a
ProgressView and, at the end, asks it for the content of report.json. Pure bookkeeping over the
counters the workers send (pipeline/run/progress.py does the arithmetic); no sockets, no files.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.config import Config
from pipeline.data import rundir
from pipeline.data.rundir import FORMAT, software_versions
from pipeline.run.ledger import Ledger
from pipeline.run.progress import aggregate, bottleneck_line, queue_fill, utilisation

TIMELINE_MAX = 1200  # points; beyond it the resolution halves (report.json stays small)


class Telemetry:
    """Stats, utilisation, queue fill and the timeline of one run."""

    def __init__(self) -> None:
        self.stats: dict[str, dict] = {}  # worker name -> its latest cumulative counters
        self.roles: dict[str, str] = {}  # worker name -> role
        self.stage_order: list[str] = []
        self.queue_capacity: dict[str, int] = {}
        self.timeline: list[dict] = []
        self.timeline_dt = 1.0  # doubles whenever the timeline gets long (report.json stays small)
        self.util: dict[str, float] = {}
        self.queues: dict[str, int] = {}
        self.t0: float | None = None  # when the workers were started (monotonic)
        self.first_result_s: float | None = None
        self.ready_s: float | None = None  # seconds from t0 until the first device was ready (model start-up)
        self.prev_sample: dict = {}
        self.prev_t = 0.0
        self.tl_sample: dict = {}
        self.tl_t: float | None = None  # last timeline point (None until the control loop runs)

    def set_topology(self, roles: dict[str, str], stage_order: list[str], queue_capacity: dict[str, int]) -> None:
        self.roles = dict(roles)
        self.stage_order = list(stage_order)
        self.queue_capacity = dict(queue_capacity)

    def start(self, now: float) -> None:
        """The workers are being started: per-stage figures count from here."""
        self.t0 = now

    def begin_loop(self, now: float) -> None:
        """The control loop starts: utilisation and timeline intervals count from here."""
        self.prev_sample, self.prev_t = {}, now
        self.tl_sample, self.tl_t = {}, now

    def on_stats(self, worker: str, stats: dict) -> None:
        self.stats[worker] = stats

    def on_result(self, now: float) -> None:
        if self.first_result_s is None and self.t0 is not None:
            self.first_result_s = now - self.t0

    def on_device_ready(self, now: float) -> None:
        """An infer worker is ready: the first one ends the model start-up."""
        if self.ready_s is None and self.t0 is not None:
            self.ready_s = now - self.t0

    def elapsed(self, now: float | None = None) -> float:
        return 0.0 if self.t0 is None else (time.monotonic() if now is None else now) - self.t0

    # -- every tick ------------------------------------------------------------------------------
    def tick(self, now: float, ledger: Ledger) -> None:
        sample = aggregate(self.stats, self.roles)
        self.queues = queue_fill(sample, self.stage_order)
        dt = now - self.prev_t
        if dt >= 1.0:
            self.util = utilisation(self.prev_sample, sample, dt)
            self.prev_sample, self.prev_t = sample, now
        if self.tl_t is not None and now - self.tl_t >= self.timeline_dt:
            self.record_timeline(now, sample, ledger)

    def stage_line(self) -> str:
        return bottleneck_line(self.util, self.queues, self.queue_capacity)

    def record_timeline(self, now: float, sample: dict, ledger: Ledger) -> None:
        """One report.json timeline point: inputs resolved, stage utilisation and queue fill."""
        util = utilisation(self.tl_sample, sample, now - (self.tl_t or now))
        self.tl_sample, self.tl_t = sample, now
        self.timeline.append({"t": round(now - (self.t0 or now), 2), "done": ledger.embedded + ledger.failed,
                              "failed": ledger.failed,
                              "util": {k: round(v, 3) for k, v in util.items()},
                              "queues": queue_fill(sample, self.stage_order)})
        if len(self.timeline) > TIMELINE_MAX:  # keep report.json small on long runs: halve the resolution
            self.timeline = self.timeline[1::2]
            self.timeline_dt *= 2

    def rate(self, done_now: int) -> float:
        """Inputs resolved per second by this run (done_now excludes what a resumed run had)."""
        elapsed = self.elapsed()
        return done_now / elapsed if elapsed > 0 else 0.0

    # -- the end ---------------------------------------------------------------------------------
    def final_line(self, ledger: Ledger) -> str:
        """The last timeline point, and the progress line that sums up the whole run."""
        final = aggregate(self.stats, self.roles)
        if self.tl_t is not None:
            self.record_timeline(time.monotonic(), final, ledger)
        if self.t0 is None:
            return self.stage_line()
        whole = utilisation({}, final, time.monotonic() - self.t0)
        return (bottleneck_line(whole) + " (whole run)") if whole else self.stage_line()

    def report(self, wall: float, ledger: Ledger, resumed: int, reasons: Counter,
               run: dict[str, Any]) -> dict[str, Any]:
        """The content of report.json; `run` adds what the supervisor knows (model, devices,
        backend, restarts, removed devices, errors, warnings, synthetic weights)."""
        done_now = ledger.embedded + ledger.failed - resumed
        # per-stage figures are over the pipeline's running time (after model build / preparation)
        run_s = self.elapsed()
        per_stage = {}
        for role, s in aggregate(self.stats, self.roles).items():
            if role == "source":
                continue
            per_stage[role] = {
                "workers": s.workers, "busy_s": round(s.busy_s, 3), "blocked_s": round(s.blocked_s, 3),
                "busy_fraction": round(s.busy_s / (run_s * s.workers), 3) if run_s > 0 and s.workers else None,
                "items_in": int(s.items_in),  # messages: one per image, except into the sink (one per batch)
                "items_in_per_s": round(s.items_in / run_s, 3) if run_s > 0 else None,
            }
        cap = self.queue_capacity
        occupancy: dict[str, Any] = {"capacity": cap, "mean": {}, "max": {}}
        for edge in cap:
            vals = [p["queues"][edge] for p in self.timeline if edge in p.get("queues", {})]
            if vals:
                occupancy["mean"][edge] = round(sum(vals) / len(vals), 2)
                occupancy["max"][edge] = max(vals)
        return {
            "format": FORMAT,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs_this_run": done_now,  # `report` draws the run that did the most work
            "wall_s": round(wall, 3),
            "run_s": round(run_s, 3),
            "images_per_s": round(done_now / wall, 3) if wall > 0 else None,
            "resumed_from": resumed,
            "queue_occupancy": occupancy,
            "stage_order": self.stage_order,
            "time_to_first_result_s": None if self.first_result_s is None else round(self.first_result_s, 3),
            # from the workers' start until the first device was ready (model load and compile)
            "startup_s": None if self.ready_s is None else round(self.ready_s, 3),
            "counts": {"embedded": ledger.embedded, "failed": ledger.failed, "listed": ledger.listed},
            "failures_by_reason": dict(sorted(reasons.items())),
            "per_stage": per_stage,
            "per_worker": self.stats,
            "timeline": self.timeline,
            **run,
            "versions": software_versions(),
        }


class ProgressView:
    """The progress line of one run, as Progress draws it on every tick and once at the end: this
    run's counts (a cluster range run covers ids [lo, hi) only), its own rate (not what an earlier
    run resolved) and the stage line (the model start-up while no device is ready, then the
    bottleneck line with the stuck note)."""

    def __init__(self, telemetry: Telemetry, ledger: Ledger, pool: Any, cfg: Config, path_of: Callable[[int], str],
                 *, id_range: tuple[int, int] | None = None, resumed: int = 0):
        self.telemetry, self.ledger, self.pool, self.cfg, self.path_of = telemetry, ledger, pool, cfg, path_of
        self.id_range, self.resumed = id_range, resumed

    def tick(self, now: float, progress: Any) -> None:
        led = self.ledger
        self.telemetry.tick(now, led)
        progress.update(led.embedded + led.failed, self.range_total() if led.listing_done else None, led.failed,
                        self.rate(), self.stage_line())

    def stage_line(self) -> str:
        if self.telemetry.ready_s is None and self.telemetry.t0 is not None:  # not "input-bound: infer 0%"
            devices = sum(1 for w in self.pool.of_role("infer") if not w.removed)
            return f"starting: {devices} device(s) loading the model, {self.telemetry.elapsed():.0f}s so far"
        line = self.telemetry.stage_line()
        stuck = stuck_note(self.pool, time.monotonic(), self.cfg, self.path_of)
        return f"{line} | {stuck}" if stuck else line

    def rate(self) -> float:
        return self.telemetry.rate(self.ledger.embedded + self.ledger.failed - self.resumed)

    def range_total(self) -> int | None:
        """The number of inputs this run covers (a cluster range run covers ids [lo, hi) only)."""
        t = self.ledger.total
        return t - self.id_range[0] if t is not None and self.id_range else t


# -- what the supervisor adds: the stuck note of the progress line, the report's run fields ----------
def stuck_note(workers: Iterable[Any], now: float, cfg: Config, path_of: Callable[[int], str]) -> str:
    """Workers (pool.Worker) stuck on one input, or one unit of work, for a while: named with the
    seconds and the path, so a hidden stall (a decoder blocked on a file) shows on the progress line."""
    notes = []
    item_after = min(5.0, cfg.preprocess.decode_timeout_s / 2)
    for w in workers:
        if not w.alive:
            continue
        item = w.slot.current_item() if w.role == "decode" else None
        if item and now - item[1] >= item_after:
            notes.append(f"{w.name} stuck {now - item[1]:.0f}s on {path_of(item[0])}")
            continue
        busy = w.slot.busy_since
        if not item and busy and now - busy >= max(30.0, cfg.run.stall_timeout_s / 10):
            ids = w.slot.current_ids()
            what = path_of(ids[0]) if len(ids) == 1 else f"{len(ids)} inputs"
            notes.append(f"{w.name} busy {now - busy:.0f}s on {what}")
    return "; ".join(notes)


def dispatch_summary(workers: Iterable[Any], stats: dict[str, dict], cfg: Config) -> dict:
    """How the work was spread over the devices: images per device (this run's last process of
    each) and the tail, from the first device's last result to the last one's (a device idle
    while another still works: the cost of uneven dispatch at the end of a run)."""
    per_device, last = {}, []
    for w in workers:
        if w.role != "infer":
            continue
        st = stats.get(w.name, {})
        per_device[str(w.device)] = int(st.get("in", 0))
        if st.get("last_result_t"):
            last.append(float(st["last_result_t"]))
    q = cfg.queues
    return {"mode": q.dispatch, "window_batches": 1 + q.infer_batches if q.dispatch == "credit" else None,
            "images_per_device": per_device,
            "tail_s": round(max(last) - min(last), 3) if len(last) > 1 else 0.0}


def run_fields(workers: list[Any], stats: dict[str, dict], cfg: Config, model: dict, devices: list[str],
               errors: list[dict], warnings: list[str]) -> dict[str, Any]:
    """report.json's fields about this run's setup and troubles (Telemetry.report's `run`)."""
    return {
        "dispatch": dispatch_summary(workers, stats, cfg),
        "model": model,
        "devices": devices,
        "backend": cfg.infer.backend,
        "restarts": {w.name: w.restarts for w in workers if w.restarts},
        "removed_devices": [w.device for w in workers if w.removed and w.role == "infer"],
        "errors": errors[-50:],
        "warnings": warnings[:200],
        "synthetic_weights": bool(model.get("synthetic")),
    }


class PathNames:
    """An input's path by id, read from the listing (cached: asked only for the few inputs a
    progress line or a warning names)."""

    def __init__(self, listing_path: str | os.PathLike):
        self.listing_path = listing_path
        self.cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        if i not in self.cache:
            try:
                self.cache[i] = os.fsdecode(rundir.listing_paths(self.listing_path, [i]).get(i, b"?"))
            except OSError:
                self.cache[i] = f"input #{i}"
        return self.cache[i]
