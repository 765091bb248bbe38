"""The runs a service searches: one `RunIndex` per run directory, opened once, shared by every request.

Queries are embedded by the run's own code: text through the paired text tower (pipeline/text) on
the run's backend, images through the run's decode + crop (pipeline/data/images.py, in the decode
pool) and the run's image model on its backend's device, opened once: in this process, or, for a
device that decodes files itself or runs under another interpreter, in a persistent child
(pipeline/serve/querychild.py) that gets the crop or the uploaded file. The search is
pipeline/search.py's exact chunked scan, or the run's faiss index (pipeline/index.py's OpenIndex)
when `clip-pipeline index` built one that still covers every completed shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.data.images import DecodeOptions
from pipeline.output import ShardedArray, iter_shards, shard_metadata_path
from pipeline.query.index import INDEX_DIR, OpenIndex
from pipeline.query.search import exact_topk, run_status_notes
from pipeline.run.featurize import check_same_model, config_of, manifest_of

DEDUP_THRESHOLD = 0.94  # clip-back's: results this similar to a better one are dropped by `deduplicate`


class QueryError(ValueError):
    """A query this run cannot answer (the message says why); the service answers `status` (400:
    the query's fault; 503: the run's image model failed or cannot be opened)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def query_file(data: bytes):
    """An uploaded image as a private temporary file, for a device that reads files; removed after.
    Named .jpg for JPEG content (a SOPHON JPEG decoder takes only such names), else .png or .img."""
    suffix = ".jpg" if data[:3] == b"\xff\xd8\xff" else ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".img"
    with tempfile.TemporaryDirectory(prefix="clip-serve-query-") as d:  # mode 0700
        path = os.path.join(d, "query" + suffix)
        with open(path, "wb") as fh:
            fh.write(data)
        yield path


def near_duplicates(vectors: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """Which rows (in rank order) to drop: in each group linked by cosine >= threshold, all but the
    best-ranked one (clip-back's connected-components `deduplicate`)."""
    n = len(vectors)
    if n < 2:
        return np.zeros(n, dtype=bool)
    v = np.asarray(vectors, dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    a, b = np.nonzero(np.triu(v @ v.T >= threshold, 1))
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the better-ranked (lower) row stays the root
    return np.array([root(i) != i for i in range(n)])


class RunIndex:
    """One run directory, searchable: its rows, paths, per-shard metadata, index and query encoders."""

    def __init__(self, out: str | os.PathLike, name: str, *, use_index: bool = True, nprobe: int | None = None,
                 text_backend: str | None = None, text_model: str | None = None, image_timeout_s: float = 300.0,
                 log=print):
        self.out = Path(out)
        self.name = name
        self.log = log
        self.manifest = manifest_of(out)
        shards = list(iter_shards(out))
        self.shard_ids = [s.index for s in shards]
        self.paths = [p for s in shards for p in s.paths]
        self.emb = ShardedArray([s.embeddings for s in shards])
        self.starts = np.cumsum([0] + [len(s.paths) for s in shards])
        self.rows, self.dim = self.emb.shape
        if self.rows == 0:
            raise ConfigError(f"{out} has no embeddings yet (no completed shard); run it first")
        self.synthetic = bool(self.manifest.get("synthetic_weights"))
        self.notes = run_status_notes(out, self.manifest, self.rows)
        self.index: OpenIndex | None = None
        if use_index and (self.out / INDEX_DIR / "index.faiss").exists():
            self._open_index(nprobe)
        self.text_backend = text_backend
        self.text_model = text_model
        self._text = None
        self._text_error: str | None = None
        self._image = None  # a Device, or a QueryChild (pipeline/serve/querychild.py)
        self.image_timeout_s = image_timeout_s
        self._image_error: tuple[str, float] | None = None  # why the image model cannot be opened, until when
        self._image_lock = threading.Lock()
        self._meta_cache: OrderedDict[int, Any] = OrderedDict()
        self._meta_lock = threading.Lock()
        self.cfg = config_of(out, self.manifest)

    # -- search -----------------------------------------------------------------------------------
    def _open_index(self, nprobe: int | None) -> None:
        try:
            opened = OpenIndex(self.out)
        except ConfigError as exc:
            self.notes.append(f"the faiss index is not used: {exc}")
            return
        if opened.info.get("shards") != self.shard_ids:
            self.notes.append(f"the faiss index covers {len(opened.info.get('shards') or [])} shards, the run has "
                              f"{len(self.shard_ids)}: exact search instead; rebuild it with `clip-pipeline index {self.out}`")
            return
        if nprobe and hasattr(opened.index, "nprobe"):
            opened.index.nprobe = nprobe
        self.index = opened

    @property
    def search_kind(self) -> str:
        if self.index is None:
            return "exact"
        return f"faiss {self.index.info.get('factory')}" + (", re-scored exactly" if self.index.approximate else "")

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [k'], rows [k']) for one query vector, best first."""
        q = np.ascontiguousarray(np.atleast_2d(query), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise QueryError(f"the query has {q.shape[1]} dimensions; index {self.name!r} holds {self.dim}")
        if self.index is not None:
            scores, rows = self.index.search(q, k)
        else:
            scores, rows = exact_topk(self.emb.chunks(), q, k)
        keep = rows[0] >= 0
        return scores[0][keep], rows[0][keep]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.emb[np.asarray(rows, dtype=np.int64)], dtype=np.float32)

    # -- query embedding --------------------------------------------------------------------------
    def text_encoder(self):
        """The run's paired text tower, opened on first use (None and a reason when there is none)."""
        if self._text is None and self._text_error is None:
            from pipeline.text.embed import TextModelError, text_encoder_for_run

            backend = self.text_backend or self.cfg.infer.backend  # one registry for both towers
            device = None
            if backend == "sail":
                device = str(self.cfg.infer.devices[0]) if self.cfg.infer.devices else None
            try:
                self._text = text_encoder_for_run(self.out, self.text_model, backend=backend, device=device,
                                                  log=self.log)
            except (TextModelError, ConfigError, FileNotFoundError) as exc:
                self._text_error = str(exc)
        return self._text

    def text_vector(self, text: str) -> np.ndarray:
        enc = self.text_encoder()
        if enc is None:
            raise QueryError(f"text queries are not available for index {self.name!r}: {self._text_error}")
        return enc.embed([text]).embeddings[0]

    def decode_options(self) -> DecodeOptions:
        from pipeline.model.models import resolve_image_size

        return DecodeOptions.from_config(self.cfg.replace(
            model=dataclasses.replace(self.cfg.model, image_size=resolve_image_size(self.cfg))))

    def image_device(self):
        """What embeds this run's query images, opened (and checked to be the run's model) once: the
        run's Device in this process for a pixels backend that runs under this interpreter, else a
        QueryChild (pipeline/serve/querychild.py) with the device open under the backend's interpreter."""
        from pipeline.backends import get_backend
        from pipeline.serve.querychild import ChildFailed, QueryChild

        with self._image_lock:
            if self._image is not None:
                return self._image
            if self._image_error and time.monotonic() < self._image_error[1]:
                raise QueryError(self._image_error[0], 503)
            unavailable = f"image queries are not available for index {self.name!r}"
            try:
                check_same_model(self.out, self.manifest, self.cfg)
            except ConfigError as exc:
                raise QueryError(f"{unavailable}: {exc}") from None
            try:
                backend = get_backend(self.cfg.infer.backend)
                device = backend.resolve_devices(self.cfg)[0]
                python = backend.worker_python(self.cfg)
                if backend.input_kind(self.cfg) == "pixels" and not python:
                    self._image = backend.open_device(self.cfg, device)
                else:
                    child = QueryChild(self.cfg, device, python, env=backend.worker_env(self.cfg, device),
                                       timeout_s=self.image_timeout_s, open_timeout_s=max(self.image_timeout_s, 120.0),
                                       log=self.log)
                    child.open()
                    self._image = child
            except Exception as exc:  # noqa: BLE001 - the set-up or the device: said in the 503, tried again after a minute
                why = str(exc) if isinstance(exc, (ConfigError, ChildFailed)) else f"{type(exc).__name__}: {exc}"
                self._image_error = (f"{unavailable}: {why}", time.monotonic() + 60.0)
                raise QueryError(self._image_error[0], 503) from None
        return self._image

    def image_vector(self, crop: np.ndarray, data: bytes) -> np.ndarray:
        """One query image through the run's model, normalised as the run's infer stage does: `crop`
        (S x S uint8, the run's decode + crop of `data`) for a pixels device, the file `data` for a
        device that decodes files itself (as it decodes the run's inputs)."""
        from pipeline.backends.base import l2_normalize, pad_batch
        from pipeline.serve.querychild import ChildFailed, QueryChild, QueryFailed

        dev = self.image_device()
        if isinstance(dev, QueryChild):
            try:
                if dev.files:
                    with query_file(data) as path:
                        emb = dev.embed(path=path)
                else:
                    emb = dev.embed(crop=crop)
            except QueryFailed as exc:
                raise QueryError(f"the image cannot be used: {exc.reason} ({exc.message})") from None
            except ChildFailed as exc:
                raise QueryError(f"the image model of index {self.name!r} failed: {exc}", 503) from None
            emb = emb[None]
        else:
            with self._image_lock:  # one device, one call at a time (a chip handle is not shared by threads)
                pixels = crop[None]
                emb = dev.embed(pad_batch(pixels, dev.batch_size) if dev.fixed_batch else pixels)[:1]
        emb = np.asarray(emb, dtype=np.float32)
        if not np.isfinite(emb).all():
            raise QueryError("the model gave a non-finite embedding for this image")
        return (l2_normalize(emb) if self.cfg.output.normalize else emb)[0]

    def close(self) -> None:
        """Close the image device (or stop its query process)."""
        with self._image_lock:
            dev, self._image = self._image, None
        if dev is not None:
            dev.close()

    # -- rows -------------------------------------------------------------------------------------
    def metadata(self, row: int) -> dict[str, Any]:
        """The row's metadata: image_path, and the shard's parquet columns (caption, width, ...) when the run wrote them."""
        meta: dict[str, Any] = {"image_path": self.paths[row]}
        s = int(np.searchsorted(self.starts, row, side="right") - 1)
        table = self._shard_table(self.shard_ids[s])
        if table is not None:
            rec = table.slice(row - int(self.starts[s]), 1).to_pylist()[0]
            meta.update({k: v for k, v in rec.items() if v is not None})
        return meta

    def _shard_table(self, k: int):
        with self._meta_lock:
            if k in self._meta_cache:
                self._meta_cache.move_to_end(k)
                return self._meta_cache[k]
        path = shard_metadata_path(self.out, k)
        table = None
        if path.exists():
            try:
                import pyarrow.parquet as pq

                table = pq.read_table(path)
            except Exception as exc:  # noqa: BLE001 - metadata is extra: a bad file costs its columns only
                self.log(f"warning: {path}: {exc}; serving image_path only")
        with self._meta_lock:
            self._meta_cache[k] = table
            while len(self._meta_cache) > 8:
                self._meta_cache.popitem(last=False)
        return table

    def info(self) -> dict[str, Any]:
        model = self.manifest.get("model") or {}
        return {"name": self.name, "rows": self.rows, "dim": self.dim, "search": self.search_kind,
                "synthetic_weights": self.synthetic, "status": self.manifest.get("status"),
                "model": {"path": model.get("path"), "sha256": model.get("sha256")},
                "backend": self.cfg.infer.backend, "notes": list(self.notes)}
