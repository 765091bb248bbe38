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

import click
import numpy as np

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
    from pipeline.output import load_embeddings, read_manifest

    paths, emb = load_embeddings(out)
    manifest = read_manifest(out) or {}
    if emb.shape[0] and np.atleast_2d(queries).shape[1] != emb.shape[1]:
        raise ValueError(f"the queries have {np.atleast_2d(queries).shape[1]} dimensions but {out} holds "
                         f"{emb.shape[1]}-dimensional embeddings")
    scores, rows = exact_topk(emb.chunks(), queries, k, block_rows)
    hits = [[Hit(int(r), paths[r], float(s)) for s, r in zip(srow, rrow, strict=True)]
            for srow, rrow in zip(scores, rows, strict=True)]
    return SearchResult(hits, emb.shape[0], run_status_notes(out, manifest, emb.shape[0]))


# -- queries -----------------------------------------------------------------------------------

def load_query_vectors(path: str, dim: int | None) -> np.ndarray:
    """Query vectors from a .npy file ([dim] or [q, dim]); a clear error for anything else."""
    from pipeline.config import ConfigError

    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"--vectors {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--vectors {path}: not a readable .npy array ({exc})") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise ConfigError(f"--vectors {path}: expected a numeric [dim] or [queries, dim] array, got {arr.dtype} {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ConfigError(f"--vectors {path}: the vectors have {arr.shape[1]} dimensions, the output's embeddings {dim}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ConfigError(f"--vectors {path}: the array holds NaN or infinite values")
    return arr


def embed_query_images(out: str, images: list[str], *, model: str | None = None, devices: tuple = (),
                       log=None) -> np.ndarray:
    """Embed query images with OUT's model, backend and preprocessing (the normal pipeline)."""
    import tempfile

    from pipeline.config import ConfigError
    from pipeline.featurize import embed_inputs, query_config

    for p in images:
        if not os.path.exists(p):
            raise ConfigError(f"query image {p} does not exist (--image)")
        if os.path.isdir(p):
            raise ConfigError(f"query image {p} is a directory; give image files (--image, repeatable)")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"query image {p} cannot be read (permission denied) (--image)")
    cfg, _ = query_config(out, model=model, devices=devices)
    with tempfile.TemporaryDirectory(prefix="clipp-query-") as tmp:
        res = embed_inputs(cfg, list(images), os.path.join(tmp, "out"))
    if res.failures:
        f = res.failures[0]
        raise ConfigError(f"query image {os.fsdecode(f.get('path', '?'))} cannot be used: {f.get('reason')} "
                          f"({f.get('message', '')}); give a readable JPEG/PNG/... image (--image)")
    return res.embeddings


def _print_text(result: SearchResult, labels: list[str]) -> None:
    for label, hits in zip(labels, result.hits, strict=True):
        click.echo(f"# {label}")
        for rank, h in enumerate(hits, 1):
            click.echo(f"{rank:3d}  {h.score:+.4f}  {h.path}")


@click.command("search", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("out", type=click.Path(exists=False))
@click.option("--image", "images", multiple=True, metavar="PATH",
              help="Query image (repeatable), embedded with OUT's model, backend and preprocessing.")
@click.option("--vectors", metavar="Q.npy", help="Query vectors, [dim] or [queries, dim] (.npy), used as given.")
@click.option("-k", "--top", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Results per query.")
@click.option("--index", "use_index", is_flag=True,
              help="Search the faiss index built by `clip-pipeline index OUT` instead of the exact scan.")
@click.option("--index-file", "index_path", metavar="FILE", default=None,
              help="The index file, when it is not OUT's default (implies --index).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="IVF indexes: lists visited per query.")
@click.option("--model", metavar="PATH", help="Model file, when it moved since OUT was made (must be the same model).")
@click.option("-d", "--device", "devices", multiple=True, metavar="DEV", help="Device for embedding queries (default: OUT's).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def search_cmd(out, images, vectors, k, use_index, index_path, nprobe, model, devices, as_json) -> None:
    """Top-k nearest embeddings in OUT to each query, by inner product (cosine for normalised runs).

    Exact by default: a chunked scan of the memory-mapped shards that never loads the whole
    array. A run that is not complete is searched as far as its completed shards go, with a
    note on stderr. Exit status: 0 results printed; 2 bad usage or input.
    """
    import json
    import sys

    from pipeline.config import ConfigError
    from pipeline.featurize import manifest_of

    def fail(msg: str) -> None:
        click.echo(f"error: {msg}", err=True)
        sys.exit(2)

    if not images and not vectors:
        fail("give at least one query: --image PATH (repeatable) or --vectors Q.npy")
    try:
        if not os.path.isdir(out):
            raise ConfigError(f"{out} is not a directory: give the output directory of a run")
        manifest = manifest_of(out)
        dim = None
        parts, labels = [], []
        if images:
            parts.append(embed_query_images(out, list(images), model=model, devices=devices))
            labels += [f"image {p}" for p in images]
            dim = parts[-1].shape[1]
        if vectors:
            v = load_query_vectors(vectors, dim)
            parts.append(v)
            labels += [f"vector {i} of {vectors}" for i in range(len(v))]
        queries = np.concatenate(parts)
        if use_index or index_path:
            from pipeline.index import search_index

            result = search_index(out, queries, k, index_path, nprobe=nprobe)
        else:
            result = search_out(out, queries, k)
    except ConfigError as exc:
        fail(str(exc))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if manifest.get("synthetic_weights"):
        click.echo("note: OUT was made with SYNTHETIC random weights: the similarities carry no meaning.", err=True)
    if as_json:
        click.echo(json.dumps({
            "out": str(out), "rows_searched": result.rows_searched, "notes": result.notes,
            "exact": not (use_index or index_path),
            "queries": [{"query": lab, "hits": [{"rank": r, "row": h.row, "path": h.path, "score": h.score}
                                                for r, h in enumerate(hits, 1)]}
                        for lab, hits in zip(labels, result.hits, strict=True)],
        }, indent=2))
    else:
        _print_text(result, labels)

