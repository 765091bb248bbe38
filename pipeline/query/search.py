"""Exact top-k search by inner product over a run's memory-mapped shards, in chunks.

The embeddings are never loaded whole: each shard is read `block_rows` rows at a time (float16
shards are widened to float32 one block at a time), scored against every query with one matrix
product, and merged into a running top-k per query. Rows are read with positioned reads from the
shard file (not through the page mapping), so the process's resident memory stays at a few
blocks whatever the size of the output. Embeddings are L2-normalised by default
(output.normalize), so the inner product is the cosine similarity.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.rundir import RunDir
from pipeline.output import load_embeddings

BLOCK_ROWS = 16384
_NO_ROW = np.iinfo(np.int64).max  # index of an empty result slot (fewer than k rows in all)


def iter_blocks(arr: np.ndarray, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 block) over `arr` ([rows, dim], an np.memmap or an ordinary array).

    An np.memmap of a file is read with os.preadv into a reused buffer, so the pages read do not
    stay mapped into this process (its RSS does not grow with the shard size).
    """
    n, dim = arr.shape
    if n == 0:
        return
    filename = getattr(arr, "filename", None)
    if isinstance(arr, np.memmap) and filename and arr.flags.c_contiguous:
        raw = np.empty((min(block_rows, n), dim), dtype=arr.dtype)
        row_bytes = dim * arr.dtype.itemsize
        fd = os.open(filename, os.O_RDONLY)
        try:
            for a in range(0, n, block_rows):
                b = min(n, a + block_rows)
                view = raw[:b - a]
                want = (b - a) * row_bytes
                got = os.preadv(fd, [memoryview(view).cast("B")], arr.offset + a * row_bytes)
                if got != want:
                    raise OSError(f"{filename}: short read ({got} of {want} bytes); is the shard truncated?")
                yield a, view if view.dtype == np.float32 else view.astype(np.float32)
        finally:
            os.close(fd)
    else:
        for a in range(0, n, block_rows):
            yield a, np.asarray(arr[a:a + block_rows], dtype=np.float32)


def _merge(best_s: np.ndarray, best_i: np.ndarray, scores: np.ndarray, base: int, k: int) -> None:
    """Merge one block's scores [q, c] (rows base..base+c) into the running top-k, in place.

    Only scores above each query's current k-th best are looked at (after the first blocks there
    are few), so the cost per block is one comparison pass instead of a partition.
    """
    q, c = scores.shape
    above = scores > best_s[:, -1:]
    counts = np.count_nonzero(above, axis=1)
    most = int(counts.max()) if q else 0
    if most == 0:
        return
    if most > 4 * k:  # many candidates (first block, or sorted data): partition the block instead
        kk = min(k, c)
        cols = np.argpartition(scores, c - kk, axis=1)[:, c - kk:]
        cand_s = np.take_along_axis(scores, cols, axis=1)
        cand_i = cols.astype(np.int64) + base
    else:
        qi, ci = np.nonzero(above)  # row-major: grouped by query, in column order
        start = np.cumsum(counts) - counts
        rank = np.arange(qi.size) - start[qi]
        cand_s = np.full((q, most), -np.inf, dtype=np.float32)
        cand_i = np.full((q, most), _NO_ROW, dtype=np.int64)
        cand_s[qi, rank] = scores[qi, ci]
        cand_i[qi, rank] = ci.astype(np.int64) + base
    all_s = np.concatenate([best_s, cand_s], axis=1)
    all_i = np.concatenate([best_i, cand_i], axis=1)
    order = np.lexsort((all_i, -all_s), axis=1)[:, :k]  # best score first; ties: lower row first
    best_s[:] = np.take_along_axis(all_s, order, axis=1)
    best_i[:] = np.take_along_axis(all_i, order, axis=1)


def exact_topk(parts: Iterable[np.ndarray], queries: np.ndarray, k: int,
               block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows by inner product for each query, over arrays concatenated in order.

    `parts`: [rows_i, dim] arrays (memmaps are read block by block); `queries`: [q, dim].
    Returns (scores [q, k'] float32, rows [q, k'] int64, global row numbers), best first, with
    k' = min(k, total rows). Ties are broken towards the lower row.
    """
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q, dim = queries.shape
    best_s = np.full((q, k), -np.inf, dtype=np.float32)
    best_i = np.full((q, k), _NO_ROW, dtype=np.int64)
    offset = 0
    for part in parts:
        if part.shape[0] == 0:
            continue
        if part.ndim != 2 or part.shape[1] != dim:
            raise ValueError(f"queries have {dim} dimensions but the embeddings have {part.shape[1:]}")
        for a, block in iter_blocks(part, block_rows):
            scores = queries @ block.T  # [q, c]: one GEMM per block (BLAS reads block.T in place)
            _merge(best_s, best_i, scores, offset + a, k)
        offset += part.shape[0]
    found = min(k, offset)
    return best_s[:, :found], best_i[:, :found]


def brute_force_topk(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: all scores in memory, a full sort (for tests and small arrays)."""
    scores = np.atleast_2d(queries).astype(np.float32) @ np.asarray(emb, dtype=np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order.astype(np.int64)


# -- searching a run's output ------------------------------------------------------------------

@dataclass
class Hit:
    row: int
    path: str
    score: float


@dataclass
class SearchResult:
    hits: list[list[Hit]]  # one list per query, best first
    rows_searched: int
    notes: list[str] = field(default_factory=list)


def run_status_notes(out: str | os.PathLike, manifest: dict, rows: int) -> list[str]:
    """Say when an output is not complete, so that a search of it is not taken for a full one."""
    status = manifest.get("status", "unknown")
    if status == "complete":
        return []
    counts = manifest.get("counts") or {}
    total = counts.get("total")
    listed = (manifest.get("inputs") or {}).get("listed")
    of = f"{total:,} inputs" if isinstance(total, int) and total else (
        f"at least {listed:,} listed inputs" if isinstance(listed, int) and listed else "an unknown number of inputs")
    return [f"{out} is an incomplete run (status: {status}); searched the {rows:,} embeddings of its completed "
            f"shards, out of {of}. Finish it with `clip-pipeline run` on the same config to search everything."]


def search_out(out: str | os.PathLike, queries: np.ndarray, k: int = 10,
               block_rows: int = BLOCK_ROWS) -> SearchResult:
    """Exact top-k over OUT's completed shards (see load_embeddings); paths attached to each hit."""
    paths, emb = load_embeddings(out)
    manifest = RunDir(out).read_manifest() or {}
    if emb.shape[0] and np.atleast_2d(queries).shape[1] != emb.shape[1]:
        raise ValueError(f"the queries have {np.atleast_2d(queries).shape[1]} dimensions but {out} holds "
                         f"{emb.shape[1]}-dimensional embeddings")
    scores, rows = exact_topk(emb.chunks(), queries, k, block_rows)
    hits = [[Hit(int(r), paths[r], float(s)) for s, r in zip(srow, rrow, strict=True)]
            for srow, rrow in zip(scores, rows, strict=True)]
    return SearchResult(hits, emb.shape[0], run_status_notes(out, manifest, emb.shape[0]))
