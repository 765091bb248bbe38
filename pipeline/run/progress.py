"""Progress display, drawn by the supervisor only: a tqdm bar on a terminal, log lines otherwise.

The per-stage line answers "why is my accelerator idle?": which stage is the bottleneck right
now, how busy the inference workers are ("decode-bound: infer 38% busy"), how busy each stage's
workers were over the last interval, and how full each queue between stages is.

Queue fill is computed from the cumulative counters every worker already reports: messages sent
into an edge by the upstream stage minus messages taken out of it by the downstream stage. That
count includes both ends' ZeroMQ buffers, so it can briefly exceed the nominal capacity
(queue depth x receiving workers).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from itertools import pairwise

ROLES = ("decode", "preprocess", "infer", "sink")


@dataclass
class StageSample:
    busy_s: float = 0.0
    blocked_s: float = 0.0
    items_in: float = 0.0
    items_out: float = 0.0  # messages sent to the next stage
    sink_out: float = 0.0  # messages sent straight to the sink (embeddings, failed items)
    workers: int = 0


def aggregate(stats: dict[str, dict], roles_of: dict[str, str]) -> dict[str, StageSample]:
    """Sum the latest cumulative stats of each worker by role (the source included)."""
    out: dict[str, StageSample] = {}
    for name, st in stats.items():
        role = roles_of.get(name)
        if role not in ROLES and role != "source":
            continue
        s = out.setdefault(role, StageSample())
        s.busy_s += st.get("busy_s", 0.0)
        s.blocked_s += st.get("blocked_s", 0.0)
        s.items_in += st.get("in", 0.0)
        s.items_out += st.get("out", 0.0)
        s.sink_out += st.get("sink_out", 0.0)
        s.workers += 1
    return out


def utilisation(prev: dict[str, StageSample], cur: dict[str, StageSample], dt: float) -> dict[str, float]:
    """Busy fraction per stage over an interval (0..1), averaged over the stage's workers."""
    util = {}
    for role, c in cur.items():
        if role not in ROLES:
            continue
        p = prev.get(role, StageSample())
        if dt > 0 and c.workers:
            util[role] = max(0.0, min(1.0, (c.busy_s - p.busy_s) / (dt * c.workers)))
    return util


def queue_fill(sample: dict[str, StageSample], order: list[str]) -> dict[str, int]:
    """Messages in transit into each stage of `order` (e.g. ["source", "decode", "infer", "sink"]).

    An edge is named by the stage it feeds. Into the sink, every stage's direct sends count
    (embeddings from infer, failed items from decode/preprocess/infer).
    """
    fill: dict[str, int] = {}
    for up, down in pairwise(order):
        if down == "sink":
            sent = sum(s.sink_out for s in sample.values())
        else:
            sent = sample.get(up, StageSample()).items_out
        got = sample.get(down, StageSample()).items_in
        fill[down] = max(0, int(sent - got))
    return fill


def bottleneck_line(util: dict[str, float], queues: dict[str, int] | None = None,
                    capacity: dict[str, int] | None = None) -> str:
    """One compact line: "decode-bound: infer 38% busy | busy decode 100% infer 38% sink 1% | queue ..."."""
    if not util:
        return "starting"
    parts = [f"{r} {util[r] * 100:.0f}%" for r in ROLES if r in util]
    top = max(util, key=lambda r: (util[r], r == "infer"))
    head = f"{top}-bound" if util[top] >= 0.5 else "input-bound"
    infer = util.get("infer")
    if infer is not None:
        head += f": infer {infer * 100:.0f}% busy"
    line = f"{head} | busy " + " ".join(parts)
    if queues:
        cap = capacity or {}
        line += " | queue " + " ".join(
            f"{r} {queues[r]}/{cap[r]}" if r in cap else f"{r} {queues[r]}" for r in ROLES if r in queues)
    return line


@dataclass
class Progress:
    mode: str = "auto"  # auto | bar | log | none
    log_interval_s: float = 10.0
    stream: object = field(default_factory=lambda: sys.stderr)
    quiet: bool = False  # --quiet: no messages either (mode "none" alone still prints them)

    def __post_init__(self) -> None:
        if self.mode == "auto":
            self.mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.bar = None
        self.last_log = 0.0
        self.start = time.monotonic()

    def update(self, done: int, total: int | None, failed: int, rate: float, stage_line: str) -> None:
        if self.mode == "none":
            return
        if self.mode == "bar":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="img", file=self.stream, dynamic_ncols=True, smoothing=0.1)
            if total is not None and self.bar.total != total:
                self.bar.total = total
            self.bar.n = done
            self.bar.set_postfix_str(f"failed={failed} | {stage_line}", refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last_log >= self.log_interval_s:
            self.last_log = now
            self.log_line(done, total, failed, rate, stage_line)

    def log_line(self, done: int, total: int | None, failed: int, rate: float, stage_line: str) -> None:
        tot = "?" if total is None else str(total)
        eta = ""
        if total is not None and rate > 0:
            eta = f", ETA {max(0.0, (total - done) / rate):.0f}s"
        print(f"[clip-pipeline] {done}/{tot} images, {rate:.1f} img/s{eta}, {failed} failed | {stage_line}",
              file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line for the user (warnings, restarts, notes): printed whatever the progress display,
        so `--progress none` (cron) keeps them; only --quiet drops them."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self, done: int, total: int | None, failed: int, rate: float, stage_line: str) -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
            self.bar.close()
            self.bar = None
        elif self.mode == "log":
            self.log_line(done, total, failed, rate, stage_line)
