"""The text tower on the sail backend, against the fake sophon.sail: int32 ids through the numpy
Engine.process, a fixed batch padded with zero rows and trimmed, Sophgo's states split on the host."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.text.embed import TextEncoder, TextModelError
from pipeline.text.model import build_clip_text_onnx
from tests.conftest import ROOT
from tests.sail_helpers import FAKE_SAIL_DIR, use_fake_sail

PROMPTS = ["a photo of a dog.", "a photo of a cat.", "Hi there", "x " * 90, "une voiture rouge 🚗"]


def _text_bmodel(path, onnx_path, batch_sizes, input_dtype="int32"):
    path.write_text(json.dumps({"fake_bmodel": True, "onnx": str(onnx_path), "batch_sizes": list(batch_sizes),
                                "input_dtype": input_dtype, "graph_name": "clip_text_vitb32"}))
    return path


@pytest.fixture
def states_model(tmp_path):
    onnx_path = tmp_path / "clip_text_vitb32.onnx"
    build_clip_text_onnx(onnx_path, arch="tiny", seed=2, form="states")
    return onnx_path


def test_sail_text_matches_cpu_with_padding(monkeypatch, tmp_path, states_model):
    use_fake_sail(monkeypatch)
    import sophon.sail as sail

    calls = []
    real = sail.Engine.process

    def spy(self, g, inputs, *rest, **kw):
        (x,) = inputs.values()
        calls.append((g, np.asarray(x).dtype, np.asarray(x).shape))
        return real(self, g, inputs, *rest, **kw)

    monkeypatch.setattr(sail.Engine, "process", spy)
    bm = _text_bmodel(tmp_path / "clip_text_vitb32_bm1684x_f16_4b.bmodel", states_model, [4])
    # Sophgo's layout: the projection beside the bmodel as text_projection_<w>_<d>.npy
    (tmp_path / "clip_text_vitb32.text_projection.npy").rename(tmp_path / "text_projection_64_512.npy")
    enc = TextEncoder(bm, backend="sail", device=0, batch_size=32)
    assert enc.batch_size == 4 and enc.form == "states" and enc.dim == 512
    got = enc.embed(PROMPTS)
    assert calls == [("clip_text_vitb32", np.int32, (4, 77))] * 2  # 5 prompts: 4 + (1 + 3 zero rows)
    want = TextEncoder(states_model, projection=tmp_path / "text_projection_64_512.npy").embed(PROMPTS)
    np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-6)
    assert got.tokens.truncated == [3]
    ident = enc.identity()
    assert ident["projection"]["path"].endswith("text_projection_64_512.npy") and ident["form"] == "states"


def test_sail_text_projected_form_and_batch_one(monkeypatch, tmp_path):
    use_fake_sail(monkeypatch)
    onnx_path = tmp_path / "t.onnx"
    build_clip_text_onnx(onnx_path, arch="tiny", seed=2, form="projected")
    enc = TextEncoder(_text_bmodel(tmp_path / "t_1b.bmodel", onnx_path, [1]), backend="sail")
    assert enc.batch_size == 1 and enc.form == "projected"
    np.testing.assert_allclose(enc.embed(PROMPTS[:3]).embeddings, TextEncoder(onnx_path).embed(PROMPTS[:3]).embeddings,
                               atol=1e-6)


@pytest.mark.parametrize("zeros", ["0", "1"])
def test_sail_text_failed_launch_is_caught(monkeypatch, tmp_path, states_model, zeros):
    """SAIL only logs a failed launch and returns stale (the previous batch's) or zeroed outputs."""
    use_fake_sail(monkeypatch)
    monkeypatch.setenv("FAKE_SAIL_FAIL_ZEROS", zeros)
    enc = TextEncoder(_text_bmodel(tmp_path / "clip_text_vitb32.bmodel", states_model, [4]), backend="sail")
    enc.embed(["a dog"])  # a good batch first: its outputs are what a failed launch leaves behind
    monkeypatch.setenv("FAKE_SAIL_FAIL_DEVS", "0")
    with pytest.raises(TextModelError, match="inference failed.*(all zeros|stale)"):
        enc.embed(["a cat"])
    with pytest.raises(TextModelError, match="cannot open text bmodel"):
        TextEncoder(tmp_path / "missing.bmodel", backend="sail")


def test_embed_text_cli_on_sail(monkeypatch, tmp_path, states_model):
    bm = _text_bmodel(tmp_path / "t.bmodel", states_model, [4])
    (tmp_path / "clip_text_vitb32.text_projection.npy").rename(tmp_path / "t.text_projection.npy")
    env = {"PYTHONPATH": f"{FAKE_SAIL_DIR}:{ROOT}", "FAKE_SAIL_TPUS": "1", "PATH": "/usr/bin:/bin",
           **({"CLIP_PIPELINE_VOCAB": v} if (v := __import__("os").environ.get("CLIP_PIPELINE_VOCAB")) else {})}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "embed-text", "-t", "a dog", "-t", "a cat",
                        "--backend", "sail", "--device", "0", "--text-model", str(bm), "-o", str(tmp_path / "o")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["backend"] == "sail" and m["model"]["form"] == "states"
    want = TextEncoder(states_model, projection=tmp_path / "t.text_projection.npy").embed(["a dog", "a cat"]).embeddings
    np.testing.assert_allclose(np.load(tmp_path / "o" / "embeddings.npy"), want, atol=1e-6)
