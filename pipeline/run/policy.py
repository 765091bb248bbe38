"""What a worker's death means for the run: the failure policy, decided from facts only.

The supervisor sees a death (an exit code, a stall, a timed-out input) and asks `FailurePolicy`
what follows: which inputs are now failed as `crashed_worker`, whether the worker is restarted,
taken out of the run (a device over `run.max_restarts`), or whether the run must stop. No
processes, sockets or files: the tests drive it with a Ledger and a worker record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.run.ledger import Ledger
from pipeline.worker.loop import EXIT_DEVICE, EXIT_FATAL


@dataclass
class Verdict:
    crashed: list[int] = field(default_factory=list)  # ids that killed their worker twice: failed as crashed_worker
    restart: bool = False  # start the worker again
    remove: bool = False  # take it out of the run (a device over run.max_restarts)
    abort: str | None = None  # the run cannot go on: why
    note: str = ""  # what to tell the user besides the death itself


@dataclass
class Overdue:
    kind: str  # "input": one input read for too long; "stalled": one unit of work; "start": never got ready
    message: str = ""
    item: int = -1  # the input ("input")


class FailurePolicy:
    def __init__(self, cfg: Config, files_mode: bool):
        self.cfg = cfg
        self.max_restarts = cfg.run.max_restarts
        self.files_mode = files_mode

    def overdue(self, w: Any, now: float) -> Overdue | None:
        """A live worker over one of its limits, read from its Slot: a decoder on one input longer
        than preprocess.decode_timeout_s (that input fails as `timeout`, the rest of its group is
        not blamed), busy on one unit longer than run.stall_timeout_s, or not ready within
        run.start_timeout_s (the run aborts)."""
        busy = w.slot.busy_since
        item = w.slot.current_item() if w.role == "decode" else None
        limit = self.cfg.preprocess.decode_timeout_s
        if item and now - item[1] > limit:
            return Overdue("input", f"took longer than preprocess.decode_timeout_s={limit:g}s", item[0])
        stall = self.cfg.run.stall_timeout_s
        if busy and now - busy > stall:
            return Overdue("stalled", f"has been busy for {now - busy:.0f}s (run.stall_timeout_s={stall:g})")
        if not w.ready and now - w.started > self.cfg.run.start_timeout_s:
            return Overdue("start")
        return None

    def blames_inputs(self, role: str) -> bool:
        """Whether a death of this role can be an input's fault. Decoders read the inputs, and so do
        device processes that decode files themselves; a pixel-mode device process sees only
        S x S crops, so its deaths are the device's, not the items'."""
        return role in ("decode", "preprocess") or (role == "infer" and self.files_mode)

    def on_death(self, w: Any, code: int | None, ids: list[int], why: str, ledger: Ledger, *, blame: bool = True,
                 devices_left: int = 0, last_error: str | None = None, fatal: str | None = None) -> Verdict:
        """The death of worker `w` (its `role`, `name`, `device`, counters `restarts` and `streak`,
        which this updates), exiting with `code` while holding `ids`. devices_left: other devices
        still in the run; last_error: the last error a worker reported; fatal: the reason of a
        fatal error reported before the death."""
        if code == EXIT_FATAL:
            return Verdict(abort=fatal or f"{w.name} stopped the run ({why})")
        v = Verdict()
        if ids and blame and code != EXIT_DEVICE and self.blames_inputs(w.role):
            v.crashed = ledger.record_crash(ids)
        w.restarts += 1
        w.streak += 1
        # A device is taken out after max_restarts deaths in the run; any other worker only when
        # it dies max_restarts+1 times in a row without getting ready (a broken setup): deaths
        # caused by inputs are bounded by the crashed_worker rule instead.
        if (w.restarts if w.role == "infer" else w.streak) <= self.max_restarts:
            v.restart = True
            return v
        v.remove = True
        last = last_error or why
        if w.role != "infer":
            v.abort = f"{w.name} failed {w.restarts} times (last error: {last})"
            return v
        v.note = f"device {w.device} failed {w.restarts} times; taking it out of the run ({devices_left} device(s) left)."
        if not devices_left:
            v.abort = f"every device failed (last error: {last}); see report.json for details"
        return v
