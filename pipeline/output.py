"""The Python API to read a run's output: `load_embeddings`, `iter_shards`, `ShardedArray`,
`read_manifest`, `listed_inputs`, `shard_metadata_path`.

One door each way: reading a run goes through here, writing one through pipeline/data/rundir.py
(its layout, formats and atomic writes: the only module that spells the layout's file names).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.rundir import PARQUET_SUFFIX, RunDir, completed_shards
from pipeline.data.rundir import listed_inputs as listed_inputs  # (id, path) of every input, updates too
from pipeline.data.rundir import read_manifest as read_manifest  # the run's manifest.json, None if absent

# -- reading a run's output -------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    index: int
    embeddings: np.ndarray  # memory-mapped [rows, dim]
    paths: list[str]
    failures: list[dict]


def _shard(out_dir: Path, k: int, mmap: bool = True) -> Shard:
    return Shard(k, *RunDir(out_dir).read_shard(k, mmap))


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


def shard_metadata_path(out_dir: str | os.PathLike, k: int) -> Path:
    """Where shard k's per-shard metadata parquet lies (`output.metadata`); it may not exist."""
    return RunDir(out_dir).shard_companion(k, PARQUET_SUFFIX)


def load_embeddings(out_dir: str | os.PathLike) -> tuple[list[str], ShardedArray]:
    """All paths and embeddings of a run, in input order: (paths, ShardedArray [n, dim]).

    The array is always a lazily concatenated view over the memory-mapped shard files (even for
    a one-shard run), so opening a run of any size costs only the paths list; index it or call
    np.asarray() to read rows. Row i is the embedding of paths[i]; failed inputs have no row
    (see iter_shards / failures.jsonl).
    """
    out = Path(out_dir)
    if read_manifest(out) is None:
        raise FileNotFoundError(f"{out} holds no clip-pipeline run (no {RunDir(out).manifest.name})")
    shards = list(iter_shards(out))
    paths = [p for s in shards for p in s.paths]
    dtype = (read_manifest(out) or {}).get("config", {}).get("output", {}).get("dtype", "float32")
    return paths, ShardedArray([s.embeddings for s in shards], dim=0, dtype=dtype)

