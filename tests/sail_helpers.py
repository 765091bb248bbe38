"""Shared helpers for the sail backend tests: the fake sophon.sail, fake bmodels, the CPU reference.

Their images come from tests/imagegen.py like every test's."""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

FAKE_SAIL_DIR = str(Path(__file__).resolve().parent / "fake_sail")
# the misuse logs of this test session live in one folder, removed when the session ends
_MISUSE_DIR = tempfile.mkdtemp(prefix="fake-sail-misuse-")
atexit.register(shutil.rmtree, _MISUSE_DIR, True)
_misuse_ids = itertools.count()


def use_fake_sail(monkeypatch, tpus: int = 1) -> None:
    """Make `import sophon.sail` give the fake, here and in spawned workers (PYTHONPATH)."""
    monkeypatch.syspath_prepend(FAKE_SAIL_DIR)
    old = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", FAKE_SAIL_DIR + (os.pathsep + old if old else ""))
    monkeypatch.setenv("FAKE_SAIL_TPUS", str(tpus))
    for var in ("FAKE_SAIL_FAIL_DEVS", "FAKE_SAIL_FAIL_ZEROS", "FAKE_SAIL_HANG_DEVS", "FAKE_SAIL_DECODE_FAIL",
                "FAKE_SAIL_DECODE_MS", "FAKE_SAIL_INFER_MS", "FAKE_SAIL_BMCV_FAIL_WIDTHS", "FAKE_SAIL_NUMPY_RELEASE_GIL"):
        monkeypatch.delenv(var, raising=False)
    # every misuse the fake detects (e.g. two threads in one Engine) is appended here, from any process
    misuse = os.path.join(_MISUSE_DIR, f"{next(_misuse_ids)}.log")  # created by the fake's first append
    monkeypatch.setenv("FAKE_SAIL_MISUSE_FILE", misuse)
    for mod in ("sophon.sail", "sophon"):
        sys.modules.pop(mod, None)


def write_fake_bmodel(path: Path, onnx_path: Path, batch_sizes, input_dtype: str = "float32",
                      input_scale: float | None = None) -> Path:
    meta = {"fake_bmodel": True, "onnx": str(onnx_path), "batch_sizes": list(batch_sizes),
            "input_dtype": input_dtype, "graph_name": "clip_image_vitb32"}
    if input_scale is not None:
        meta["input_scale"] = input_scale
    path.write_text(json.dumps(meta))
    return path


def ort_session(onnx_path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def cpu_reference(sess, paths) -> np.ndarray:
    """CLIP's exact transform (decode_file -> reference_crop -> normalize) + onnxruntime."""
    from pipeline.data.images import DecodeOptions, decode_file, normalize, reference_crop

    crops = np.stack([reference_crop(decode_file(os.fsencode(p), DecodeOptions())) for p in paths])
    return sess.run(None, {sess.get_inputs()[0].name: normalize(crops)})[0]


def misuse_log() -> str:
    """What the fake recorded as misuse since use_fake_sail (empty = none)."""
    path = os.environ.get("FAKE_SAIL_MISUSE_FILE", "")
    return Path(path).read_text() if path and os.path.exists(path) else ""
