"""The supervisor's accounting of input ids: what is resolved, written, failed, to re-issue.

Pure bookkeeping, no I/O. "Resolved" means the sink holds the id (embedded or failed) in a shard
not yet written; "written" shards are on disk. After any worker death every id that was sent
but is neither resolved nor written is re-issued; the sink drops the duplicates this may cause.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.wire.messages import Failure


@dataclass
class Ledger:
    shard_size: int
    written: set[int] = field(default_factory=set)
    resolved: set[int] = field(default_factory=set)
    listed: int = 0
    listing_done: bool = False
    written_rows: int = 0
    written_failed: int = 0
    pending_embedded: int = 0
    pending_failed: int = 0
    crash_counts: dict[int, int] = field(default_factory=dict)
    failed_here: dict[int, Failure] = field(default_factory=dict)  # failures decided by the supervisor
    first_shard: int = 0  # a cluster range run covers shards first_shard .. n_shards-1 only

    @property
    def total(self) -> int | None:
        return self.listed if self.listing_done else None

    @property
    def n_shards(self) -> int | None:
        t = self.total
        return None if t is None else -(-t // self.shard_size)

    def complete(self) -> bool:
        n = self.n_shards
        return n is not None and all(k in self.written for k in range(self.first_shard, n))

    @property
    def embedded(self) -> int:
        return self.written_rows + self.pending_embedded

    @property
    def failed(self) -> int:
        return self.written_failed + self.pending_failed

    def on_resolved(self, ids: list[int], embedded: int, failed: int) -> None:
        # the sink already dropped duplicates, so its counts are of new ids
        self.resolved.update(i for i in ids if i // self.shard_size not in self.written)
        self.pending_embedded += embedded
        self.pending_failed += failed

    def on_shard_written(self, k: int, rows: int, failed: int, resumed: bool = False) -> None:
        self.written.add(k)
        self.written_rows += rows
        self.written_failed += failed
        if not resumed:
            self.pending_embedded = max(0, self.pending_embedded - rows)
            self.pending_failed = max(0, self.pending_failed - failed)
        lo, hi = k * self.shard_size, (k + 1) * self.shard_size
        self.resolved = {i for i in self.resolved if not lo <= i < hi}
        for i in [i for i in self.failed_here if lo <= i < hi]:
            del self.failed_here[i]

    def record_crash(self, ids: list[int], limit: int = 2) -> list[int]:
        """Count a crash against the ids a dead worker held; return those now over the limit."""
        over = []
        for i in ids:
            self.crash_counts[i] = self.crash_counts.get(i, 0) + 1
            if self.crash_counts[i] >= limit and i not in self.failed_here:
                over.append(i)
        return over

    def lost_sink(self) -> None:
        """The sink died: everything it held in memory is gone."""
        self.resolved.clear()
        self.pending_embedded = self.pending_failed = 0

    def to_reissue(self, sent_upto: int) -> list[int]:
        """Ids below sent_upto that are neither written, resolved, nor failed by the supervisor."""
        out = []
        k = self.first_shard
        while k * self.shard_size < sent_upto:
            if k not in self.written:
                for i in range(k * self.shard_size, min((k + 1) * self.shard_size, sent_upto)):
                    if i not in self.resolved and i not in self.failed_here:
                        out.append(i)
            k += 1
        return out
