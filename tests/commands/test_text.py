"""embed-text and classify end to end: outputs, bad input, pairing, synthetic warnings."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.model.modelgen import build_clip_image_onnx
from pipeline.text.embed import PairingError, TextEncoder, check_pairing, embed_texts, paired_text_model
from pipeline.text.model import build_clip_text_onnx
from tests.conftest import ROOT, cli, cli_env


def sh(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tm") / "text.onnx"
    build_clip_text_onnx(p, arch="tiny", seed=0)
    return p


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A finished image run with the tiny synthetic image tower (seed 0)."""
    d = tmp_path_factory.mktemp("run")
    build_clip_image_onnx(d / "img.onnx", arch="tiny", seed=0)
    out = d / "out"
    r = sh("run", "-i", str(ROOT / "samples" / "images"), "-o", str(out), "--set", f'model.path="{d / "img.onnx"}"',
           "--set", 'infer.devices=["cpu:0"]', "-q")
    assert r.returncode == 0, r.stderr
    return out


def test_embed_text_outputs(tmp_path, text_model):
    f = tmp_path / "p.txt"
    f.write_bytes("a photo of a dog.\r\nun chat 🐱\n".encode())
    out = tmp_path / "out"
    r = sh("embed-text", "--text", "Hi there", "--text-file", str(f), "--text-model", str(text_model), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "SYNTHETIC" in r.stderr and "SYNTHETIC" in r.stdout
    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (3, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    rows = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["Hi there", "a photo of a dog.", "un chat 🐱"]
    assert [r["source"] for r in rows] == ["--text #1", "p.txt:1", "p.txt:2"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "text" and m["synthetic_weights"] is True and "SYNTHETIC" in m["warning"]
    assert m["model"]["sha256"] and m["model"]["clip_model"] == "synthetic:tiny:seed=0:act=quickgelu"
    assert m["tokenizer"]["vocab_sha256"].startswith("924691ac") and "ftfy" in m["tokenizer"]
    want = TextEncoder(text_model).embed(["Hi there", "a photo of a dog.", "un chat 🐱"]).embeddings
    np.testing.assert_allclose(emb, want, atol=1e-6)
    # float16, unnormalised, rewritten in place
    r = sh("embed-text", "-t", "x", "--text-model", str(text_model), "-o", str(out), "--dtype", "float16", "--no-normalize")
    assert r.returncode == 0, r.stderr
    e16 = np.load(out / "embeddings.npy")
    assert e16.dtype == np.float16 and abs(float(np.linalg.norm(e16.astype(np.float32))) - 1) > 1e-3


def test_embed_text_bad_input(tmp_path, text_model):
    base = ("--text-model", str(text_model), "-o", str(tmp_path / "o"))
    r = sh("embed-text", "-t", "fine", "-t", "   ", *base)
    assert r.returncode == 2 and "empty prompt" in r.stderr and "--text #2" in r.stderr
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok line\ncaf\xe9 latin-1\nfine\n\xff\xfe\n")
    r = sh("embed-text", "-f", str(bad), *base)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "lines 2, 4 are not valid UTF-8" in r.stderr and "line 2, byte 4: 0xe9" in r.stderr
    assert not (tmp_path / "o" / "embeddings.npy").exists()
    long = " ".join(["word"] * 100)
    r = sh("embed-text", "-t", long, "-t", "short", "-t", long + " more", *base)
    assert r.returncode == 0, r.stderr
    assert "2 of 3 prompts are longer than 77 tokens and were truncated" in r.stderr
    assert "--text #1 (102 tokens)" in r.stderr and "--text #3 (103 tokens)" in r.stderr
    rows = [json.loads(x) for x in (tmp_path / "o" / "prompts.jsonl").read_text().splitlines()]
    assert [x["truncated"] for x in rows] == [True, False, True]
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["truncated"] == [0, 2]
    r = sh("embed-text", "-t", long, "--no-truncate", *base)
    assert r.returncode == 2 and "needs 102 tokens" in r.stderr
    r = sh("embed-text", *base)
    assert r.returncode == 2 and "--text-file" in r.stderr


def test_embed_text_fake_backend(tmp_path):
    r = sh("embed-text", "-t", "a", "-t", "b", "--backend", "fake", "-o", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "o" / "embeddings.npy").shape == (2, 512)


def test_classify_end_to_end(tmp_path, image_run):
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\ncar\nsunset over the sea\n")
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\na blurry photo of the {}.\n")
    r = sh("classify", str(image_run), "--labels", str(labels), "--templates", str(templates), "-k", "3")
    assert r.returncode == 0, r.stderr
    assert "WARNING: the image and text models have SYNTHETIC random weights" in r.stderr and "SYNTHETIC" in r.stdout
    out = image_run / "zeroshot"
    rows = list(csv.reader((out / "predictions.csv").open()))
    assert rows[0] == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"] and len(rows) == 13
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    m = json.loads((out / "manifest.json").read_text())
    assert m["pairing"]["status"] == "matched" and m["synthetic_weights"] is True and m["images"] == 12
    # recompute by hand: class = renormalised mean of normalised template embeddings; softmax(100 img.cls)
    from pipeline.output import load_embeddings

    paths, emb = load_embeddings(image_run)
    text = paired_text_model(image_run).path
    e = TextEncoder(text).embed([t.replace("{}", c) for c in ["dog", "cat", "car", "sunset over the sea"]
                                 for t in ["a photo of a {}.", "a blurry photo of the {}."]]).embeddings.reshape(4, 2, -1)
    cls = e.mean(1)
    cls /= np.linalg.norm(cls, axis=1, keepdims=True)
    np.testing.assert_allclose(np.load(out / "class_embeddings.npy"), cls, atol=1e-6)
    logits = 100 * np.asarray(emb) @ cls.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    names = ["dog", "cat", "car", "sunset over the sea"]
    for i, pred in enumerate(preds):
        assert pred["path"] == paths[i]
        order = np.argsort(-p[i])[:3]
        assert [t["label"] for t in pred["top"]] == [names[j] for j in order]
        np.testing.assert_allclose([t["prob"] for t in pred["top"]], p[i, order], atol=2e-6)


def test_classify_refuses_an_unpaired_text_model(tmp_path, image_run):
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\n")
    other = tmp_path / "other.onnx"
    build_clip_text_onnx(other, arch="tiny", seed=1)
    r = sh("classify", str(image_run), "--labels", str(labels), "--text-model", str(other), "-o", str(tmp_path / "z"))
    assert r.returncode == 2 and "do not belong together" in r.stderr and "seed=1" in r.stderr
    # a text model with no recorded identity: refused unless asserted
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(other.read_bytes())
    r = sh("classify", str(image_run), "--labels", str(labels), "--text-model", str(plain), "-o", str(tmp_path / "z"))
    assert r.returncode == 2 and "--assume-paired" in r.stderr
    r = sh("classify", str(image_run), "--labels", str(labels), "--text-model", str(plain), "-o", str(tmp_path / "z"),
           "--assume-paired")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "z" / "manifest.json").read_text())["pairing"]["status"] == "asserted"
    # bad labels and templates
    labels.write_text("dog\ndog\n")
    r = sh("classify", str(image_run), "--labels", str(labels), "-o", str(tmp_path / "z"))
    assert r.returncode == 2 and "appears twice" in r.stderr
    labels.write_text("dog\ncat\n")
    t = tmp_path / "t.txt"
    t.write_text("a photo of a thing\n")
    r = sh("classify", str(image_run), "--labels", str(labels), "--templates", str(t), "-o", str(tmp_path / "z"))
    assert r.returncode == 2 and "exactly once" in r.stderr


def test_python_api_for_search(image_run, text_model):
    """embed_texts(prompts, run=OUT): the paired text model, normalised rows (what search uses)."""
    a = embed_texts(["a photo of a dog", "a cat"], run=image_run)
    assert a.shape == (2, 512) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    b = embed_texts(["a photo of a dog", "a cat"], model=text_model)
    np.testing.assert_allclose(a, b, atol=1e-6)  # the same synthetic tower (tiny, seed 0, quickgelu)
    with pytest.raises(PairingError):
        check_pairing({"info": {"clip_model": "openai/ViT-B-32"}}, text_model)
