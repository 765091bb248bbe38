"""The whole pipeline (real processes, real sockets) against a direct in-process computation."""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import ROOT, cli, cli_env
from imagegen import make_images

from pipeline import config as cfgmod
from pipeline.data.images import DecodeOptions, decode_file, normalize, reference_crop
from pipeline.data.rundir import EMB_DIR
from pipeline.output import load_embeddings
from pipeline.run.progress import Progress
from pipeline.run.supervisor import Supervisor


def run_pipeline(inputs, out, model, **sets):
    overrides = [f"{k}={v}" for k, v in sets.items()]
    cfg = cfgmod.load(None, [f'model.path="{model}"', "model.batch_size=4", "output.shard_size=8",
                             "infer.batch_timeout_ms=20", *overrides],
                      input_paths=[str(p) for p in inputs], output_dir=str(out))
    return Supervisor(cfg, progress=Progress("none")).run()


def direct_embeddings(paths, model) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    opts = DecodeOptions()
    crops = np.stack([reference_crop(decode_file(bytes(p), opts)) for p in paths])
    emb = sess.run(None, {"image": normalize(crops)})[0]
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_pipeline_matches_direct_computation(tmp_path, tiny_model):
    images = make_images(tmp_path / "imgs", 19)
    res = run_pipeline([tmp_path / "imgs"], tmp_path / "out", tiny_model)
    assert res.exit_code == 0, res.message
    paths, emb = load_embeddings(tmp_path / "out")
    assert paths == [str(p) for p in sorted(images)]
    assert emb.shape == (19, 512) and emb.dtype == np.float32
    ref = direct_embeddings(sorted(images), tiny_model)
    np.testing.assert_allclose(emb, ref, rtol=0, atol=1e-5)
    shards = sorted((tmp_path / "out" / EMB_DIR).glob("part-*.npy"))
    assert [p.name for p in shards] == ["part-00000.npy", "part-00001.npy", "part-00002.npy"]
    assert (tmp_path / "out" / "failures.jsonl").read_text() == ""


def _output_files(out: Path) -> dict[str, bytes]:
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / EMB_DIR).iterdir()}
    files["failures.jsonl"] = (out / "failures.jsonl").read_bytes()
    files["listing.jsonl"] = (out / "listing.jsonl").read_bytes()
    return files


def test_output_identical_for_1_and_3_devices(tmp_path, tiny_model):
    make_images(tmp_path / "imgs", 23, seed=3)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image at all")
    one = run_pipeline([tmp_path / "imgs"], tmp_path / "one", tiny_model)
    three = run_pipeline([tmp_path / "imgs"], tmp_path / "three", tiny_model, **{
        "infer.devices": '["cpu:0", "cpu:1", "cpu:2"]', "workers.decode": 2,
        "workers.fuse_decode_preprocess": "false", "workers.preprocess": 2})
    assert one.exit_code == three.exit_code == 3  # completed with one failure
    a, b = _output_files(tmp_path / "one"), _output_files(tmp_path / "three")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs between 1 and 3 devices"
    assert b"not_an_image" in a["failures.jsonl"]


def test_cli_run_writes_pickle_and_prints_output(tmp_path, tiny_model):
    make_images(tmp_path / "imgs", 6)
    out = tmp_path / "out"
    proc = subprocess.run(cli("run", "--input", str(tmp_path / "imgs"), "--output", str(out),
                              "--set", f'model.path="{tiny_model}"', "--set", "output.pickle=true",
                              "--set", "model.batch_size=4", "--progress", "log"),
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    data = pickle.loads((out / "embeddings.pkl").read_bytes())
    assert set(data) == {"img_path", "embedding"}
    paths, emb = load_embeddings(out)
    assert data["img_path"] == paths
    np.testing.assert_array_equal(data["embedding"], np.asarray(emb))


@pytest.mark.slow
def test_default_config_runs(tmp_path):
    """The README's main job: the default config on the bundled samples (builds vit-b32)."""
    proc = subprocess.run(cli("run", "--config", "configs/cpu.toml", "--output", str(tmp_path / "o")),
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "SYNTHETIC" in proc.stdout
