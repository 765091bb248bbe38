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

Shard k holds input ids [k*shard_size, (k+1)*shard_size). A shard is complete iff its .npy
exists: companions are renamed into place first, the .npy last; temporary files are hidden
(dot-prefixed) and removed on the next start. The Python API to read a run is pipeline/output.py.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError, RunFailure
from pipeline.wire import pathcodec

if TYPE_CHECKING:
    pass

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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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
        done_shards = self.completed_shards()
        if not manifest:
            self.listing.unlink(missing_ok=True)
        return PriorRun(manifest, listing_complete, done_shards, damaged)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest, manifest)

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
    out.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(out)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
