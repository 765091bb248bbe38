"""Fake backend: deterministic embeddings from pixel content, with latency and fault injection.

For tests (every failure path, quickly, without a model) and for scaling benchmarks of many
"devices" on a small host. The embedding is a fixed random projection of 8x8 block means (sampled on a
4x4 grid per block) of the crop, in float64 so a row does not depend on the rest of its batch.
Faults fire only in a worker's first generation (a restarted worker behaves), except
fail_devices, which fail forever.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import numpy as np

from pipeline.backends.base import Backend, Device, DeviceError, TextSession, configured_ready_crop
from pipeline.backends.cpu import resolve_cpu_devices
from pipeline.config import Config


@functools.lru_cache(maxsize=8)
def _projection(rows: int, dim: int, seed: int) -> np.ndarray:
    proj = np.random.default_rng(seed).standard_normal((rows, dim))
    proj.setflags(write=False)
    return proj


def fake_embed(pixels: np.ndarray, dim: int = 512, seed: int = 1234) -> np.ndarray:
    """Fixed random projection of 8x8 block means of each crop (float64; rows independent).

    Each block's mean is taken over a 4x4 grid of its pixels (stride h/32), not all of them: the
    fake device stands in for an accelerator, whose host CPU cost is near zero, and a full pass
    over 4.8 MB per batch cost ~0.6 ms per image, which at 8 x 602 images/s was most of the
    2-core host (docs/performance.md). The embedding still depends on the crop's content.
    """
    n, h, w, c = pixels.shape
    sh, sw = max(1, h // 32), max(1, w // 32)
    grid = pixels[:, sh // 2::sh, sw // 2::sw][:, :32, :32]
    if grid.shape[1:3] != (32, 32):  # tiny test crops: repeat up to the 32x32 grid
        grid = np.resize(grid, (n, 32, 32, c))
    grid = grid.astype(np.float64)
    feats = grid.reshape(n, 8, 4, 8, 4, c).sum(axis=2).sum(axis=3).reshape(n, -1) / 16.0
    return ((feats / 255.0 - 0.5) @ _projection(feats.shape[1], dim, seed)).astype(np.float32)


class FakeDevice(Device):
    def __init__(self, cfg: Config, device: str):
        self.cfg = cfg.fake
        self.device = device
        self.batch_size = cfg.model.batch_size
        self.dim = cfg.fake.dim
        self.batches = 0
        self.calls_running = 0
        self.first_generation = os.environ.get("CLIP_PIPELINE_WORKER_GENERATION", "0") == "0"

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        self.calls_running += 1
        try:
            return self._embed(pixels)
        finally:
            self.calls_running -= 1

    def close(self) -> None:
        # A real device library torn down under a running call fails loudly: onnxruntime printed
        # "Non-zero status code returned while running Add node ... GetElementType is not
        # implemented" and "terminate called without an active exception" on Ctrl-C (issue #12).
        # The fake reports the same misuse, so the tests see it.
        if self.calls_running:
            import sys

            sys.stderr.write(f"fake device {self.device}: closed while a device call was running\n")

    def _embed(self, pixels: np.ndarray) -> np.ndarray:
        self.batches += 1
        f = self.cfg
        if self.device in f.fail_devices:
            raise DeviceError(f"fake device {self.device} failed (fake.fail_devices)")
        if self.first_generation:
            if self.batches == f.fail_on_batch:
                raise DeviceError(f"fake device {self.device}: injected failure on batch {self.batches}")
            if self.batches == f.exit_on_batch:
                os._exit(9)
            if self.batches == f.hang_on_batch:
                while True:
                    time.sleep(3600)
        # The simulated device is busy for latency_ms_per_batch in all; computing the fake
        # embedding is part of that time (a real host would wait on the device meanwhile).
        t0 = time.monotonic()
        emb = fake_embed(pixels, self.dim)
        if f.latency_ms_per_batch:
            latency = f.latency_ms_per_batch * (f.slow_factor if self.device in f.slow_devices else 1.0)
            time.sleep(max(0.0, latency / 1000.0 - (time.monotonic() - t0)))
        return emb


class FakeTextSession(TextSession):
    """Deterministic stand-in (fake backend): rows depend only on the ids; no model file is read."""

    def __init__(self, dim: int = 512, context_length: int = 77):
        rng = np.random.default_rng(1234)
        self.table = rng.standard_normal((4096, dim), dtype=np.float32)
        self.pos = (1.0 + np.arange(context_length, dtype=np.float32)) ** -0.5
        self.fixed_batch = None
        self.context_length = context_length
        self.out_rank = 2
        self.out_last = dim
        self.id_dtype = np.int32

    needs_model = False
    identity = {"path": None, "sha256": None, "synthetic": True, "arch": "fake", "clip_model": "fake", "info": {}}

    def run_ids(self, ids: np.ndarray) -> np.ndarray:
        return np.einsum("ntd,t->nd", self.table[ids % 4096], self.pos).astype(np.float32)


class FakeBackend(Backend):
    name = "fake"

    @classmethod
    def ready_crop(cls, cfg: Config) -> np.ndarray | None:
        return configured_ready_crop(cfg)

    @classmethod
    def resolve_devices(cls, cfg: Config) -> list[str]:
        return resolve_cpu_devices(cfg, "fake")

    @classmethod
    def open_text(cls, model: str | None, device: Any = None, threads: int = 1, precision: str = "auto") -> TextSession:
        return FakeTextSession()

    @classmethod
    def open_device(cls, cfg: Config, device: str) -> Device:
        return FakeDevice(cfg, device)

    @classmethod
    def model_identity(cls, cfg: Config) -> dict:
        return {"path": "", "sha256": f"fake-dim{cfg.fake.dim}", "synthetic": True, "arch": "fake", "info": {}}

    @classmethod
    def probe(cls) -> dict:
        return {"available": True, "devices": ["cpu:N (any number)"], "reason": "test double, no model"}
