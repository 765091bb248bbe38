"""Infer stage: batch 224x224 crops (or file paths) per device and embed them.

One process per device. Items arrive one per message; the Batcher gathers them into batches of
the device's batch size, flushing a partial batch after `infer.batch_timeout_ms` without new
input. Fixed-batch models (bmodels) get zero-padded batches; padding rows never leave this stage.
Completion is not signalled through this stage: the supervisor counts resolved ids at the sink.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.transport import array_from, array_header
from pipeline.worker import StageCore


@dataclass
class Batch:
    ids: list[int] = field(default_factory=list)
    paths: list[bytes] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    started: float = 0.0
    pixels: np.ndarray | None = None  # the whole batch as one array, when it arrived as one message

    def __len__(self) -> int:
        return len(self.ids)


class Batcher:
    """Pure batching logic: add items, take a batch when full or when the timeout has passed."""

    def __init__(self, batch_size: int, timeout_s: float):
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.pending = Batch()

    def add(self, item_id: int, path: bytes, arr: np.ndarray | None, now: float) -> Batch | None:
        if not self.pending:
            self.pending.started = now
        self.pending.ids.append(item_id)
        self.pending.paths.append(path)
        if arr is not None:
            self.pending.arrays.append(arr)
        return self.take() if len(self.pending) >= self.batch_size else None

    def deadline(self) -> float | None:
        return self.pending.started + self.timeout_s if self.pending else None

    def due(self, now: float) -> bool:
        return bool(self.pending) and now >= self.pending.started + self.timeout_s

    def take(self) -> Batch:
        batch, self.pending = self.pending, Batch()
        return batch


def pad_batch(pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Zero-pad [n,...] to [batch_size,...] for fixed-batch models."""
    n = pixels.shape[0]
    if n == batch_size:
        return pixels
    if n > batch_size:
        raise ValueError(f"batch of {n} exceeds the model's fixed batch {batch_size}")
    out = np.zeros((batch_size, *pixels.shape[1:]), dtype=pixels.dtype)
    out[:n] = pixels
    return out


def l2_normalize(emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


class InferCore(StageCore):
    """Infer worker core: owns one device (opened in setup, inside this process)."""

    def __init__(self, spec, slot):
        self.spec = spec
        self.cfg = spec.cfg
        self.slot = slot
        self.device = None
        self.batcher: Batcher | None = None
        self.info: dict = {}

    def setup(self) -> None:
        from pipeline.backends.base import get_backend

        backend = get_backend(self.cfg.infer.backend)
        self.files_mode = backend.input_kind(self.cfg) == "files"
        self.device = backend.open_device(self.cfg, self.spec.device)
        self.batcher = Batcher(self.device.batch_size, self.cfg.infer.batch_timeout_ms / 1000.0)
        self.info = {"device": self.spec.device, "batch_size": self.device.batch_size,
                     "fixed_batch": self.device.fixed_batch, "dim": self.device.dim}

    def handle(self, header: dict, frames: list):
        if header["t"] in ("pxs", "items"):
            return self.handle_group(header, frames)
        arr = None if self.files_mode else array_from(header, frames[0])
        batch = self.batcher.add(header["id"], header["path"], arr, time.monotonic())
        return self.run(batch) if batch is not None else ()

    def handle_group(self, header: dict, frames: list) -> list:
        """Several inputs in one message (crops stacked [n,224,224,3], or paths in files mode)."""
        pixels = None if self.files_mode else array_from(header, frames[0])
        outputs: list = []
        now = time.monotonic()
        if pixels is not None and not self.batcher.pending and len(pixels) == self.batcher.batch_size:
            # a whole batch in one message: infer on the received buffer, no per-row copy
            return self.run(Batch(ids=list(header["ids"]), paths=list(header["paths"]), started=now, pixels=pixels))
        for k, (item_id, path) in enumerate(zip(header["ids"], header["paths"])):
            batch = self.batcher.add(item_id, path, None if pixels is None else pixels[k], now)
            if batch is not None:
                outputs.extend(self.run(batch))
        return outputs

    def flush(self, now: float):
        if self.batcher.due(now):
            return self.run(self.batcher.take())
        return ()

    def deadline(self) -> float | None:
        return self.batcher.deadline()

    def run(self, batch: Batch) -> list:
        from stages.decode import failure

        self.slot.begin(batch.ids)
        try:
            if self.files_mode:
                res = self.device.embed_files(batch.ids, batch.paths)
                path_of = dict(zip(batch.ids, batch.paths))
                ids, paths, emb = res.ids, [path_of[i] for i in res.ids], res.embeddings
                outputs = [failure(f.id, f.path, f.reason, f.message, "infer") for f in res.failures]
            else:
                pixels = batch.pixels if batch.pixels is not None else np.stack(batch.arrays)
                n = len(batch)
                if self.device.fixed_batch:
                    pixels = pad_batch(pixels, self.device.batch_size)
                emb = self.device.embed(pixels)[:n]
                ids, paths, outputs = batch.ids, batch.paths, []
        finally:
            self.slot.end()
        emb = np.asarray(emb, dtype=np.float32)
        if emb.shape != (len(ids), self.device.dim):
            from pipeline.backends.base import DeviceError

            raise DeviceError(f"device {self.spec.device} returned shape {emb.shape}, expected {(len(ids), self.device.dim)}")
        finite = np.isfinite(emb).all(axis=1)
        if not finite.all():
            for i in np.flatnonzero(~finite):
                outputs.append(failure(ids[i], paths[i], "non_finite", "model output has NaN/inf", "infer"))
            keep = np.flatnonzero(finite)
            ids, paths, emb = [ids[i] for i in keep], [paths[i] for i in keep], emb[keep]
        if self.cfg.output.normalize:
            emb = l2_normalize(emb)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if ids:
            outputs.append(("sink", {"t": "emb", "ids": list(ids), "paths": list(paths), **array_header(emb)}, (emb,)))
        return outputs

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
