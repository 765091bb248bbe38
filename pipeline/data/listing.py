"""The inputs of a run, in the deterministic order that defines input ids.

One reader per kind of source, chained by `iter_inputs`: the walk of the input roots (a directory
tree), then a file list (`input.list`, pipeline/data/inputs.py `iter_list`); every path they give
that is a *container* (pipeline/data/inputs.py `CONTAINERS`: a webdataset tar) is expanded into
the references of the inputs inside it, which decode resolves through the same container. A new
kind of container (video frames, say) is one `Container` there, plus its decode.

The walk streams: directories are visited depth-first with each directory's entries sorted so
that the overall order is the byte order of full paths (a directory sorts as "name/"). Only one
directory's names are held at a time, and at most SPILL_ENTRIES of them (bigger directories are
sorted on disk). Unreadable directories and symlink loops are skipped with a warning; dangling
symlinks and names that are not valid UTF-8 are listed (they fail or embed like any other file).
Used by the source stage, `run --dry-run`, the re-run comparison (pipeline/run/preflight.py),
`run --update` and a cluster plan: they all list exactly the same inputs.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterator

from pipeline.data import rundir

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

    containers = inputs.CONTAINERS if tar else ()
    exts = frozenset(e.lower().encode() for e in extensions)
    walk_exts = exts | {c.suffix for c in containers}

    def expand(path: bytes) -> Iterator[bytes]:
        for c in containers:
            if c.holds(path):
                yield from c.refs(path, warn)
                return
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
