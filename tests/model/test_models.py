"""Models beyond ViT-B/32: the crop size and the embedding width come from the model.

A tiny tower with 336x336 input and 768-d output runs end to end (fused and unfused
decode/preprocess), its rows equal onnxruntime on CLIP's reference crop at 336, and zero-shot
classification pairs it with its 768-d text tower.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from clip_reference import clip_transform  # the tests' own CLIP transform, independent of pipeline/
from PIL import Image

from pipeline.model.modelgen import build_clip_image_onnx
from pipeline.model.models import model_image_size
from tests.conftest import ROOT, cli, cli_env

SAMPLES = ROOT / "samples" / "images"


@pytest.fixture(scope="module")
def model336(tmp_path_factory):
    d = tmp_path_factory.mktemp("m336")
    build_clip_image_onnx(d / "img336.onnx", arch="tiny-336", seed=0)
    return d / "img336.onnx"


def test_image_size_is_read_from_the_model(tmp_path, model336, tiny_model):
    assert model_image_size(model336) == 336
    assert model_image_size(tiny_model) == 224
    u8 = tmp_path / "u8.onnx"
    build_clip_image_onnx(u8, arch="tiny-336", seed=0, input_kind="uint8")
    (tmp_path / "u8.onnx.json").unlink()  # from the ONNX graph itself, without the sidecar
    assert model_image_size(u8) == 336


@pytest.mark.parametrize("fused", [True, False])
def test_336_input_768_width_end_to_end(tmp_path, model336, fused):
    out = tmp_path / "out"
    r = subprocess.run(cli("run", "-i", str(SAMPLES), "-o", str(out), "--set", f'model.path="{model336}"',
                           "--set", 'infer.devices=["cpu:0"]', "--set", f"workers.fuse_decode_preprocess={str(fused).lower()}",
                           "-q"), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from pipeline.output import load_embeddings

    paths, emb = load_embeddings(out)
    emb = np.asarray(emb)
    assert emb.shape == (12, 768)
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["model"]["image_size"] == 336
    sess = ort.InferenceSession(str(model336), providers=["CPUExecutionProvider"])
    for i in (0, 3, 7):  # the reference: the tests' own CLIP transform at 336, not pipeline.data.images
        x = clip_transform(Image.open(paths[i]), 336)
        assert x.shape == (3, 336, 336)
        want = sess.run(None, {"image": x[None]})[0][0]
        want /= np.linalg.norm(want)
        np.testing.assert_allclose(emb[i], want, atol=2e-5)


def test_a_crop_size_the_model_does_not_take_is_refused(tmp_path, model336):
    r = subprocess.run(cli("run", "-i", str(SAMPLES), "-o", str(tmp_path / "o"), "--set", f'model.path="{model336}"',
                           "--set", "model.image_size=224", "--set", 'infer.devices=["cpu:0"]', "-q"),
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "takes 336x336" in r.stderr and "model.image_size" in r.stderr


def test_classify_a_768_wide_run(tmp_path, model336):
    out = tmp_path / "out"
    r = subprocess.run(cli("run", "-i", str(SAMPLES), "-o", str(out), "--set", f'model.path="{model336}"',
                           "--set", 'infer.devices=["cpu:0"]', "-q"), cwd=ROOT, env=cli_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\ncar\n")
    r = subprocess.run(cli("classify", str(out), "--labels", str(labels), "-k", "2"), cwd=ROOT, env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert np.load(out / "zeroshot" / "class_embeddings.npy").shape == (3, 768)
    assert (model336.parent / "clip-text-tiny-336-seed0-quickgelu-synthetic.onnx").is_file()


# what a run's start-up skips: the model's sha256, remembered per file
def test_model_sha256_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import hashlib
    import os
    import time

    from pipeline.model import models
    from pipeline.model.models import model_sha256

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "clip-pipeline" / "model-sha256.json"
    f = tmp_path / "m.onnx"
    f.write_bytes(b"a" * 1000)
    assert model_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert not cache.exists()  # just written: too recent to be remembered (coarse timestamps)
    monkeypatch.setattr(models, "RACY_NS", 0)
    assert model_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert str(f) in cache.read_text()
    st = os.stat(f)
    time.sleep(0.05)  # past the file system's timestamp tick
    f.write_bytes(b"b" * 1000)  # same size, and the mtime put back: the ctime still tells
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()
    cache.write_text("{not json")
    assert model_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()  # a broken cache is ignored
