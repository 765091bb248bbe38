"""Source stage: list the inputs in a deterministic order, persist the listing, feed the pipeline.

The walk streams: directories are visited depth-first with each directory's entries sorted so
that the overall order is the byte order of full paths (a directory sorts as "name/"). Only one
directory's names are held at a time, and at most SPILL_ENTRIES of them (bigger directories are
sorted on disk). Input id = position in this order; the listing is appended
to OUT/listing.jsonl before an id is sent, so the supervisor can re-issue any id by reading it.
Unreadable directories and symlink loops are skipped with a warning; dangling symlinks and
names that are not valid UTF-8 are listed (they fail or embed like any other file).
"""

from __future__ import annotations

import itertools
import os
import stat
import struct
from collections.abc import Callable, Iterator

from pipeline.data import rundir
from pipeline.wire import messages
from stages.base import FatalError

Warn = Callable[[str], None]


def _has_ext(name: bytes, exts: frozenset[bytes]) -> bool:
    dot = name.rfind(b".")
    return dot > 0 and name[dot + 1:].lower() in exts


SPILL_ENTRIES = 50_000  # a directory with more entries is sorted in runs on disk (external merge)


def _spill(entries: list[tuple[bytes, bool, bool]]) -> Iterator[tuple[bytes, bool, bool]]:
    """Write a sorted run of entries to an anonymous temp file; return an iterator reading it back."""
    import tempfile

    entries.sort()
    fh = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the reader below, once merged
    for key, is_dir, is_link in entries:
        fh.write(struct.pack(">IB", len(key), is_dir | is_link << 1) + key)
    fh.seek(0)

    def read() -> Iterator[tuple[bytes, bool, bool]]:
        with fh:
            while head := fh.read(5):
                n, flags = struct.unpack(">IB", head)
                yield fh.read(n), bool(flags & 1), bool(flags & 2)

    return read()


def _sorted_entries(d: bytes, follow: bool) -> Iterator[tuple[bytes, bool, bool]]:
    """The entries of one directory sorted by name (a directory's name ends with "/").

    Memory is bounded: a huge flat directory is sorted in runs of SPILL_ENTRIES spilled to temp
    files and merged, so a million photos in one folder are never one Python list.
    """
    import heapq

    runs = []
    entries: list[tuple[bytes, bool, bool]] = []
    with os.scandir(d) as it:
        for e in it:
            try:
                is_dir = e.is_dir(follow_symlinks=follow)
            except OSError:
                is_dir = False
            entries.append((e.name + b"/" if is_dir else e.name, is_dir, e.is_symlink()))
            if len(entries) >= SPILL_ENTRIES:
                runs.append(_spill(entries))
                entries = []
    entries.sort()
    if not runs:
        return iter(entries)
    return heapq.merge(*runs, iter(entries))


def _walk_dir(d: bytes, exts: frozenset[bytes], recursive: bool, follow: bool,
              ancestors: frozenset[tuple[int, int]], warn: Warn,
              other_roots: dict[tuple[int, int], bytes] | None = None) -> Iterator[bytes]:
    try:
        entries = _sorted_entries(d, follow)
    except OSError as exc:
        # listed as an input of its own, so that it fails (unreadable) in failures.jsonl and the
        # counts: images that cannot even be listed must not vanish with only a warning
        warn(f"unreadable directory {os.fsdecode(d)} ({exc.strerror or exc}): listed as one failed input; "
             "the images in it are not embedded")
        yield d
        return
    for key, is_dir, is_link in entries:
        name = key[:-1] if is_dir else key
        path = os.path.join(d, name)
        if is_dir:
            if not recursive:
                continue
            try:
                st = os.stat(path, follow_symlinks=follow)
            except OSError as exc:
                warn(f"skipped directory {os.fsdecode(path)}: {exc.strerror or exc}")
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in ancestors:
                warn(f"skipped symlink loop at {os.fsdecode(path)}")
                continue
            if other_roots and ident in other_roots:
                warn(f"skipped {os.fsdecode(path)}: it is also input {os.fsdecode(other_roots[ident])}, "
                     "whose files are listed once, under that input (input.paths overlap)")
                continue
            yield from _walk_dir(path, exts, recursive, follow, ancestors | {ident}, warn, other_roots)
        elif _has_ext(name, exts) and (follow or not is_link):
            yield path


def _inside(parent: bytes, child: bytes) -> bool:
    return child.startswith(parent.rstrip(b"/") + b"/")


def dedupe_roots(paths: tuple[str, ...], exts: frozenset[bytes], recursive: bool,
                 warn: Warn = lambda m: None) -> list[bytes]:
    """The input roots to walk, each file reachable from one root only (by resolved path).

    A root that is the same directory or file as an earlier root, or lies inside an earlier
    root that lists it anyway (a recursive directory; a file with a listed suffix), is dropped
    with a warning naming both. A root nested in a *later* root is kept (ids follow the order of
    input.paths); the later root's walk skips it (see iter_inputs). Missing roots are kept for
    iter_inputs to report.
    """
    kept: list[tuple[bytes, bytes | None, bool, tuple[int, int] | None]] = []  # given, real, is_dir, ident
    for root in paths:
        broot = os.fsencode(root)
        try:
            st = os.stat(broot)
        except OSError:
            kept.append((broot, None, False, None))
            continue
        real = os.path.realpath(broot)
        is_dir = stat.S_ISDIR(st.st_mode)
        ident = (st.st_dev, st.st_ino)
        for other, oreal, odir, oident in kept:
            if oreal is None:
                continue
            if ident == oident or real == oreal:
                warn(f"input {root} is the same {'directory' if is_dir else 'file'} as input {os.fsdecode(other)}: "
                     "its files are listed once (input.paths / --input overlap)")
                break
            covered = odir and (
                (is_dir and recursive and _inside(oreal, real))
                or (not is_dir and _has_ext(os.path.basename(real), exts)
                    and (os.path.dirname(real) == oreal or (recursive and _inside(oreal, real)))))
            if covered:
                warn(f"input {root} lies inside input {os.fsdecode(other)}: its files are listed once, under "
                     f"{os.fsdecode(other)} (input.paths / --input overlap)")
                break
        else:
            kept.append((broot, real, is_dir, ident))
    return [given for given, _real, _is_dir, _ident in kept]


def _walk_covers(roots: list[bytes], exts: frozenset[bytes], recursive: bool) -> Callable[[bytes], bool]:
    """Whether the walk of `roots` lists a file (by resolved path): the rule dedupe_roots applies to
    roots, applied to the entries of input.list."""
    files, dirs = set(), []
    for root in roots:
        try:
            st = os.stat(root)
        except OSError:
            continue
        (dirs if stat.S_ISDIR(st.st_mode) else files).append(os.path.realpath(root))
    files = set(files)
    real_dirs: dict[bytes, bytes] = {}  # a list's directories repeat: resolve each once

    def covers(path: bytes) -> bool:
        if not files and not dirs:
            return False
        parent = os.path.dirname(path)
        if parent not in real_dirs:
            if len(real_dirs) > 4096:
                real_dirs.clear()
            real_dirs[parent] = os.path.realpath(parent)
        real = os.path.join(real_dirs[parent], os.path.basename(path))
        if real in files:
            return True
        if not _has_ext(os.path.basename(real), exts):
            return False
        return any(os.path.dirname(real) == d or (recursive and _inside(d, real)) for d in dirs)

    return covers


def iter_inputs(paths: tuple[str, ...], extensions: tuple[str, ...], recursive: bool = True,
                follow_symlinks: bool = True, warn: Warn = lambda m: None, *, input_list: str = "",
                list_column: str = "path", tar: bool = True) -> Iterator[bytes]:
    """Every input, as bytes paths, in the deterministic order that defines input ids: the walk
    of `paths`, then the entries of `input_list` (pipeline/data/inputs.py) in file order.

    Overlapping roots are listed once (dedupe_roots; a directory that is another root is skipped
    inside the walk). With `tar`, a `.tar` file (a root, a walked file or a list entry) is read
    as a webdataset shard: one input per sample, referenced as TAR/MEMBER (pipeline/data/inputs.py).
    Finding no input at all is warned about, naming the roots and extensions.
    """
    from pipeline.data import inputs

    exts = frozenset(e.lower().encode() for e in extensions)
    walk_exts = exts | {b"tar"} if tar else exts

    def expand(path: bytes) -> Iterator[bytes]:
        if tar and inputs.is_tar(path) and inputs.is_tar_file(path):
            yield from inputs.iter_tar_refs(path, warn)
        else:
            yield path

    roots = dedupe_roots(paths, walk_exts, recursive, warn)
    dir_roots: dict[tuple[int, int], bytes] = {}
    for broot in roots:
        try:
            st = os.stat(broot)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            dir_roots.setdefault((st.st_dev, st.st_ino), broot)
    n = 0
    for broot in roots:
        try:
            st = os.stat(broot)
        except OSError as exc:
            warn(f"skipped input {os.fsdecode(broot)}: {exc.strerror or exc}")
            continue
        if stat.S_ISDIR(st.st_mode):
            ident = (st.st_dev, st.st_ino)
            others = {k: v for k, v in dir_roots.items() if k != ident}
            for path in _walk_dir(broot, walk_exts, recursive, follow_symlinks, frozenset({ident}), warn, others):
                for ref in expand(path):
                    n += 1
                    yield ref
        else:
            for ref in expand(broot):  # a file named explicitly is an input whatever its suffix
                n += 1
                yield ref
    if input_list:
        walked = _walk_covers(roots, walk_exts, recursive)
        if paths:
            warn(f"both input.paths ({', '.join(paths)}) and input.list ({input_list}) are used: the walk first, "
                 "then the list, each file once (give only --list, or --input, to use one of them)")
        dup = 0
        for path in inputs.iter_list(input_list, list_column):
            if walked(path):
                dup += 1
                continue
            for ref in expand(path):
                n += 1
                yield ref
        if dup:
            warn(f"{dup} entries of input.list {input_list} were already listed by the walk of input.paths; "
                 "each is embedded once")
    if n == 0:
        where = ", ".join([*paths, *([f"input.list {input_list}"] if input_list else [])])
        warn(f"no input files found under {where} (extensions searched: {', '.join(extensions)}; "
             f"input.recursive = {str(recursive).lower()}): check input.paths / --input and input.extensions")


def config_inputs(cfg, warn: Warn = lambda m: None) -> Iterator[bytes]:
    """iter_inputs with every input.* key of a config (the one call the source, the dry run and the
    re-run comparison make)."""
    i = cfg.input
    return iter_inputs(i.paths, i.extensions, i.recursive, i.follow_symlinks, warn,
                       input_list=i.list, list_column=i.list_column, tar=i.tar)


def read_listing(path: str) -> Iterator[bytes]:
    return rundir.iter_listing(path)


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


def run_tail(cfg) -> tuple[int, int, int]:
    """(inputs at the end sent as tail pieces, inputs per piece, the cap a device may hold when
    given one): issue #20, pipeline/wire/dispatch.py. None with round_robin dispatch, one device, or a
    backend whose batch costs the same full or not (Backend.splits_tail)."""
    from pipeline.backends import get_backend
    from pipeline.wire.dispatch import tail_cap, tail_images, tail_piece

    devices = cfg.infer.devices
    n_dev = 2 if "all" in devices else len(devices)  # 'all' (sail/sim) resolves later: at least 2
    if cfg.queues.dispatch != "credit" or n_dev < 2 or not get_backend(cfg.infer.backend).splits_tail(cfg):
        return 0, 1, 0
    batch = cfg.model.batch_size
    return tail_images(batch, cfg.queues.infer_batches, n_dev), tail_piece(batch), tail_cap(batch)


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
            tail_n, piece, cap = run_tail(cfg)

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
                            f"the inputs changed since the interrupted run in {cfg.output.dir}: input #{n} was "
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
            f"the inputs changed since the interrupted run in {cfg.output.dir}: {existing} inputs were listed "
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
