"""Shared fixtures: a tiny synthetic CLIP model and generated image folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_images(d: Path, n: int, seed: int = 0, sizes=((64, 48), (48, 64), (80, 80), (300, 120), (33, 257))) -> list[Path]:
    """Write n small random-content images (JPEG and PNG mixed) and return their paths."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        base = rng.integers(0, 256, size=(max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        p = d / (f"img_{i:03d}.png" if i % 5 == 4 else f"img_{i:03d}.jpg")
        img.save(p, quality=90) if p.suffix == ".jpg" else img.save(p)
        out.append(p)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from pipeline.modelgen import build_clip_image_onnx

    path = tmp_path_factory.mktemp("models") / "tiny.onnx"
    build_clip_image_onnx(path, arch="tiny", seed=0)
    return path


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]
