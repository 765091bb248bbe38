"""Progress display, drawn by the supervisor only: a tqdm bar on a terminal, log lines otherwise.

The per-stage line says how busy each stage's workers were over the last interval and which
stage is the bottleneck right now ("decode-bound: infer 38% busy").
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

ROLES = ("decode", "preprocess", "infer", "sink")


@dataclass
class StageSample:
    busy_s: float = 0.0
    blocked_s: float = 0.0
    items_in: float = 0.0
    workers: int = 0


def aggregate(stats: dict[str, dict], roles_of: dict[str, str]) -> dict[str, StageSample]:
    """Sum the latest cumulative stats of each worker by role."""
    out: dict[str, StageSample] = {}
    for name, st in stats.items():
        role = roles_of.get(name)
        if role not in ROLES:
            continue
        s = out.setdefault(role, StageSample())
        s.busy_s += st.get("busy_s", 0.0)
        s.blocked_s += st.get("blocked_s", 0.0)
        s.items_in += st.get("in", 0.0)
        s.workers += 1
    return out


def utilisation(prev: dict[str, StageSample], cur: dict[str, StageSample], dt: float) -> dict[str, float]:
    """Busy fraction per role over an interval (0..1), averaged over the role's workers."""
    util = {}
    for role, c in cur.items():
        p = prev.get(role, StageSample())
        if dt > 0 and c.workers:
            util[role] = max(0.0, min(1.0, (c.busy_s - p.busy_s) / (dt * c.workers)))
    return util


def bottleneck_line(util: dict[str, float]) -> str:
    if not util:
        return "starting"
    parts = [f"{r} {util[r] * 100:.0f}%" for r in ROLES if r in util]
    top = max(util, key=util.get)
    head = f"{top}-bound" if util[top] >= 0.5 else "input-bound (workers mostly idle)"
    infer = util.get("infer")
    if top != "infer" and infer is not None:
        head += f": infer {infer * 100:.0f}% busy"
    return f"{head} | busy " + " ".join(parts)


@dataclass
class Progress:
    mode: str = "auto"  # auto | bar | log | none
    log_interval_s: float = 10.0
    stream: object = field(default_factory=lambda: sys.stderr)

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
        if self.mode == "none":
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
