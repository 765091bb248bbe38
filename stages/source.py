"""Source stage: list the inputs in a deterministic order, persist the listing, feed the pipeline.

The inputs and their order come from pipeline/data/listing.py (`config_inputs`; the same walk the
dry run, the re-run comparison and a cluster plan make). Input id = position in this order; the
listing is appended to OUT/listing.jsonl before an id is sent, so the supervisor can re-issue any
id by reading it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

from pipeline.data import rundir
from pipeline.data.listing import config_inputs, read_listing
from pipeline.wire import messages
from stages.base import FatalError

CHUNK = 64


def _repair_listing(listing_path: str) -> int:
    """Count the complete lines of an existing listing, cutting a torn or damaged last line (a
    source killed mid-write) so that it is rewritten, not parsed."""
    return rundir.repair_listing(listing_path)[0]


def send_items(loop, items: list[tuple[int, bytes]], tail: int = 0) -> None:
    """One message for a group of inputs (batch-sized messages: see workers.items_per_message).
    `tail`: a piece of the run's tail, with the cap its device may hold (pipeline/wire/dispatch.py)."""
    if len(items) == 1 and not tail:
        loop.send("next", messages.item(items[0][0], items[0][1]))
    else:
        header = messages.items([i for i, _ in items], [p for _, p in items])
        if tail:
            header["tail"] = tail
        loop.send("next", header)


def split_tail(todo: list, group: int, tail_n: int, piece: int) -> Iterator[tuple[list, bool]]:
    """Messages for `todo`: groups of `group`, except the last `tail_n` inputs in pieces of
    `piece` (marked True). A group never straddles the start of the tail."""
    start = max(0, len(todo) - tail_n) // group * group if tail_n else len(todo)  # whole groups before it
    for lo in range(0, start, group):
        yield todo[lo:min(lo + group, start)], False
    for lo in range(start, len(todo), piece):
        yield todo[lo:lo + piece], True


def run_source(spec, slot, loop) -> None:
    """Source worker: walk (or replay the saved listing), persist it, send items downstream."""
    import errno

    cfg = spec.cfg
    listing_path = spec.listing_path
    done_shards = set(spec.done_shards)
    start_at = spec.start_at
    shard_size = cfg.output.shard_size
    replay = spec.listing_complete
    # A cluster range run (pipeline/cluster): replay ids [range_lo, range_hi) of the planned
    # listing, read-only (it is shared by every range); ids and shard names stay global.
    range_hi = spec.range_hi
    if range_hi is not None:
        replay = True
        start_at = max(start_at, spec.range_lo)

    def warn(msg: str) -> None:
        loop.send("control", messages.warning(msg))

    try:
        existing = _repair_listing(listing_path) if range_hi is None else 0
        if range_hi is not None:
            paths_iter = itertools.islice(read_listing(listing_path), int(range_hi))
        elif replay:
            paths_iter = read_listing(listing_path)
        else:
            paths_iter = config_inputs(cfg, warn)
        old = read_listing(listing_path) if existing and not replay else iter(())
        n = 0
        with open(listing_path, "ab") if range_hi is None else open(os.devnull, "wb") as listing:
            chunk: list[tuple[int, bytes]] = []
            held: list[tuple[int, bytes]] = []  # the last inputs seen: sent as the tail if nothing follows

            group = cfg.workers.items_per_message
            tail_n, piece, cap = spec.tail_n, spec.tail_piece, spec.tail_cap  # decided by the run plan

            def send_chunk(final: bool = False) -> None:
                listing.flush()  # a listed id is on disk before it is sent: re-issue reads it there
                todo = held + [(i, p) for i, p in chunk if i >= start_at and i // shard_size not in done_shards]
                held.clear()
                if not final and tail_n:  # hold back what may be the end of the run
                    held.extend(todo[max(0, len(todo) - tail_n):])
                    del todo[max(0, len(todo) - tail_n):]
                for part, tail in split_tail(todo, group, tail_n if final else 0, piece):
                    loop.check_alive()
                    # counted as sent before it is: a death then re-issues too much (the sink drops
                    # duplicates), never too little
                    slot.sent_upto = max(slot.sent_upto, part[-1][0] + 1)
                    send_items(loop, part, cap if tail else 0)
                if chunk:
                    slot.sent_upto = max(slot.sent_upto, held[0][0] if held else chunk[-1][0] + 1)
                chunk.clear()
                loop.report_stats()
                loop.send("control", messages.listed(n, False))

            for path in paths_iter:
                if n < existing and not replay:
                    before = next(old, None)
                    if before != path:
                        raise FatalError(
                            f"the inputs changed since the interrupted run in {spec.out_dir}: input #{n} was "
                            f"{os.fsdecode(before) if before else '(nothing)'}, now {os.fsdecode(path)}. "
                            "Run with --restart to start over (or restore the inputs)."
                        )
                elif n >= existing:
                    listing.write(rundir.listing_line(path))
                if n >= start_at or range_hi is None:
                    chunk.append((n, path))
                n += 1
                if len(chunk) >= CHUNK:
                    send_chunk()
            if chunk or held:
                send_chunk(final=True)
            listing.flush()
            if range_hi is None:
                os.fsync(listing.fileno())
    except OSError as exc:
        what = "the output disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise FatalError(f"cannot write the input listing {listing_path}: {what}. Completed shards are kept; "
                         "free space (or fix permissions) and run the same command again to resume.") from None
    if n < existing:
        raise FatalError(
            f"the inputs changed since the interrupted run in {spec.out_dir}: {existing} inputs were listed "
            f"then, only {n} now. Run with --restart to start over (or restore the inputs)."
        )
    slot.sent_upto = n
    loop.send("control", messages.listed(n, True))
    # Stay alive (idle) until the supervisor stops us: our PUSH socket may still hold messages.
    import time

    while True:
        loop.check_alive()
        loop.report_stats()  # final "out" count: the supervisor's queue-fill figure needs it
        time.sleep(0.1)
