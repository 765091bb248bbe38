"""The simulator device: infer workers under TPU-MLIR's Python 3.10 running a real BM1684X bmodel
on the chip simulator, inside the normal pipeline (slow; skipped without the TPU-MLIR venv)."""

from __future__ import annotations

import numpy as np
import pytest
from imagegen import make_images

from pipeline import config as cfgmod
from pipeline.output import load_embeddings
from pipeline.run.progress import Progress
from pipeline.run.supervisor import Supervisor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv():
    from pipeline.toolchain.env import TpuMlirMissing, find_venv

    try:
        return find_venv()
    except TpuMlirMissing as exc:
        pytest.skip(f"TPU-MLIR venv not available ({str(exc).splitlines()[0]}); run scripts/setup_tpu_mlir.sh")


def _run(inputs, out, **sets):
    cfg = cfgmod.load(None, [f"{k}={v}" for k, v in sets.items()] + ["output.shard_size=5", "infer.batch_timeout_ms=20"],
                      input_paths=[str(inputs)], output_dir=str(out))
    return Supervisor(cfg, progress=Progress("none")).run()


def test_pipeline_on_simulator_matches_cpu(tmp_path, tiny_model, venv):
    from pipeline.toolchain.compile import compile_onnx

    make_images(tmp_path / "imgs", 12, seed=7)
    (tmp_path / "imgs" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    compile_onnx(tiny_model, tmp_path / "bm", batches=[4])
    bmodel = next((tmp_path / "bm").glob("*_4b.bmodel"))
    sim = _run(tmp_path / "imgs", tmp_path / "sim", **{"infer.backend": '"sim"', "infer.devices": "[0]",
                                                       "model.path": f'"{bmodel}"'})
    cpu = _run(tmp_path / "imgs", tmp_path / "cpu", **{"model.path": f'"{tiny_model}"', "model.batch_size": 4})
    assert sim.exit_code == cpu.exit_code == 3, sim.message  # the corrupt file fails on both
    ps, es = load_embeddings(tmp_path / "sim")
    pc, ec = load_embeddings(tmp_path / "cpu")
    assert ps == pc and len(ps) == 12
    cos = (np.asarray(es) * np.asarray(ec)).sum(axis=1)
    assert cos.min() >= 0.9999, cos
    assert (tmp_path / "sim" / "failures.jsonl").read_text() == (tmp_path / "cpu" / "failures.jsonl").read_text()


def test_pipeline_on_simulator_int8_fused_uint8(tmp_path, tiny_model, venv):
    """An INT8 bmodel (calibrated on the sample photos, CLIP normalisation fused: uint8 input) runs
    in the sim backend; its embeddings are close to onnxruntime fp32's -- quantised, so not float-exact
    (synthetic random weights quantise differently from trained CLIP weights)."""
    from pathlib import Path

    from pipeline.toolchain.compile import compile_onnx

    samples = Path(__file__).resolve().parents[2] / "samples" / "images"
    make_images(tmp_path / "imgs", 8, seed=3)
    side = compile_onnx(tiny_model, tmp_path / "bm", batches=[4], quantize="INT8", fuse_preprocess=True,
                        calib_images=samples, calib_count=6, log=lambda s: None)[0]
    assert side["input"]["dtype"] == "uint8" and side["quantize"] == "INT8"
    bmodel = tmp_path / "bm" / side["bmodel"]
    sim = _run(tmp_path / "imgs", tmp_path / "sim", **{"infer.backend": '"sim"', "infer.devices": "[0]",
                                                       "model.path": f'"{bmodel}"'})
    cpu = _run(tmp_path / "imgs", tmp_path / "cpu", **{"model.path": f'"{tiny_model}"', "model.batch_size": 4})
    assert sim.exit_code == cpu.exit_code == 0, sim.message
    ps, es = load_embeddings(tmp_path / "sim")
    pc, ec = load_embeddings(tmp_path / "cpu")
    assert ps == pc and len(ps) == 8
    cos = (np.asarray(es) * np.asarray(ec)).sum(axis=1)
    assert 0.95 <= cos.min() < 0.99999, cos
