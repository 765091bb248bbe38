"""Sink stage: gather resolved items (embedded or failed) into id-range shards and write them.

Duplicates (an id re-issued after a worker death and also finished by its first owner) are
dropped here, so every id appears exactly once. A shard is written when every id in its range is
resolved — sorted by id, atomically — so the output does not depend on worker count or timing.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import numpy as np

from pipeline.data import rundir
from pipeline.wire import messages
from pipeline.wire.messages import Failure
from pipeline.wire.transport import array_from
from stages.base import FatalError, Output, StageCore


@dataclass
class PendingShard:
    rows: dict[int, tuple[bytes, np.ndarray]] = field(default_factory=dict)
    fails: dict[int, Failure] = field(default_factory=dict)

    def resolved(self) -> int:
        return len(self.rows) + len(self.fails)

    def has(self, item_id: int) -> bool:
        return item_id in self.rows or item_id in self.fails


class ShardAssembler:
    """Pure part of the sink: which shards are complete, with their sorted contents."""

    def __init__(self, shard_size: int, done: set[int] | None = None):
        self.shard_size = shard_size
        self.done: set[int] = set(done or ())
        self.pending: dict[int, PendingShard] = {}
        self.total: int | None = None

    def _shard(self, item_id: int) -> PendingShard | None:
        k = item_id // self.shard_size
        if k in self.done:
            return None
        return self.pending.setdefault(k, PendingShard())

    def add_row(self, item_id: int, path: bytes, emb: np.ndarray) -> bool:
        s = self._shard(item_id)
        if s is None or s.has(item_id):
            return False
        s.rows[item_id] = (path, emb)
        return True

    def add_failure(self, failure: Failure) -> bool:
        s = self._shard(failure.id)
        if s is None or s.has(failure.id):
            return False
        s.fails[failure.id] = failure
        return True

    def expected(self, k: int) -> int | None:
        if self.total is None:
            return self.shard_size
        return max(0, min(self.shard_size, self.total - k * self.shard_size))

    def complete(self) -> list[int]:
        return sorted(k for k, s in self.pending.items() if s.resolved() == self.expected(k) or
                      (self.total is not None and self.expected(k) == 0))

    def pop(self, k: int, dim: int, dtype: str) -> tuple[list[bytes], np.ndarray, list[dict]]:
        s = self.pending.pop(k)
        self.done.add(k)
        ids = sorted(s.rows)
        paths = [s.rows[i][0] for i in ids]
        emb = np.stack([s.rows[i][1] for i in ids]).astype(dtype) if ids else np.zeros((0, dim), dtype=dtype)
        fails = [s.fails[i].record() for i in sorted(s.fails)]
        return paths, emb, fails


class SinkCore(StageCore):
    def __init__(self, spec):
        super().__init__()
        self.cfg = spec.cfg
        self.out_dir = spec.out_dir
        self.asm: ShardAssembler | None = None
        self.dim = 0
        o = spec.cfg.output
        self.metadata = o.metadata or o.layout == "clip-retrieval"  # part-NNNNN.parquet (pipeline/data/metadata.py)
        self.tars = None

    def setup(self) -> None:
        rundir.remove_temp_files(self.out_dir)
        self.asm = ShardAssembler(self.cfg.output.shard_size, set(rundir.completed_shards(self.out_dir)))

    def handle(self, header: dict, frames: list):
        t = header["t"]
        new_ids: list[int] = []
        failed = 0
        if t == "emb":
            emb = array_from(header, frames[0])
            self.dim = emb.shape[1]
            for i, (item_id, path) in enumerate(zip(header["ids"], header["paths"])):
                if self.asm.add_row(item_id, path, emb[i].copy()):
                    new_ids.append(item_id)
        elif t == "fail":
            if self.asm.add_failure(Failure.from_header(header)):
                new_ids.append(header["id"])
                failed = 1
        elif t == "total":
            self.asm.total = header["n"]
        elif t == "dim":
            self.dim = self.dim or header["n"]
        outputs = []
        if new_ids:
            outputs.append(("control", messages.resolved(new_ids, len(new_ids) - failed, failed), ()))
        return outputs + self.write_complete()

    def write_complete(self) -> list[Output]:
        outputs = []
        for k in self.asm.complete():
            if not self.dim and not self.asm.pending[k].rows:
                # A shard of failures only: its empty .npy needs the embedding width, which the
                # supervisor sends once a device is up ("dim"). Writing [0, 512] regardless would
                # make the output depend on timing.
                continue
            paths, emb, fails = self.asm.pop(k, self.dim, self.cfg.output.dtype)
            try:
                companions = None
                if self.metadata:
                    from pipeline.data import inputs, metadata

                    self.tars = self.tars or inputs.TarReader()
                    companions = {rundir.PARQUET_SUFFIX: metadata.parquet_bytes(paths, self.tars)}
                if self.cfg.output.content_hash:  # run --update's rename/copy check (pipeline/run/update.py)
                    from pipeline.data import inputs

                    self.tars = self.tars or inputs.TarReader()
                    companions = {**(companions or {}), rundir.HASHES_SUFFIX: b"".join(
                        (inputs.hash_input(p, self.tars) or "").encode() + b"\n" for p in paths)}
                rundir.write_shard(self.out_dir, k, paths, emb, fails, companions)
            except OSError as exc:
                what = "the output disk is full" if exc.errno == errno.ENOSPC else f"{exc.strerror or exc}"
                raise FatalError(
                    f"cannot write shard {rundir.shard_name(k)} in {self.out_dir}: {what}. "
                    "Completed shards are kept; free space (or fix permissions) and run the same command again to resume."
                ) from None
            outputs.append(("control", messages.shard(k, len(paths), len(fails)), ()))
        return outputs

