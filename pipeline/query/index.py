"""`clip-pipeline index OUT`: a faiss index over a run's embeddings, with its row -> path mapping.

faiss-cpu is an optional extra (`pip install 'clip-pipeline[index]'`). The index lives in
OUT/index/ (or --index-dir):

    index.faiss   the faiss index (inner-product metric; row r of the index = row r of the run)
    index.paths   one input path per row, the same line format as the shards' .paths files
    index.json    kind, factory string, rows, dim, shards covered, model sha256, nprobe, the
                  recall@10 against exact search measured at build time, build time

Kinds: `flat` (IndexFlatIP: exact, holds every vector as float32 in memory), `ivf-pq`
(IVF<nlist>,PQ<m>: an inverted file of product-quantised codes, m = dim/16 bytes per vector, approximate),
`auto` (flat up to AUTO_FLAT_MAX_ROWS rows, ivf-pq above). Searching an ivf-pq index re-scores
RERANK_FACTOR x k candidates exactly from the memory-mapped shards (the codes only rank them).
Vectors are added in blocks straight from the memory-mapped shards. For outputs too large for one machine's build, see the README
("Very large outputs: autofaiss"), which reads OUT/embeddings/*.npy directly.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.data.rundir import RunDir, atomic_write_bytes, atomic_write_json, decode_path_line
from pipeline.output import ShardedArray, iter_shards, load_embeddings
from pipeline.query.search import BLOCK_ROWS, Hit, SearchResult, exact_topk, iter_blocks, run_status_notes
from pipeline.run.featurize import manifest_of

INDEX_DIR = "index"
AUTO_FLAT_MAX_ROWS = 200_000
RECALL_QUERIES = 100
RECALL_K = 10
DEFAULT_NPROBE = 32
RERANK_FACTOR = 10  # ivf-pq: candidates per wanted result, re-scored exactly from the shards
IVFPQ_MIN_ROWS = 256 * 39  # faiss wants >= 39 training points per centroid; PQ has 256 per sub-quantiser


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError("the faiss library is not installed: pip install 'clip-pipeline[index]' "
                          "(installs faiss-cpu), or search without --index (exact scan)") from None
    return faiss


def index_dir(out: str | os.PathLike, where: str | os.PathLike | None = None) -> Path:
    return Path(where) if where else Path(out) / INDEX_DIR


def ivfpq_params(n: int, dim: int, nlist: int | None = None) -> tuple[int, int]:
    """(nlist, m) for n vectors: about sqrt(n) inverted lists (faiss's guidelines say 4-16 sqrt(n) for
    the best speed at a given recall; sqrt(n) trains 4x faster on small machines, and a larger
    nprobe makes up the recall), each with >= 39 training points, and m = dim/16 one-byte
    sub-quantisers (dim/16 bytes per vector; faiss trains 8-dim sub-quantisers (m = dim/8) over
    10x slower, measured with faiss-cpu 1.15)."""
    nlist = max(1, min(nlist or int(math.sqrt(n)), n // 39))
    m = next(c for c in (dim // 16, dim // 8, dim // 32, 8, 4, 2, 1) if c >= 1 and dim % c == 0)
    return nlist, m


def rerank(emb: Any, queries: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query's candidate rows (read from the shards: `emb` is the run's
    ShardedArray), best k first; (scores [q, k], rows [q, k]), -1 rows where fewer candidates."""
    q = len(queries)
    out_s = np.full((q, k), -np.inf, dtype=np.float32)
    out_i = np.full((q, k), -1, dtype=np.int64)
    for j in range(q):
        rows = np.unique(cand[j][cand[j] >= 0])
        if rows.size == 0:
            continue
        sc = np.asarray(emb[rows], dtype=np.float32) @ queries[j]
        order = np.lexsort((rows, -sc))[:k]
        out_s[j, :order.size], out_i[j, :order.size] = sc[order], rows[order]
    return out_s, out_i


def _shard_parts(out: str | os.PathLike) -> tuple[list[str], Any, list[int], dict]:
    manifest = manifest_of(out)
    paths, emb = load_embeddings(out)
    shards = [s.index for s in iter_shards(out)]
    return paths, emb, shards, manifest


def build_index(out: str | os.PathLike, kind: str = "auto", where: str | os.PathLike | None = None,
                nprobe: int = DEFAULT_NPROBE, nlist: int | None = None, seed: int = 0, log=print) -> dict[str, Any]:
    """Build, measure (recall@10 vs exact on sample rows) and save the index; returns index.json's dict."""
    faiss = import_faiss()
    paths, emb, shards, manifest = _shard_parts(out)
    n, dim = emb.shape
    if n == 0:
        raise ConfigError(f"{out} has no embeddings yet (no completed shard); run it first")
    if kind == "auto":
        kind = "flat" if n <= AUTO_FLAT_MAX_ROWS else "ivf-pq"
    t0 = time.perf_counter()
    if kind == "flat":
        factory = "Flat"
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf-pq":
        if n < IVFPQ_MIN_ROWS:
            raise ConfigError(f"{out} has {n:,} embeddings, too few to train an ivf-pq index (at least "
                              f"{IVFPQ_MIN_ROWS:,}: 39 points per PQ centroid); use --kind flat, which is exact")
        nlist, m = ivfpq_params(n, dim, nlist)
        factory = f"IVF{nlist},PQ{m}"
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        n_train = min(n, max(64 * nlist, IVFPQ_MIN_ROWS), 500_000)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
        log(f"Training {factory} on {n_train:,} of {n:,} vectors...")
        index.train(np.ascontiguousarray(emb[rows], dtype=np.float32))
    else:
        raise ConfigError(f"unknown index kind {kind!r}: flat, ivf-pq or auto")
    for part in emb.chunks():
        for _, block in iter_blocks(part, BLOCK_ROWS):
            index.add(np.ascontiguousarray(block))
    build_s = time.perf_counter() - t0
    if hasattr(index, "nprobe"):
        index.nprobe = min(nprobe, index.nlist)
    # recall@10 against the exact scan, on sample rows of the data as queries
    qrows = np.sort(np.random.default_rng(seed + 1).choice(n, size=min(RECALL_QUERIES, n), replace=False))
    queries = np.asarray(emb[qrows], dtype=np.float32)
    k = min(RECALL_K, n)
    _, exact = exact_topk(emb.chunks(), queries, k)
    def recall_of(found: np.ndarray) -> float:
        return float(np.mean([len(set(a[:k]) & set(e)) / k for a, e in zip(found, exact, strict=True)]))

    _, approx = index.search(queries, min(n, k * (RERANK_FACTOR if kind != "flat" else 1)))
    codes_only = recall_of(approx)
    recall = recall_of(rerank(emb, queries, approx, k)[1]) if kind != "flat" else codes_only
    d = index_dir(out, where)
    d.mkdir(parents=True, exist_ok=True)
    info = {
        "kind": kind, "factory": factory, "metric": "inner_product", "rows": n, "dim": dim,
        "dtype_source": str(emb.dtype), "shards": shards, "run_status": manifest.get("status"),
        "model_sha256": (manifest.get("model") or {}).get("sha256"),
        "nprobe": int(getattr(index, "nprobe", 0)) or None,
        "recall_at_10": recall, "recall_at_10_codes_only": codes_only, "recall_queries": int(len(qrows)),
        "rerank_factor": RERANK_FACTOR if kind != "flat" else None,
        "build_s": round(build_s, 3), "faiss_version": getattr(faiss, "__version__", "?"),
        "synthetic_weights": bool(manifest.get("synthetic_weights")),
    }
    tmp = d / ".index.faiss.tmp"
    faiss.write_index(index, str(tmp))
    atomic_write_bytes(d / "index.paths", "".join(p + "\n" for p in paths).encode("utf-8"))  # text forms, as .paths
    os.replace(tmp, d / "index.faiss")
    atomic_write_json(d / "index.json", info)
    return info


def load_index(out: str | os.PathLike, where: str | os.PathLike | None = None) -> tuple[Any, list[str], dict]:
    faiss = import_faiss()
    d = index_dir(out, where)
    if d.suffix == ".faiss":  # --index-file pointing at the .faiss itself
        d = d.parent
    if not (d / "index.faiss").exists() or not (d / "index.json").exists():
        raise ConfigError(f"no index in {d} (index.faiss, index.json): build one with `clip-pipeline index {out}`")
    info = json.loads((d / "index.json").read_text())
    paths = [decode_path_line(line) for line in (d / "index.paths").read_bytes().splitlines()]
    index = faiss.read_index(str(d / "index.faiss"))
    if index.ntotal != len(paths) or index.ntotal != info.get("rows"):
        raise ConfigError(f"the index in {d} is damaged ({index.ntotal} vectors, {len(paths)} paths); "
                          f"rebuild it with `clip-pipeline index {out}`")
    return index, paths, info


class OpenIndex:
    """A run's faiss index, loaded and checked once, for many searches (`search --index` opens one per
    call; `serve` keeps one per run). For an approximate index, RERANK_FACTOR x k candidates are
    re-scored exactly from the shards the index was built from (scores are then true inner products)."""

    def __init__(self, out: str | os.PathLike, where: str | os.PathLike | None = None):
        self.out, self.where = out, where
        self.manifest = manifest_of(out)
        self.index, self.paths, self.info = load_index(out, where)
        want = (self.manifest.get("model") or {}).get("sha256")
        if self.info.get("model_sha256") and want and self.info["model_sha256"] != want:
            raise ConfigError(f"the index in {index_dir(out, where)} was built from another run (model sha256 "
                              f"{self.info['model_sha256'][:12]}, {out} has {want[:12]}); rebuild it with "
                              f"`clip-pipeline index {out}`")
        self.approximate = self.info.get("kind") != "flat"
        self._rerank_rows: ShardedArray | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def rerank_rows(self) -> ShardedArray:
        """The shards the index was built from (for the exact re-scoring), opened once."""
        if self._rerank_rows is None:
            covered = set(self.info.get("shards") or [])
            parts = [sh.embeddings for sh in iter_shards(self.out) if sh.index in covered]
            if sum(p.shape[0] for p in parts) != self.index.ntotal:
                raise ConfigError(f"the shards the index in {index_dir(self.out, self.where)} was built from changed; "
                                  f"rebuild it with `clip-pipeline index {self.out}` (or search with --no-rerank)")
            self._rerank_rows = ShardedArray(parts)
        return self._rerank_rows

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               exact_rerank: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k'], rows [q, k'], -1 where fewer results), best first. `nprobe` changes the
        index's setting (not for concurrent callers with different values)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.index.d:
            raise ConfigError(f"the queries have {queries.shape[1]} dimensions but the index holds {self.index.d}")
        if nprobe and hasattr(self.index, "nprobe"):
            self.index.nprobe = nprobe
        if self.approximate and exact_rerank:
            rows = self.rerank_rows()
            _, cand = self.index.search(queries, min(k * RERANK_FACTOR, self.ntotal))
            return rerank(rows, queries, cand, min(k, self.ntotal))
        return self.index.search(queries, min(k, self.ntotal))

    def notes(self, exact_rerank: bool = True) -> list[str]:
        """What a reader of the results should know: a stale or partial index, approximate scores."""
        out, info, notes = self.out, self.info, []
        now = RunDir(out).completed_shards()
        if now != info.get("shards"):
            notes.append(f"the index covers {len(info.get('shards') or [])} shards ({info.get('rows'):,} rows) but {out} "
                         f"now has {len(now)} completed shards; rebuild it with `clip-pipeline index {out}` to search "
                         "them all")
        elif info.get("run_status") != "complete":
            notes += run_status_notes(out, {**self.manifest, "status": info.get("run_status")}, int(info.get("rows") or 0))
        if self.approximate:
            how = (f"{RERANK_FACTOR} x k candidates re-scored exactly; recall@10 at build: {info.get('recall_at_10', 0):.3f}"
                   if exact_rerank else f"codes only; recall@10 at build: {info.get('recall_at_10_codes_only', 0):.3f}")
            notes.append(f"approximate search ({info.get('factory')}, nprobe {getattr(self.index, 'nprobe', '-')}, {how}); "
                         "drop --index for the exact scan")
        return notes


def search_index(out: str | os.PathLike, queries: np.ndarray, k: int = 10,
                 where: str | os.PathLike | None = None, nprobe: int | None = None,
                 exact_rerank: bool = True) -> SearchResult:
    """Search OUT's faiss index once (see OpenIndex), paths attached to each hit."""
    opened = OpenIndex(out, where)
    scores, rows = opened.search(queries, k, nprobe=nprobe, exact_rerank=exact_rerank)
    hits = [[Hit(int(r), opened.paths[r], float(s)) for s, r in zip(srow, rrow, strict=True) if r >= 0]
            for srow, rrow in zip(scores, rows, strict=True)]
    return SearchResult(hits, opened.ntotal, opened.notes(exact_rerank))
