"""Shared fixtures and helpers of the whole suite (one place):

- `tiny_model`: the tiny synthetic CLIP ONNX (float input), built once per session;
- `make_images`: a folder of small generated JPEG/PNG images;
- `invoke`: the CLI in-process (click's CliRunner); `cli` / `cli_env`: the CLI as a subprocess
  from this checkout;
- `worker_spec`: a WorkerSpec for driving a stage core directly.
Helpers of one family of tests live next to them (robust_helpers.py: bad inputs and fake-backend
runs; sail_helpers.py: the fake sophon.sail)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "images"


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


FAULTS = ROOT / "tests" / "fault_injection"  # test-only hooks (a sitecustomize), see its docstring


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess from this checkout, plus `extra`; a CLIP_PIPELINE_TEST_*
    variable also puts the fault-injection hooks (tests/fault_injection) on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(ROOT)]
    if any(k.startswith("CLIP_PIPELINE_TEST_") for k in extra):
        paths.append(str(FAULTS))
    env["PYTHONPATH"] = os.pathsep.join(paths) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def invoke(*args: object):
    """Run `clip-pipeline ARGS` in-process; returns click's Result (exit_code, output)."""
    from click.testing import CliRunner

    from pipeline.cli import cli as cli_group

    return CliRunner().invoke(cli_group, [str(a) for a in args])


def worker_spec(role: str, raw: dict, **fields):
    """A WorkerSpec (no sockets) for a stage core, from a raw config dict."""
    from pipeline import config
    from pipeline.worker import WorkerSpec

    return WorkerSpec(role=role, index=0, cfg=config.from_dict(raw), in_addr=None, next_addrs=(), sink_addr="",
                      control_addr="", device="cpu:0" if role == "infer" else None, **fields)
