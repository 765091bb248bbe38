"""Output directory layout, atomic writes, and the Python API to read a run's output.

    OUT/manifest.json                      config, model identity, counts, shards, status
    OUT/listing.jsonl                      the input listing: line i = JSON string of input id i
    OUT/embeddings/part-NNNNN.npy          [rows, dim] float32/float16, sorted by input id
    OUT/embeddings/part-NNNNN.paths        one input path per row, UTF-8 text form (pipeline/pathcodec.py)
    OUT/embeddings/part-NNNNN.failures.jsonl  failed inputs of the shard's id range
    OUT/failures.jsonl                     all failures, by id (rebuilt at the end of a run)
    OUT/report.json                        throughput, per-stage stats, failures by reason
    OUT/embeddings.pkl                     optional: {'img_path': [...], 'embedding': ndarray}

Shard k holds input ids [k*shard_size, (k+1)*shard_size). A shard is complete iff its .npy
exists: companions are renamed into place first, the .npy last; temporary files are hidden
(dot-prefixed) and removed on the next start.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import pathcodec

EMB_DIR = "embeddings"


def shard_name(k: int) -> str:
    return f"part-{k:05d}"


def encode_path_line(path: bytes) -> bytes:
    """One line of a .paths file: the name's one-line UTF-8 text form (pipeline/pathcodec.py)."""
    return pathcodec.encode(path).encode("utf-8")


def decode_path_line(line: bytes) -> str:
    """A .paths line as the str the reading API returns: the text form (pathcodec.decode gives the bytes)."""
    return line.decode("utf-8")


def listing_line(path: bytes) -> bytes:
    """Line i of listing.jsonl: the JSON string of input i's text form (pure ASCII, no lone surrogates)."""
    return json.dumps(pathcodec.encode(path)).encode("ascii") + b"\n"


def parse_listing_line(line: bytes) -> bytes:
    return pathcodec.decode(json.loads(line))


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


def write_shard(out_dir: str | os.PathLike, k: int, paths: list[bytes], emb: np.ndarray,
                failures: list[dict], companions: dict[str, bytes] | None = None) -> None:
    """Write shard k atomically: .paths, .failures.jsonl and any `companions` (suffix -> bytes,
    e.g. ".parquet" metadata) first, the .npy (completion) last."""
    d = Path(out_dir) / EMB_DIR
    name = shard_name(k)
    tmps: list[tuple[Path, Path]] = []
    try:
        for suffix, data in (
            (".paths", b"".join(encode_path_line(p) + b"\n" for p in paths)),
            (".failures.jsonl", b"".join(json.dumps(f, sort_keys=True).encode() + b"\n" for f in failures)),
            *(companions or {}).items(),
            (".npy", npy_bytes(emb)),
        ):
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
        (d / f".{name}.npy.tmp").unlink(missing_ok=True)
        raise


def completed_shards(out_dir: str | os.PathLike) -> list[int]:
    d = Path(out_dir) / EMB_DIR
    if not d.is_dir():
        return []
    ks = []
    for p in d.glob("part-*.npy"):
        try:
            k = int(p.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if (d / f"{p.stem}.paths").exists() and (d / f"{p.stem}.failures.jsonl").exists():
            ks.append(k)
    return sorted(ks)


def remove_temp_files(out_dir: str | os.PathLike) -> None:
    for d in (Path(out_dir), Path(out_dir) / EMB_DIR):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    p = Path(out_dir) / "manifest.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None


# -- reading a run's output -------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    index: int
    embeddings: np.ndarray  # memory-mapped [rows, dim]
    paths: list[str]
    failures: list[dict]


def _shard(out_dir: Path, k: int, mmap: bool = True) -> Shard:
    d = out_dir / EMB_DIR
    name = shard_name(k)
    emb = np.load(d / f"{name}.npy", mmap_mode="r" if mmap else None)
    paths = [decode_path_line(line) for line in (d / f"{name}.paths").read_bytes().splitlines()]
    fails = [json.loads(line) for line in (d / f"{name}.failures.jsonl").read_text().splitlines() if line]
    return Shard(k, emb, paths, fails)


def iter_shards(out_dir: str | os.PathLike) -> Iterator[Shard]:
    """Yield the completed shards of a run, in id order (embeddings memory-mapped).

    Each Shard has `.index`, `.embeddings` (np.memmap [rows, dim]), `.paths` (one per row) and
    `.failures` (the failed inputs of the shard's id range, as dicts with id, path, reason, message).
    """
    out = Path(out_dir)
    for k in completed_shards(out):
        yield _shard(out, k)


class ShardedArray:
    """A read-only [n, dim] array over the memory-mapped shard files of a run, concatenated lazily.

    Nothing is read until it is indexed: `emb[i]`, `emb[a:b]`, `emb[[i, j]]`, `emb[mask]` and
    `emb[rows, cols]` read only the rows they touch and return ordinary numpy arrays.
    `np.asarray(emb)` (or any numpy function given `emb`) loads everything into memory;
    `emb.chunks()` walks it shard by shard without doing so; `emb.shards` are the np.memmap parts.
    """

    def __init__(self, parts: list[np.ndarray], dim: int = 0, dtype: Any = np.float32):
        self.shards = [p for p in parts if p.shape[0]]
        widths = {p.shape[1] for p in self.shards}
        if len(widths) > 1:
            raise ValueError(f"shards have different embedding widths: {sorted(widths)}")
        self.dtype = np.dtype(self.shards[0].dtype if self.shards else (parts[0].dtype if parts else dtype))
        dim = widths.pop() if widths else (parts[0].shape[1] if parts else dim)
        self._starts = np.cumsum([0] + [p.shape[0] for p in self.shards])
        self.shape = (int(self._starts[-1]), int(dim))

    ndim = 2

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.shards)})"

    def chunks(self) -> Iterator[np.ndarray]:
        """The rows in order, one memory-mapped shard at a time."""
        yield from self.shards

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        n = self.shape[0]
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        out = np.empty((idx.size, self.shape[1]), dtype=self.dtype)
        which = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.shards[s][idx[sel] - self._starts[s]]
        return out

    def __getitem__(self, key: Any) -> Any:
        cols: Any = slice(None)
        if isinstance(key, tuple):
            if len(key) > 2:
                raise IndexError("too many indices for a 2-d array")
            key, cols = key if len(key) == 2 else (key[0], slice(None))
        if isinstance(key, (int, np.integer)):
            return self._rows(np.array([key]))[0][cols]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step == 1:  # contiguous: copy whole slices of each shard
                parts = []
                for s, part in enumerate(self.shards):
                    lo, hi = max(start, self._starts[s]), min(stop, self._starts[s + 1])
                    if lo < hi:
                        parts.append(part[lo - self._starts[s]:hi - self._starts[s]])
                rows = np.concatenate(parts) if parts else np.empty((0, self.shape[1]), self.dtype)
                return rows[:, cols]
            return self._rows(np.arange(start, stop, step))[:, cols]
        if key is Ellipsis:
            return np.asarray(self)[:, cols]
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (self.shape[0],):
                raise IndexError(f"boolean index of shape {idx.shape} does not match {self.shape[0]} rows")
            idx = np.flatnonzero(idx)
        return self._rows(idx.astype(np.int64).ravel()).reshape(*idx.shape, self.shape[1])[..., cols]

    def __iter__(self) -> Iterator[np.ndarray]:
        for part in self.shards:
            yield from part

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[0:self.shape[0]]
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def astype(self, dtype: Any) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    def __matmul__(self, other: Any) -> np.ndarray:
        """emb @ q, shard by shard (e.g. cosine scores against query vectors)."""
        other = np.asarray(other)
        res = [np.asarray(part) @ other for part in self.shards]
        if res:
            return np.concatenate(res)
        return np.zeros((0, *other.shape[1:]), dtype=np.result_type(self.dtype, other.dtype))


def load_embeddings(out_dir: str | os.PathLike) -> tuple[list[str], ShardedArray]:
    """All paths and embeddings of a run, in input order: (paths, ShardedArray [n, dim]).

    The array is always a lazily concatenated view over the memory-mapped shard files (even for
    a one-shard run), so opening a run of any size costs only the paths list; index it or call
    np.asarray() to read rows. Row i is the embedding of paths[i]; failed inputs have no row
    (see iter_shards / failures.jsonl).
    """
    out = Path(out_dir)
    if read_manifest(out) is None:
        raise FileNotFoundError(f"{out} holds no clip-pipeline run (no manifest.json)")
    shards = list(iter_shards(out))
    paths = [p for s in shards for p in s.paths]
    dtype = (read_manifest(out) or {}).get("config", {}).get("output", {}).get("dtype", "float32")
    return paths, ShardedArray([s.embeddings for s in shards], dim=0, dtype=dtype)


# -- inputs added by `run --update` (pipeline/update.py) -----------------------------------------

UPDATES = "updates"


def records(out: str | os.PathLike) -> list[dict]:
    """The update records of an output (OUT/updates/u-NNNN.json), oldest first."""
    d = Path(out) / UPDATES
    if not d.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(d.glob("u-*.json"))]


def listed_inputs(out: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(id, path) of every input an output lists: the run's listing, then each published update's."""
    out = Path(out)
    listing = out / "listing.jsonl"
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
    from pipeline import pathcodec

    gone: set[bytes] = set()
    for rec in records(out):
        p = Path(out) / UPDATES / rec.get("removed", "")
        if rec.get("published") and p.is_file():
            gone.update(pathcodec.decode(line) for line in p.read_text(encoding="utf-8").splitlines() if line)
    for _i, path in listed_inputs(out):
        if path not in gone:
            yield path
