"""The text tower through TPU-MLIR: compile args (fast), and compile + BM1684X simulator at batch 1
and 4 against onnxruntime (slow; skipped, with the reason, without the TPU-MLIR venv)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.toolchain import env as tenv
from pipeline.toolchain.compile import onnx_text_context, transform_args
from pipeline.toolchain.preprocess import random_token_ids


def test_text_transform_args_and_token_rows(tmp_path):
    from pipeline.text.model import build_clip_text_onnx

    build_clip_text_onnx(tmp_path / "t.onnx", arch="tiny", form="states")
    assert onnx_text_context(tmp_path / "t.onnx") == 77
    args = transform_args("t", tmp_path / "t.onnx", 4, "t.mlir", text_context=77)
    assert args[args.index("--input_shapes") + 1] == "[[4,77]]"
    ids = random_token_ids(6, 77, seed=1)
    assert ids.dtype == np.int32 and (ids[:, 0] == 49406).all()
    assert ((ids == 49407).sum(1) == 1).all() and (ids.argmax(1) == (ids == 49407).argmax(1)).all()


@pytest.fixture(scope="module")
def compiled_text(tmp_path_factory):
    try:
        tenv.find_venv()
    except tenv.TpuMlirMissing as e:
        pytest.skip("TPU-MLIR venv unavailable (run scripts/setup_tpu_mlir.sh): " + str(e).splitlines()[0])
    from pipeline.text.model import build_clip_text_onnx
    from pipeline.toolchain.compile import compile_onnx

    d = tmp_path_factory.mktemp("text-tpu")
    onnx_path = d / "clip_text_tiny.onnx"
    build_clip_text_onnx(onnx_path, arch="tiny", seed=0, form="states")
    sides = compile_onnx(onnx_path, d / "out", [1, 4], log=lambda s: None)
    return onnx_path, d / "out", sides


@pytest.mark.slow
def test_text_bmodels_compile_and_match_onnxruntime_on_the_simulator(compiled_text):
    from pipeline.text.embed import TextEncoder, clip_model_of
    from pipeline.toolchain.runner import BmodelRunner
    from pipeline.toolchain.verify import cosine_rows, verify

    onnx_path, out, sides = compiled_text
    assert [s["bmodel"] for s in sides] == ["clip_text_tiny_bm1684x_f16_1b.bmodel", "clip_text_tiny_bm1684x_f16_4b.bmodel"]
    prompts = ["a photo of a dog.", "a photo of a cat.", "Hi there", "x " * 90, "une voiture rouge"]
    cpu = TextEncoder(onnx_path).embed(prompts)
    for s, b in zip(sides, (1, 4)):
        bm = out / s["bmodel"]
        assert s["tower"] == "text" and s["input"] == {"name": "text", "shape": [b, 77], "dtype": "int32"}
        assert s["output"]["shape"] == [b, 77, 64]
        assert clip_model_of(json.loads((out / (s["bmodel"] + ".json")).read_text())) == "synthetic:tiny:seed=0:act=quickgelu"
        assert (out / s["projection"]["file"]).is_file()
        r = verify(bm, log=lambda s: None)
        assert r.cos_min >= 0.9999, r.comparisons
        # the whole text path on the simulator: ids in, host gather + projection, vs onnxruntime
        proj = np.load(out / s["projection"]["file"])
        ids = cpu.tokens.ids
        rows = []
        with BmodelRunner(bm) as runner:
            for i in range(0, len(ids), b):
                chunk = ids[i:i + b]
                m = len(chunk)
                if m < b:
                    chunk = np.concatenate([chunk, np.zeros((b - m, 77), np.int32)])
                (states,) = runner.forward([chunk])
                rows.append(states[np.arange(m), chunk[:m].argmax(1)] @ proj)
        emb = np.concatenate(rows)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        assert cosine_rows(emb, cpu.embeddings).min() >= 0.9999


@pytest.mark.slow
def test_embed_text_on_the_simulator_backend(compiled_text, tmp_path):
    import subprocess
    import sys

    from pipeline.text.embed import TextEncoder
    from pipeline.toolchain.verify import cosine_rows
    from tests.conftest import ROOT, cli_env

    onnx_path, out, sides = compiled_text
    bm = out / sides[1]["bmodel"]  # batch 4: 5 prompts = 4 + (1 + 3 zero rows)
    prompts = ["a photo of a dog.", "a cat", "Hi there", "a red car", "the sea"]
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "embed-text", *sum((["-t", p] for p in prompts), []),
                        "--backend", "sim", "--text-model", str(bm), "-o", str(tmp_path / "o")],
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "o" / "embeddings.npy")
    want = TextEncoder(onnx_path).embed(prompts).embeddings
    assert cosine_rows(got, want).min() >= 0.9999
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["backend"] == "sim" and m["model"]["clip_model"] == "synthetic:tiny:seed=0:act=quickgelu"
