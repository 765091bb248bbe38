"""Shared fixtures and helpers of the whole suite (one place):

- `tiny_model`: the tiny synthetic CLIP ONNX (float input), built once per session;
- `photos`: a folder of 12 generated photos (JPEG and PNG), written once per session: read-only;
- `invoke`: the CLI in-process (click's CliRunner); `cli` / `cli_env`: the CLI as a subprocess
  from this checkout;
- `worker_spec`: a role's spec (pipeline/worker/spec.py) for driving a stage core directly.
Every generated image comes from imagegen.py (`photo`, `encode`/`write`, `make_images`,
`mode_images`). Helpers of one family of tests live next to them (robust_helpers.py: bad inputs
and fake-backend runs; sail_helpers.py: the fake sophon.sail)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from imagegen import make_images

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "images"


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[Path]:
    """12 photos (img_000.jpg ... img_011.jpg, every fifth a PNG) in one folder; don't write there."""
    return make_images(tmp_path_factory.mktemp("photos"), 12, seed=5)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from pipeline.model.modelgen import build_clip_image_onnx

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
    from pipeline.worker.spec import SPEC_TYPES

    cfg = config.from_dict(raw)
    if role == "infer":  # the device's input kind, as the run plan decides it
        from pipeline.backends import get_backend

        files = get_backend(cfg.infer.backend).input_kind(cfg) == "files"
        fields = {"device": "cpu:0", "files_mode": files, **fields}
    if role == "decode":
        fields = {"fused": cfg.workers.fuse_decode_preprocess, **fields}
    if role in ("source", "sink"):  # the run's directory, as the run plan passes it: here the configured one
        fields = {"out_dir": cfg.output.dir, **fields}
    return SPEC_TYPES[role](index=0, cfg=cfg, **fields)
