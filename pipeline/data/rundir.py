"""The output directory of a run: its layout (every file name of it is spelled here and only
here), the formats of its files, atomic writes, and `RunDir`, the object the supervisor, the sink,
the source and `inspect` use to prepare, read and write it.

    OUT/manifest.json                      config, model identity, counts, shards, status
    OUT/listing.jsonl                      the input listing: line i = JSON string of input id i
    OUT/embeddings/part-NNNNN.npy          [rows, dim] float32/float16, sorted by input id (names: shard_name)
    OUT/embeddings/part-NNNNN.paths        one input path per row, UTF-8 text form (pipeline/wire/pathcodec.py)
    OUT/embeddings/part-NNNNN.failures.jsonl  failed inputs of the shard's id range
    OUT/failures.jsonl                     all failures, by id (rebuilt at the end of a run)
    OUT/report.json                        throughput, per-stage stats, failures by reason
    OUT/embeddings.pkl                     optional: {'img_path': [...], 'embedding': ndarray}
    OUT/.workers.json                      while running: worker name -> pid
    OUT/updates/u-NNNN.json (+ .jsonl ...) run --update: each update's record, listing, removed, aliases
    OUT/img_emb/, OUT/metadata/            output.layout = "clip-retrieval": hard links of the shards

Shard k holds input ids [k*shard_size, (k+1)*shard_size). A shard is complete iff its .npy
exists: companions are renamed into place first, the .npy last; temporary files are hidden
(dot-prefixed) and removed on the next start. The Python API to read a run is pipeline/output.py.

Writing goes through here: `RunDir.manifest_of` builds the one manifest.json (a run, a merge and
an update all write it), `RunDir.publish` finishes a complete run (failures.jsonl, metadata and
the clip-retrieval layout, the pickle, the manifest last), and `RunDir.adopt_shard` moves or links
another run directory's shard into this one (an update's attempt, a cluster range's attempt).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.errors import ConfigError, RunFailure
from pipeline.wire import pathcodec
from pipeline.wire.messages import Failure

MANIFEST = "manifest.json"
LISTING = "listing.jsonl"
FAILURES = "failures.jsonl"
REPORT = "report.json"
PICKLE = "embeddings.pkl"
WORKERS = ".workers.json"
EMB_DIR = "embeddings"
PATHS_SUFFIX, FAILURES_SUFFIX, NPY_SUFFIX = ".paths", ".failures.jsonl", ".npy"  # the files of a shard
CHECK_SUFFIX = ".check.json"  # a shard's integrity record: size and CRC-32 of each file, rows, shape, dtype
SHARD_SUFFIXES = (PATHS_SUFFIX, FAILURES_SUFFIX, CHECK_SUFFIX, NPY_SUFFIX)  # written in this order: the .npy marks completion
REQUIRED_SUFFIXES = (PATHS_SUFFIX, FAILURES_SUFFIX, NPY_SUFFIX)  # a shard is complete iff these exist
FORMAT = "clip-pipeline/1"
REPORT_HISTORY = 20  # earlier runs kept in report.json (each a whole report)
PARQUET_SUFFIX, HASHES_SUFFIX = ".parquet", ".hashes"  # optional companions: output.metadata, output.content_hash
COMPANION_SUFFIXES = (PARQUET_SUFFIX, HASHES_SUFFIX)
LOCK = ".lock"  # the exclusive lock of the output directory (output_lock); "pid P on host H since T"
UPDATES = "updates"  # run --update: OUT/updates/u-NNNN.json + its listing, removed and aliases files
CLIP_RETRIEVAL_EMB, CLIP_RETRIEVAL_META = "img_emb", "metadata"  # output.layout = "clip-retrieval"
SYNTHETIC_NOTE = "SYNTHETIC random weights: these embeddings carry no meaning"
# what the manifest's `updates` lists of each published update record
UPDATE_FIELDS = ("update", "first_shard", "first_id", "added", "embedded", "failed", "removed_count", "aliased")


def software_versions() -> dict[str, str]:
    """The versions of what wrote a run (manifest.json and report.json record them)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("clip-pipeline", "numpy", "pyzmq", "msgpack", "onnxruntime", "pillow", "simplejpeg",
                "opencv-python-headless"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def clip_retrieval_files(out_dir: str | os.PathLike, k: int) -> tuple[Path, Path]:
    """(img_emb/img_emb_NNNNN.npy, metadata/metadata_NNNNN.parquet) of shard k: zero-padded so that
    name order (what autofaiss and clip-retrieval's metadata reader sort by) is row order."""
    out = Path(out_dir)
    return out / CLIP_RETRIEVAL_EMB / f"img_emb_{k:05d}.npy", out / CLIP_RETRIEVAL_META / f"metadata_{k:05d}.parquet"


def update_files(n: int) -> dict[str, str]:
    """The file names (in OUT/updates/) of update n."""
    name = f"u-{n:04d}"
    return {"record": f"{name}.json", "listing": f"{name}.jsonl", "removed": f"{name}.removed.txt",
            "aliases": f"{name}.aliases.jsonl", "attempt": f".{name}", "list": f"{name}.list"}




SHARD_NAME_WIDE = 100_000  # shards from here on get the wide form, so names keep sorting in id order


def shard_name(k: int) -> str:
    """`part-00000` .. `part-99999`, then `part-x0000100000` (x + 10 digits): plain byte order of the
    names is id order at any count (autofaiss/embedding-reader and `ls` sort names this way), and
    the names of existing runs (5 digits) never change."""
    return f"part-{k:05d}" if k < SHARD_NAME_WIDE else f"part-x{k:010d}"


def parse_shard_name(stem: str) -> int | None:
    """The shard number of a file stem written by shard_name (`part-00042` -> 42), or None."""
    digits = stem.removeprefix("part-").removeprefix("x")
    if not (digits.isascii() and digits.isdigit()):
        return None
    k = int(digits)
    return k if shard_name(k) == stem else None


def encode_path_line(path: bytes) -> bytes:
    """One line of a .paths file: the name's one-line UTF-8 text form (pipeline/wire/pathcodec.py)."""
    return pathcodec.encode(path).encode("utf-8")


def decode_path_line(line: bytes) -> str:
    """A .paths line as the str the reading API returns: the text form (pathcodec.decode gives the bytes)."""
    return line.decode("utf-8")


def listing_line(path: bytes) -> bytes:
    """Line i of listing.jsonl: the JSON string of input i's text form (pure ASCII, no lone surrogates)."""
    return json.dumps(pathcodec.encode(path)).encode("ascii") + b"\n"


def parse_listing_line(line: bytes) -> bytes:
    return pathcodec.decode(json.loads(line))


class DamagedRun(ConfigError):
    """A file of the run directory that cannot be read as it was written (bit rot, a partial copy,
    random bytes): the message names it and says how to recover (exit 2 from run)."""


_LISTING_ERRORS = (ValueError, TypeError, AttributeError)  # bad JSON, bad UTF-8, a non-string value


def iter_listing(path: str | os.PathLike) -> Iterator[bytes]:
    """The paths of a listing file, in id order. A torn or damaged *last* line ends it (a crash
    mid-write; the source cuts it and lists that input again: repair_listing); a damaged line with
    lines after it is DamagedRun naming the line."""
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("line cut short")
                p = parse_listing_line(line)
            except _LISTING_ERRORS as exc:
                if fh.read(1):
                    raise DamagedRun(f"{path} line {n} is damaged ({exc}): the ids of the inputs after it cannot be "
                                     "trusted. Pass --restart to list and embed everything again") from None
                return
            yield p


def repair_listing(path: str | os.PathLike) -> tuple[int, bool]:
    """(lines kept, whether a torn or damaged last line was cut). The cut input is listed again by
    the next walk; a damaged line before the last is left for iter_listing to name."""
    if not os.path.exists(path):
        return 0, False
    n = good_end = last_start = 0
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            n += 1
            last_start, good_end = good_end, good_end + len(line)
    if n:
        with open(path, "rb") as fh:
            fh.seek(last_start)
            try:
                parse_listing_line(fh.read(good_end - last_start))
            except _LISTING_ERRORS:
                n, good_end = n - 1, last_start
    cut = good_end != os.path.getsize(path)
    if cut:
        os.truncate(path, good_end)
    return n, cut


def listing_paths(listing: str | os.PathLike, ids) -> dict[int, bytes]:
    """The paths of the given input ids, in one pass over the listing (stops after the largest)."""
    wanted = set(ids)
    found: dict[int, bytes] = {}
    if not wanted:
        return found
    last = max(wanted)
    with open(listing, "rb") as fh:
        for i, line in enumerate(fh):
            if i in wanted:
                found[i] = parse_listing_line(line)
            if i >= last:
                break
    return found


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open(path, "wb") gives a new file


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """The project's one atomic write (run directories, model files, indexes): `write(f)` on a temp
    file beside `path` (`.NAME.XXXX.tmp`, unique, so concurrent writers of the same file never
    share one; a dot-prefixed .tmp is removed by the next prepare), fsync, rename over `path`.
    The file gets the mode open() would give it. A failure removes the temp file and re-raises.
    (pipeline/text/vocab.py keeps its own: it must stay stdlib-only, see there.)"""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """dst becomes src's content, atomically: a hard link (a copy where links fail) to a temp name,
    then a rename."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, dst)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def file_check(data: bytes) -> dict[str, Any]:
    """The integrity record of one file: its size and CRC-32 (zlib; ~1.3 GB/s here against ~0.4 for
    sha256, and this guards against damage, not against an adversary)."""
    return {"size": len(data), "crc32": zlib.crc32(data) & 0xFFFFFFFF}


def _crc32_file(path: Path, chunk: int = 8 << 20) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc & 0xFFFFFFFF


def write_shard(out_dir: str | os.PathLike, k: int, paths: list[bytes], emb: np.ndarray,
                failures: list[dict], companions: dict[str, bytes] | None = None) -> None:
    """Write shard k atomically: .paths, .failures.jsonl, any `companions` (suffix -> bytes:
    PARQUET_SUFFIX, HASHES_SUFFIX) and the integrity record (.check.json: size and CRC-32 of each
    of the three shard files, rows, shape, dtype) first, the .npy (completion) last."""
    d = Path(out_dir) / EMB_DIR
    name = shard_name(k)
    tmps: list[tuple[Path, Path]] = []
    files = {".paths": b"".join(encode_path_line(p) + b"\n" for p in paths),
             ".failures.jsonl": b"".join(json.dumps(f, sort_keys=True).encode() + b"\n" for f in failures),
             ".npy": npy_bytes(emb)}
    check = {"rows": int(emb.shape[0]), "shape": list(emb.shape), "dtype": emb.dtype.str,
             "files": {suffix: file_check(data) for suffix, data in files.items()}}
    files = {".paths": files[".paths"], ".failures.jsonl": files[".failures.jsonl"], **(companions or {}),
             CHECK_SUFFIX: (json.dumps(check, sort_keys=True) + "\n").encode(), ".npy": files[".npy"]}
    try:
        for suffix, data in files.items():
            final = d / f"{name}{suffix}"
            tmp = d / f".{name}{suffix}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            tmps.append((tmp, final))
        for tmp, final in tmps:
            os.replace(tmp, final)
        fsync_dir(d)
    except BaseException:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
        for suffix in files:  # the one being written when it failed too (e.g. the disk filled up)
            (d / f".{name}{suffix}.tmp").unlink(missing_ok=True)
        raise


def completed_shards(out_dir: str | os.PathLike) -> list[int]:
    d = Path(out_dir) / EMB_DIR
    if not d.is_dir():
        return []
    ks = []
    for p in d.glob("part-*.npy"):
        k = parse_shard_name(p.stem)
        if k is None:
            continue
        if (d / f"{p.stem}.paths").exists() and (d / f"{p.stem}.failures.jsonl").exists():
            ks.append(k)
    return sorted(ks)


CHECKED_SUFFIXES = (".paths", ".failures.jsonl", ".npy")  # the files a .check.json records


def check_record_problem(rec: Any) -> str | None:
    """What makes `rec` not an integrity record as write_shard writes it, or None. A record with a
    flipped key or value must not switch the check off (issue #27): anything else is damage."""
    def count(v: Any) -> bool:
        return type(v) is int and v >= 0

    if not isinstance(rec, dict) or set(rec) != {"rows", "shape", "dtype", "files"}:
        return f"keys {sorted(rec) if isinstance(rec, dict) else type(rec).__name__}"
    shape = rec["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(count(x) for x in shape)):
        return f"shape {shape!r}"
    if not count(rec["rows"]) or rec["rows"] != shape[0]:
        return f"rows {rec['rows']!r} for shape {shape}"
    if not isinstance(rec["dtype"], str):
        return f"dtype {rec['dtype']!r}"
    files = rec["files"]
    if not isinstance(files, dict) or set(files) != set(CHECKED_SUFFIXES):
        return f"files {sorted(files) if isinstance(files, dict) else files!r}"
    for suffix, want in files.items():
        if not (isinstance(want, dict) and set(want) == {"size", "crc32"} and count(want["size"])
                and count(want["crc32"]) and want["crc32"] <= 0xFFFFFFFF):
            return f"files[{suffix!r}] {want!r}"
    return None


def check_record(out_dir: str | os.PathLike, k: int) -> dict[str, Any]:
    """The integrity record of shard k as its files are now (write_shard's, recomputed): for a
    complete shard whose .check.json was deleted, after its header and size checks passed."""
    d = Path(out_dir) / EMB_DIR
    name = shard_name(k)
    emb = np.load(d / f"{name}.npy", mmap_mode="r")
    files = {s: {"size": (d / f"{name}{s}").stat().st_size, "crc32": _crc32_file(d / f"{name}{s}")}
             for s in CHECKED_SUFFIXES}
    return {"rows": int(emb.shape[0]), "shape": list(emb.shape), "dtype": emb.dtype.str, "files": files}


def verify_shard(out_dir: str | os.PathLike, k: int, checksums: bool = True) -> str | None:
    """What is wrong with shard k on disk, or None when it is intact: companions present, sizes and
    (with `checksums`) CRC-32s as recorded at write time, the .npy header readable and consistent
    with its size. A shard written before integrity records existed is checked by header and size."""
    d = Path(out_dir) / EMB_DIR
    name = shard_name(k)
    missing = [f"{name}{s}" for s in REQUIRED_SUFFIXES if not (d / f"{name}{s}").exists()]
    if missing:
        return f"{', '.join(missing)} missing"
    rec = None
    if (d / f"{name}{CHECK_SUFFIX}").exists():
        try:
            rec = json.loads((d / f"{name}{CHECK_SUFFIX}").read_bytes())
        except (OSError, ValueError) as exc:
            return f"{name}{CHECK_SUFFIX} unreadable ({exc})"
        bad = check_record_problem(rec)
        if bad:
            return f"{name}{CHECK_SUFFIX} is not a valid integrity record ({bad})"
    if rec is not None:
        for suffix, want in rec["files"].items():
            p = d / f"{name}{suffix}"
            try:
                size = p.stat().st_size
            except OSError as exc:
                return f"{p.name} cannot be read ({exc.strerror or exc})"
            if size != want["size"]:
                return f"{p.name} is {size} bytes, {want['size']} were written"
            if checksums and _crc32_file(p) != want["crc32"]:
                return f"{p.name} content changed since it was written (CRC-32 mismatch)"
    try:
        emb = np.load(d / f"{name}.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        return f"{name}.npy cannot be read ({exc})"
    if emb.ndim != 2:
        return f"{name}.npy has shape {emb.shape}, not [rows, dim]"
    if rec is not None and (list(emb.shape) != rec.get("shape") or emb.dtype.str != rec.get("dtype")):
        return f"{name}.npy holds {emb.dtype}{list(emb.shape)}, {rec.get('dtype')}{rec.get('shape')} was written"
    return None


def damaged_shards(out_dir: str | os.PathLike, checksums: bool = True) -> dict[int, str]:
    """Shards on disk that are not intact (verify_shard), including a .npy whose companions are
    missing (a shard that looks complete to nobody but holds the place): shard -> problem."""
    d = Path(out_dir) / EMB_DIR
    if not d.is_dir():
        return {}
    found: set[int] = set()
    for p in d.glob("part-*"):
        if p.name.startswith("."):
            continue
        try:
            found.add(int(p.name.split(".")[0].split("-")[1]))
        except (IndexError, ValueError):
            continue
    out = {}
    for k in sorted(found):
        if not (d / f"{shard_name(k)}.npy").exists():
            continue  # never completed (a crash before the .npy): the sink writes it again
        problem = verify_shard(out_dir, k, checksums)
        if problem:
            out[k] = problem
    return out


def remove_shard(out_dir: str | os.PathLike, k: int) -> None:
    """Delete shard k's files (the .npy, the completion mark, first)."""
    d = Path(out_dir) / EMB_DIR
    name = shard_name(k)
    for suffix in (".npy", CHECK_SUFFIX, ".paths", ".failures.jsonl", PARQUET_SUFFIX, HASHES_SUFFIX):
        (d / f"{name}{suffix}").unlink(missing_ok=True)
    fsync_dir(d)


def remove_temp_files(out_dir: str | os.PathLike) -> None:
    for d in (Path(out_dir), Path(out_dir) / EMB_DIR):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)


RESTART_OR_RESTORE = ("restore it from a copy if you have one, or pass --restart to delete the run and start over "
                      "(without it the run's model and preprocessing are unknown, so its shards cannot be reused)")


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The run's manifest, None when there is none; DamagedRun when it cannot be read as one."""
    p = Path(out_dir) / MANIFEST
    try:
        m = json.loads(p.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:  # not JSON, not UTF-8
        raise DamagedRun(f"{p} is damaged ({str(exc)[:80]}): {RESTART_OR_RESTORE}") from None
    if not isinstance(m, dict) or not str(m.get("format", "")).startswith("clip-pipeline/"):
        raise DamagedRun(f"{p} is not a clip-pipeline manifest: {RESTART_OR_RESTORE}")
    return m


def looks_like_run(out_dir: str | os.PathLike) -> bool:
    """Whether a directory without a manifest holds a run's other files (its manifest was deleted)."""
    out = Path(out_dir)
    return (out / LISTING).exists() or (out / EMB_DIR).is_dir()


def manifest_missing(out_dir: str | os.PathLike) -> DamagedRun:
    """The error for a run directory whose manifest was deleted, saying how to recover."""
    return DamagedRun(f"output directory {out_dir} holds a clip-pipeline run whose {MANIFEST} is missing: "
                      f"{RESTART_OR_RESTORE}")


@dataclass(frozen=True)
class PriorRun:
    """What RunDir.prepare found in the output directory."""

    manifest: dict | None  # the previous run's manifest (None: a new run)
    listing_complete: bool  # the previous run listed every input (the source replays listing.jsonl)
    done_shards: list[int]  # shards already complete (the source skips their ids)
    damaged: dict[int, str] = field(default_factory=dict)  # shards found damaged, deleted to be redone

    @property
    def resumed(self) -> bool:
        return self.manifest is not None


class RunDir:
    """One run's output directory: every path of the layout, and the operations on it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    # -- the layout ------------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    @property
    def listing(self) -> Path:
        return self.path / LISTING

    @property
    def failures(self) -> Path:
        return self.path / FAILURES

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def pickle(self) -> Path:
        return self.path / PICKLE

    @property
    def workers(self) -> Path:
        return self.path / WORKERS

    @property
    def shards_dir(self) -> Path:
        return self.path / EMB_DIR

    def shard_npy(self, k: int) -> Path:
        """Shard k's embeddings ([rows, dim]; its presence marks the shard complete)."""
        return self.shards_dir / f"{shard_name(k)}{NPY_SUFFIX}"

    def shard_paths(self, k: int) -> Path:
        """Shard k's input paths, one per row."""
        return self.shards_dir / f"{shard_name(k)}{PATHS_SUFFIX}"

    def shard_check(self, k: int) -> Path:
        return self.shards_dir / f"{shard_name(k)}{CHECK_SUFFIX}"

    def shard_failures(self, k: int) -> Path:
        """Shard k's failure records (JSON lines)."""
        return self.shards_dir / f"{shard_name(k)}{FAILURES_SUFFIX}"

    def shard_companion(self, k: int, suffix: str) -> Path:
        """Shard k's optional companion file (one of COMPANION_SUFFIXES)."""
        if suffix not in COMPANION_SUFFIXES:
            raise ValueError(f"{suffix!r} is not a shard companion ({COMPANION_SUFFIXES})")
        return self.shards_dir / f"{shard_name(k)}{suffix}"

    # -- reading ---------------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        return read_manifest(self.path)

    def completed_shards(self) -> list[int]:
        return completed_shards(self.path)

    def shard_counts(self, k: int) -> tuple[int, int]:
        """(rows, failures) of the complete shard k."""
        rows = np.load(self.shard_npy(k), mmap_mode="r").shape[0]
        failed = self.shard_failures(k).read_bytes().count(b"\n")
        return rows, failed

    def read_shard(self, k: int, mmap: bool = True) -> tuple[np.ndarray, list[str], list[dict]]:
        """(embeddings [rows, dim], paths, failure records) of the complete shard k."""
        emb = np.load(self.shard_npy(k), mmap_mode="r" if mmap else None)
        paths = [decode_path_line(line) for line in self.shard_paths(k).read_bytes().splitlines()]
        fails = [json.loads(line) for line in self.shard_failures(k).read_text().splitlines() if line]
        return emb, paths, fails

    def failures_by_reason(self, shards: Iterable[int]) -> Counter:
        """Failure counts per reason code over these shards' .failures.jsonl (a line that is not a
        record counts as "<unreadable record>", one without a reason as "?")."""
        reasons: Counter = Counter()
        for k in shards:
            for line in self.shard_failures(k).read_text(errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    reasons[json.loads(line).get("reason", "?")] += 1
                except (ValueError, AttributeError):
                    reasons["<unreadable record>"] += 1
        return reasons

    def listing_paths(self, ids: Iterable[int]) -> dict[int, bytes]:
        return listing_paths(self.listing, ids)

    # -- writing ---------------------------------------------------------------------------------
    def prepare(self, fp: dict[str, Any], *, restart: bool, on_existing: str, log: Callable[[str], None],
                refusal: Callable[[dict[str, Any]], str]) -> PriorRun:
        """Make the directory ready for a run with fingerprint `fp`: refuse a foreign or
        incompatible directory (ConfigError; `refusal(old fingerprint)` words the latter), delete
        the old run on restart, remove temp files."""
        out = self.path
        restart = restart or on_existing == "restart"
        try:
            manifest = self.read_manifest() if out.exists() else None
        except DamagedRun:
            if not restart:
                raise
            manifest = {}  # deleted below
        if out.exists() and manifest is None and any(p.name != LOCK for p in out.iterdir()):
            if looks_like_run(out) and restart:
                manifest = {}
            elif looks_like_run(out):
                raise manifest_missing(out)
            else:
                raise ConfigError(f"output directory {out} is not empty and holds no clip-pipeline run; "
                                  "choose a new or empty directory (config key output.dir / --output)")
        if manifest is not None:
            if restart:
                log(f"Deleting the previous run in {out} (--restart).")
                for p in out.iterdir():  # all but the lock this process holds
                    if p.name == LOCK:
                        continue
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
                manifest = None
            elif on_existing == "error":
                raise ConfigError(f"output directory {out} already holds a run (output.on_existing = 'error'); "
                                  "choose another --output or pass --restart")
            elif manifest.get("fingerprint") != fp:
                raise ConfigError(refusal(manifest.get("fingerprint") or {}))
        damaged: dict[int, str] = {}
        listing_cut = False
        try:
            self.shards_dir.mkdir(parents=True, exist_ok=True)
            remove_temp_files(out)
            if manifest is not None:  # resume: every shard on disk is verified, a damaged one redone
                damaged = damaged_shards(out)
                self.refuse_damaged_update_shards(damaged)
                for k, problem in damaged.items():
                    log(f"warning: shard {shard_name(k)} is damaged ({problem}); redoing it.")
                    remove_shard(out, k)
                for k in completed_shards(out):  # intact by header and size, its record deleted
                    if not self.shard_check(k).exists():
                        log(f"warning: {self.shard_check(k).name} was missing; recreated from the shard's files.")
                        atomic_write_bytes(self.shard_check(k),
                                           (json.dumps(check_record(out, k), sort_keys=True) + "\n").encode())
                _n, cut = repair_listing(self.listing)
                if cut:
                    log(f"warning: the last line of {self.listing} was cut short or damaged; that input is listed again.")
                    listing_cut = True
            probe = out / ".write-test.tmp"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # exit 4 like a disk that fills up mid-run (README, exit status)
                raise RunFailure(f"the output disk is full ({out}): free space and run the same command again; "
                                 "completed shards are kept") from None
            raise ConfigError(f"output directory {out} is not writable: {exc.strerror or exc} "
                              "(config key output.dir / --output)") from None
        listing_complete = bool(manifest and manifest.get("inputs", {}).get("listing_complete"))
        if listing_complete and (listing_cut or not self.listing.exists()):
            listing_complete = False  # walked again (and compared with what the listing holds)
        if manifest is not None:
            self.finish_updates(manifest, log)
        updated = self.update_shards()  # published by run --update: not this run's to count or redo
        done_shards = [k for k in self.completed_shards() if k not in updated]
        if not manifest:
            self.listing.unlink(missing_ok=True)
        return PriorRun(manifest, listing_complete, done_shards, damaged)

    def manifest_of(self, *, status: str, created: str, fingerprint: dict, config: dict, devices: list,
                    model: dict, listed: int, listing_complete: bool, counts: dict, shards: Iterable[int],
                    shard_size: int, **extra: Any) -> dict[str, Any]:
        """The run's manifest.json, the one builder (run, merge, update). `counts` (embedded, failed,
        total) and `shards` are those of the run's own listing (`listed` inputs); every update
        published into this directory is added to them and listed under `updates`, so every count
        includes the updates. `extra`: keys of one kind of run (`range`, `cluster`, `error`)."""
        counts, shards = dict(counts), set(shards)
        published = self.published_updates()
        for rec in published:
            counts["embedded"] += int(rec.get("embedded", 0))
            counts["failed"] += int(rec.get("failed", 0))
            if counts.get("total") is not None:
                counts["total"] += int(rec.get("added", 0))
            shards.update(update_shard_range(rec))
        synthetic = bool(model.get("synthetic"))
        m = {
            "format": FORMAT,
            "status": status,
            "created": created,
            "updated": now_iso(),
            "fingerprint": fingerprint,
            "config": config,
            "devices": devices,
            "model": model,
            "synthetic_weights": synthetic,
            "inputs": {"listed": listed, "listing_complete": listing_complete},
            "counts": counts,
            "shard_size": shard_size,
            "shards": sorted(shards),
            "versions": software_versions(),
        }
        if published:
            m["updates"] = [{k: rec[k] for k in UPDATE_FIELDS} for rec in published]
        if synthetic:
            m["warning"] = SYNTHETIC_NOTE
        m.update(extra)
        return m

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest, manifest)

    def publish(self, manifest: dict[str, Any], *, metadata: bool, layout: str, pickle: bool) -> int:
        """Finish a complete run, the one way (a run, a merge and an update end here): failures.jsonl
        over the manifest's shards, the per-shard metadata and the clip-retrieval layout, the
        pickle, then the manifest, last (from then on the run is complete). Returns the number of
        failures."""
        shards = sorted(manifest["shards"])
        n_fail = self.write_failures(shards)
        if metadata or layout == "clip-retrieval":
            self.publish_layout(shards, metadata, layout)
        if pickle:
            dtype = (manifest.get("config") or {}).get("output", {}).get("dtype", "float32")
            self.write_pickle(*self.read_rows(shards, dtype))
        self.write_manifest(manifest)
        return n_fail

    def read_rows(self, shards: Iterable[int], dtype: str = "float32") -> tuple[list[str], np.ndarray]:
        """(paths, embeddings [rows, dim]) of these shards, in order, in memory (for the pickle)."""
        paths: list[str] = []
        parts = []
        for k in sorted(shards):
            emb, ps, _fails = self.read_shard(k)
            paths += ps
            if emb.shape[0]:
                parts.append(np.asarray(emb))
        return paths, np.concatenate(parts) if parts else np.zeros((0, 0), dtype=dtype)

    def publish_layout(self, shards: list[int], metadata: bool, layout: str) -> None:
        """Backfill missing per-shard parquet files (a run resumed with metadata newly on); with the
        clip-retrieval layout, hard-link every shard with rows into img_emb/ and metadata/."""
        from pipeline.data import inputs
        from pipeline.data import metadata as meta

        reader = inputs.TarReader()
        try:
            for k in shards:
                pq_path = self.shard_companion(k, PARQUET_SUFFIX)
                if not pq_path.exists():
                    lines = self.shard_paths(k).read_bytes().splitlines()
                    paths = [pathcodec.decode(decode_path_line(line)) for line in lines]
                    atomic_write_bytes(pq_path, meta.parquet_bytes(paths, reader))
        finally:
            reader.close()
        # one schema in every parquet file of the run (clip-retrieval's readers need it): metadata.unify
        meta.unify([self.shard_companion(k, PARQUET_SUFFIX) for k in shards], atomic_write_bytes)
        if layout != "clip-retrieval":
            return
        emb_dir, meta_dir = self.path / CLIP_RETRIEVAL_EMB, self.path / CLIP_RETRIEVAL_META
        emb_dir.mkdir(exist_ok=True)
        meta_dir.mkdir(exist_ok=True)
        for k in shards:
            if np.load(self.shard_npy(k), mmap_mode="r").shape[0] == 0:
                continue  # no rows: nothing to index, and both folders skip it alike
            emb_file, meta_file = clip_retrieval_files(self.path, k)
            link_or_copy(self.shard_companion(k, PARQUET_SUFFIX), meta_file)
            link_or_copy(self.shard_npy(k), emb_file)
        fsync_dir(emb_dir)
        fsync_dir(meta_dir)

    # -- another run directory's shards (an update's or a cluster range's attempt) -------------------
    def adopt_shard(self, src: RunDir, j: int, k: int, *, id_shift: int = 0, link: bool = False) -> None:
        """Shard j of the run directory `src` becomes shard k here, the .npy (completion) last. Its
        failure records get ids + id_shift (and the integrity record their new size and CRC); the
        other files move unchanged (`link`: hard-linked or copied, src stays whole). Idempotent: a
        file already moved is not there any more and is skipped, so a publish that died half-way is
        finished by doing it again."""
        if src.path.resolve() == self.path.resolve() and j == k:
            return
        moves = [PATHS_SUFFIX, FAILURES_SUFFIX, *COMPANION_SUFFIXES, CHECK_SUFFIX, NPY_SUFFIX]
        if id_shift:
            moves.remove(FAILURES_SUFFIX)  # rewritten; the attempt's own stays until the attempt is removed
            fails = src.shard_failures(j)
            if fails.exists():
                data = b"".join(_shifted_failure(line, id_shift) for line in fails.read_bytes().splitlines() if line)
                atomic_write_bytes(self.shard_failures(k), data)
                check = src.shard_check(j)
                if check.exists():  # the integrity record follows the rewritten failures file
                    rec = json.loads(check.read_text())
                    rec.setdefault("files", {})[FAILURES_SUFFIX] = file_check(data)
                    atomic_write_bytes(check, (json.dumps(rec, sort_keys=True) + "\n").encode())
        for suffix in moves:
            a, b = src.shards_dir / f"{shard_name(j)}{suffix}", self.shards_dir / f"{shard_name(k)}{suffix}"
            if not a.exists():
                continue
            if link:
                link_or_copy(a, b)
            else:
                os.replace(a, b)

    def write_report(self, report: dict[str, Any]) -> None:
        """report.json: this run's report at the top level (what tools read), with the reports of
        the earlier runs over this directory under "history" (oldest first, the last
        REPORT_HISTORY), so a no-op re-run of a finished run no longer loses the real run's figures."""
        history: list[dict] = []
        try:
            old = json.loads(self.report.read_text())
            if isinstance(old, dict) and old.get("format") == FORMAT:
                history = list(old.pop("history", []) or []) + [old]
        except (OSError, ValueError):
            pass
        atomic_write_json(self.report, {**report, "history": history[-REPORT_HISTORY:]})

    def write_workers(self, pids: dict[str, int]) -> None:
        atomic_write_json(self.workers, pids)

    def remove_workers(self) -> None:
        self.workers.unlink(missing_ok=True)

    def write_failures(self, shards: Iterable[int]) -> int:
        """OUT/failures.jsonl: the shards' failure records in id order; returns their number."""
        n = 0
        tmp = self.path / f".{FAILURES}.tmp"
        with open(tmp, "wb") as dst:
            for k in sorted(shards):
                data = self.shard_failures(k).read_bytes()
                n += data.count(b"\n")
                dst.write(data)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.failures)
        return n

    def write_pickle(self, paths: list[str], embeddings: np.ndarray) -> None:
        """OUT/embeddings.pkl in the reference program's format."""
        data = pickle.dumps({"img_path": paths, "embedding": embeddings}, protocol=4)
        atomic_write_bytes(self.pickle, data)

    # -- updates (run --update, pipeline/run/update.py) ---------------------------------------------
    @property
    def updates_dir(self) -> Path:
        return self.path / UPDATES

    def update_file(self, n: int, kind: str) -> Path:
        """One file of update n in OUT/updates/ (kinds: update_files)."""
        return self.updates_dir / update_files(n)[kind]

    def published_updates(self) -> list[dict]:
        return [rec for rec in records(self.path) if rec.get("published")]

    def refuse_damaged_update_shards(self, damaged: dict[int, str]) -> None:
        """A damaged shard of a published update cannot be redone by a resume (its inputs are in the
        update's listing, not the run's): it is kept, and the run stops naming it (DamagedRun)."""
        owner = self.update_of_shard()
        hit = sorted(set(damaged) & owner.keys())
        if hit:
            k = hit[0]
            raise DamagedRun(f"shard {shard_name(k)} in {self.path} is damaged ({damaged[k]}); it holds inputs "
                             f"added by update {owner[k]} (run --update), which a resume cannot embed "
                             "again, so it is kept as it is: restore it from a copy if you have one, or pass "
                             "--restart to delete the run and embed every input again")

    def update_of_shard(self) -> dict[int, int]:
        """Shard -> the published update that added it."""
        return {k: rec["update"] for rec in self.published_updates() for k in update_shard_range(rec)}

    def update_shards(self) -> set[int]:
        """The shards the published updates added."""
        return set(self.update_of_shard())

    def publish_update(self, rec: dict, attempt: RunDir) -> None:
        """Put a finished update attempt's shards after the existing ones: attempt shard j becomes
        shard first_shard + j, its ids shifted by first_id; then the attempt goes and the record is
        marked published. The record, written before the first move, is the journal: a publish
        that died is done again by finish_updates (every step is idempotent)."""
        for j in attempt.shards_on_disk():
            self.adopt_shard(attempt, j, rec["first_shard"] + j, id_shift=rec["first_id"])
        fsync_dir(self.shards_dir)
        if attempt.path.exists():
            shutil.rmtree(attempt.path)
        self.update_file(rec["update"], "list").unlink(missing_ok=True)
        atomic_write_json(self.update_file(rec["update"], "record"), {**rec, "published": True})

    def finish_updates(self, manifest: dict, log: Callable[[str], None]) -> list[int]:
        """Updates whose publish was interrupted: shards not all moved (the record is not marked
        published: the moves are finished here), or the run's files not refreshed after them (the
        manifest does not list them: the caller's publish refreshes them). Returns their numbers."""
        listed = {u.get("update") for u in manifest.get("updates") or []}
        unfinished = []
        for rec in records(self.path):
            if not rec.get("published"):
                self.publish_update(rec, RunDir(self.update_file(rec["update"], "attempt")))
            elif rec["update"] in listed:
                continue
            log(f"warning: finished publishing update {rec['update']} of {self.path}, which was interrupted")
            unfinished.append(rec["update"])
        return unfinished

    def shards_on_disk(self) -> list[int]:
        """Shards whose .npy is here, complete or not (a half-adopted shard still has its .npy)."""
        if not self.shards_dir.is_dir():
            return []
        return sorted(k for p in self.shards_dir.glob("part-*.npy") if (k := parse_shard_name(p.stem)) is not None)


_held: dict[str, list[int]] = {}  # realpath of a locked directory -> [fd, depth] (this process)


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, what: str = "run") -> Iterator[None]:
    """Hold the output directory's exclusive lock (flock on OUT/.lock) for the block: run, --update,
    --restart, run-range (on its attempt directory) and merge take it; inspect and search read
    without it. The OS drops it with its holder (kill -9 leaves nothing stale). A second process
    gets ConfigError (exit 2) at once, naming the holder's pid and host. Re-entrant within one
    process (an update runs a Supervisor inside its own lock)."""
    import fcntl
    import socket

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(out)
        fd = None if key in _held else os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:  # in RunDir.prepare's words: the run would refuse it there anyway
        if exc.errno == errno.ENOSPC:
            raise RunFailure(f"the output disk is full ({out}): free space and run the same command again; "
                             "completed shards are kept") from None
        raise ConfigError(f"output directory {out} is not writable: {exc.strerror or exc} "
                          "(config key output.dir / --output)") from None
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        for attempt in range(6):  # a reader's probe (lock_holder) holds a shared lock for microseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 5:
                    raise
                time.sleep(0.04)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"output directory {out} is in use: {holder} holds it. Two processes on one output "
                          "would corrupt it: wait for that one to finish (or stop it), or choose another --output; "
                          "`clip-pipeline inspect` reads it meanwhile") from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"clip-pipeline {what}, pid {os.getpid()} on host {socket.gethostname()} since {now_iso()}\n"
              .encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no holder: an output's bytes do not depend on who last ran it
        os.close(fd)  # releases the lock; the file stays (deleting it would race the next taker)


def lock_holder(out: str | os.PathLike) -> str | None:
    """Who holds the output's lock now ("clip-pipeline run, pid P on host H since T"), or None.
    Probes without blocking and without writing anything (inspect and search take no lock)."""
    import fcntl

    path = Path(out) / LOCK
    if os.path.realpath(Path(out)) in _held:
        return None  # this process
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
    except OSError:
        return None
    finally:
        os.close(fd)  # a shared lock we got goes with the descriptor
    return None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -- inputs added by `run --update` (pipeline/run/update.py) -----------------------------------------

def expected_shards(manifest: dict) -> list[int] | None:
    """The shards a run with this manifest holds when complete: those of its own listing, then
    those of every update it lists; None while its listing is not finished."""
    inputs, counts = manifest.get("inputs") or {}, manifest.get("counts") or {}
    if not inputs.get("listing_complete") or counts.get("total") is None or inputs.get("listed") is None:
        return None
    size = int(manifest.get("shard_size") or (manifest.get("fingerprint") or {}).get("shard_size") or 1)
    shards = set(range(-(-int(inputs["listed"]) // size)))
    for u in manifest.get("updates") or []:
        shards.update(update_shard_range({**u, "shard_size": size}))
    return sorted(shards)


def update_shard_range(rec: dict) -> range:
    """The shards an update record's inputs occupy: first_shard on, one per shard_size inputs."""
    if rec.get("first_shard") is None:
        return range(0)
    n = -(-int(rec.get("added", 0)) // int(rec["shard_size"]))
    return range(int(rec["first_shard"]), int(rec["first_shard"]) + n)


def _shifted_failure(line: bytes, id_shift: int) -> bytes:
    """A .failures.jsonl line with its input id shifted (an update's shard published after the run's)."""
    f = json.loads(line)
    rec = Failure(int(f["id"]) + id_shift, f["path"], f["reason"], f["message"], f.get("stage", "")).record()
    return json.dumps(rec, sort_keys=True).encode() + b"\n"


def records(out: str | os.PathLike) -> list[dict]:
    """The update records of an output (OUT/updates/u-NNNN.json), oldest first."""
    d = Path(out) / UPDATES
    if not d.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(d.glob("u-[0-9]*.json"))]


def listed_inputs(out: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(id, path) of every input an output lists: the run's listing, then each published update's."""
    out = Path(out)
    listing = out / LISTING
    if listing.exists():
        with open(listing, "rb") as fh:
            for i, line in enumerate(fh):
                yield i, parse_listing_line(line)
    for rec in records(out):
        if not rec.get("published"):
            continue
        with open(out / UPDATES / rec["listing"], "rb") as fh:
            for j, line in enumerate(fh):
                yield rec["first_id"] + j, parse_listing_line(line)


def recorded_inputs(out: str | os.PathLike) -> Iterator[bytes]:
    """The listed inputs that no update has recorded as removed since (what a re-walk is compared with)."""
    gone: set[bytes] = set()
    for rec in records(out):
        p = Path(out) / UPDATES / rec.get("removed", "")
        if rec.get("published") and p.is_file():
            gone.update(pathcodec.decode(line) for line in p.read_text(encoding="utf-8").splitlines() if line)
    for _i, path in listed_inputs(out):
        if path not in gone:
            yield path
