"""What a worker is told: one frozen spec type per role, filled in once by the run plan.

`pipeline/run/plan.py` decides the whole topology and puts everything a worker needs on its spec:
addresses, queue limits, and the role's own settings (the decoder's `fused`, the device's
`files_mode`, the source's listing and resume point, the directory the sink writes into). Workers
derive nothing from their role or from the config's topology keys (nor the run's directory from
output.dir). A spec makes its worker's stage core (`make_core`), so the worker loop has no list of
roles; the source, which is not a core, runs its own `main`.

Python-3.10-compatible: foreign-interpreter workers (the sim backend) unpickle these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from pipeline.config import Config
    from stages.base import StageCore


@dataclass(frozen=True)
class WorkerSpec:
    """The fields every worker has. A subclass per role adds its own (see SPEC_TYPES)."""

    role: ClassVar[str] = ""
    #: one input per unit of work: the slot names the ids of each message (crash attribution)
    per_item: ClassVar[bool] = False
    #: sends failures (and results) to the sink
    sends_to_sink: ClassVar[bool] = True

    index: int
    cfg: Config
    in_addr: str | None = None
    next_addrs: tuple[str, ...] = ()
    sink_addr: str = ""
    control_addr: str = ""
    generation: int = 0
    # queue limits (ZeroMQ high-water marks, in messages), decided once by the run plan
    in_hwm: int = 0  # of this worker's PULL (0: it receives nothing)
    out_hwm: int = 0  # of its PUSH to the next stage (0: it has none)
    sink_hwm: int = 0  # of its PUSH to the sink
    # a sender into the infer stage with credit dispatch (pipeline/wire/dispatch.py): where the
    # devices return its credits ("" = round-robin, or not a sender into infer)
    credit_addr: str = ""

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def device_name(self) -> str | None:
        return None

    def make_core(self, slot: Any) -> StageCore:
        raise NotImplementedError(f"{type(self).__name__} runs no stage core")

    def main(self, slot: Any, loop: Any, run_core) -> int:
        """The worker's work after the loop is set up: by default the generic core loop."""
        return run_core(self, slot, loop)

    def credit_returns(self) -> tuple[str, ...]:
        """The senders' credit endpoints this worker returns credit to (an infer process)."""
        return ()


@dataclass(frozen=True)
class SourceSpec(WorkerSpec):
    role: ClassVar[str] = "source"

    out_dir: str = ""  # the directory the run writes into (named in messages)
    listing_path: str = ""  # OUT/listing.jsonl (or a cluster plan's listing)
    done_shards: tuple[int, ...] = ()  # complete shards: their ids are not sent
    listing_complete: bool = False  # replay the saved listing instead of walking the inputs
    start_at: int = 0  # a restarted source sends ids from here on
    range_lo: int = 0  # a cluster range run: ids [range_lo, range_hi) of a planned listing only
    range_hi: int | None = None
    # the run's tail (pipeline/wire/dispatch.py, issue #20): the last tail_n inputs go as pieces of
    # tail_piece, each marked with tail_cap (what a device may hold when given one); 0: no tail
    tail_n: int = 0
    tail_piece: int = 1
    tail_cap: int = 0

    def main(self, slot: Any, loop: Any, run_core) -> int:
        import os

        from pipeline.wire import messages
        from stages.source import run_source

        # ready like every worker (it has its sockets): deaths count "in a row without getting
        # ready" for the source too, so a source killed now and then does not abort the run
        loop.send("control", messages.ready(self.name, self.role, self.index, os.getpid(), {}))
        run_source(self, slot, loop)
        return 0


@dataclass(frozen=True)
class DecodeSpec(WorkerSpec):
    role: ClassVar[str] = "decode"
    per_item: ClassVar[bool] = True

    fused: bool = True  # decode and preprocess in one worker: sends the crops (workers.fuse_decode_preprocess)
    ready_crops: bool = False  # bench-only stand-in (fake.ready_crops): a fixed crop per input, nothing read

    def make_core(self, slot: Any) -> StageCore:
        if self.ready_crops:
            from stages.ready import ReadyCropCore

            return ReadyCropCore(self)
        from stages.decode import DecodeCore

        core = DecodeCore(self)
        core.slot = slot
        return core


@dataclass(frozen=True)
class PreprocessSpec(WorkerSpec):
    role: ClassVar[str] = "preprocess"
    per_item: ClassVar[bool] = True

    def make_core(self, slot: Any) -> StageCore:
        from stages.preprocess import PreprocessCore

        return PreprocessCore(self)


@dataclass(frozen=True)
class InferSpec(WorkerSpec):
    role: ClassVar[str] = "infer"

    device: str = ""
    files_mode: bool = False  # the device takes file paths and decodes them itself (Backend.input_kind)
    credit_addrs: tuple[str, ...] = ()  # every sender's credit endpoint (credit dispatch)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}({self.device})"

    @property
    def device_name(self) -> str | None:
        return self.device

    def make_core(self, slot: Any) -> StageCore:
        from stages.infer import InferCore

        return InferCore(self, slot)

    def credit_returns(self) -> tuple[str, ...]:
        return self.credit_addrs


@dataclass(frozen=True)
class SinkSpec(WorkerSpec):
    role: ClassVar[str] = "sink"
    sends_to_sink: ClassVar[bool] = False

    out_dir: str = ""  # the directory the shards go into: the configured output.dir, or an attempt's

    def make_core(self, slot: Any) -> StageCore:
        from stages.sink import SinkCore

        return SinkCore(self)


SPEC_TYPES: dict[str, type[WorkerSpec]] = {t.role: t for t in (SourceSpec, DecodeSpec, PreprocessSpec, InferSpec, SinkSpec)}
