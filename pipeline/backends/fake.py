"""Fake backend: deterministic embeddings from pixel content, with latency and fault injection.

For tests (every failure path, quickly, without a model) and for scaling benchmarks of many
"devices" on a small host. The embedding is a fixed random projection of 8x8 block means of the
crop, computed in float64 so a row does not depend on the rest of its batch.
Faults fire only in a worker's first generation (a restarted worker behaves), except
fail_devices, which fail forever.
"""

from __future__ import annotations

import os
import time

import numpy as np

from pipeline.backends.base import Backend, Device, DeviceError
from pipeline.backends.cpu import resolve_cpu_devices
from pipeline.config import Config


def fake_embed(pixels: np.ndarray, dim: int = 512, seed: int = 1234) -> np.ndarray:
    n, h, w, c = pixels.shape
    feats = pixels.reshape(n, 8, h // 8, 8, w // 8, c).mean(axis=(2, 4), dtype=np.float64).reshape(n, -1)
    proj = np.random.default_rng(seed).standard_normal((feats.shape[1], dim))
    return ((feats / 255.0 - 0.5) @ proj).astype(np.float32)


class FakeDevice(Device):
    def __init__(self, cfg: Config, device: str):
        self.cfg = cfg.fake
        self.device = device
        self.batch_size = cfg.model.batch_size
        self.dim = cfg.fake.dim
        self.batches = 0
        self.first_generation = os.environ.get("CLIP_PIPELINE_WORKER_GENERATION", "0") == "0"

    def embed(self, pixels: np.ndarray) -> np.ndarray:
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
        if f.latency_ms_per_batch:
            time.sleep(f.latency_ms_per_batch / 1000.0)
        return fake_embed(pixels, self.dim)


class FakeBackend(Backend):
    name = "fake"

    @classmethod
    def resolve_devices(cls, cfg: Config) -> list[str]:
        return resolve_cpu_devices(cfg, "fake")

    @classmethod
    def open_device(cls, cfg: Config, device: str) -> Device:
        return FakeDevice(cfg, device)

    @classmethod
    def model_identity(cls, cfg: Config) -> dict:
        return {"path": "", "sha256": f"fake-dim{cfg.fake.dim}", "synthetic": True, "arch": "fake", "info": {}}

    @classmethod
    def probe(cls) -> dict:
        return {"available": True, "devices": ["cpu:N (any number)"], "reason": "test double, no model"}
