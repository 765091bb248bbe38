"""Differential conformance: the fake sophon.sail against SOPHGO's real SAIL on the BM1684X cmodel.

Every scenario in tests/sail_scenarios.py (CLIP-TPU's call sequences with CPU decode, and every
SAIL call the sail backend makes) runs twice, each time in a fresh process: `fake` (this
interpreter, tests/fake_sail on PYTHONPATH) and `cmodel` (the TPU-MLIR venv's Python 3.10 with
real SAIL built by scripts/setup_sail_cmodel.sh: SAIL's and libsophon's own C++ with the chip
replaced by its software model). Each parametrised test asserts the same expected behaviour on
both, so the two agree: the same results (within the F16 bmodel's and the VPP's tolerance), or the
same failure (the same exception class, or SIGABRT). The cmodel half needs the TPU-MLIR venv and
the cmodel build (else it skips, saying which) and compiles the tiny model with TPU-MLIR: slow.

What the fake cannot match is listed in docs/sail-backend.md ("Fake vs real SAIL on the cmodel").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from imagegen import photo, write
from sail_helpers import FAKE_SAIL_DIR, ort_session, write_fake_bmodel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCENARIOS = os.path.join(ROOT, "tests", "sail_scenarios.py")
RUNTIMES = ["fake", pytest.param("cmodel", marks=pytest.mark.slow)]


def cmodel_python() -> str:
    """The venv interpreter with real SAIL on the cmodel, or skip saying what is missing."""
    from pipeline.backends.sail import cmodel_python as find
    from pipeline.config import ConfigError

    try:
        return find()
    except ConfigError as exc:
        pytest.skip(f"real SAIL on the BM1684X cmodel is not available: {exc}")


def run(runtime: str, scenario: str, args: dict, tmp_path, timeout: float = 600) -> dict:
    """Run one scenario; -> its result dict, or {"returncode": ..., "stderr": ...} when the process died."""
    argf = tmp_path / f"{scenario}-{runtime}.json"
    argf.write_text(json.dumps(args))
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    if runtime == "fake":
        py = sys.executable
        env["PYTHONPATH"] = os.pathsep.join([FAKE_SAIL_DIR, ROOT])
        env["FAKE_SAIL_TPUS"] = "1"
    else:
        py = cmodel_python()
        env["PYTHONPATH"] = ROOT  # never the fake: sophon.sail comes from the cmodel build's .pth
    p = subprocess.run([py, SCENARIOS, scenario, str(argf)], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"returncode": p.returncode, "stderr": p.stderr[-4000:]}


def cos_rows(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny synthetic CLIP ONNX (random weights), its fake bmodels and, when the cmodel half runs,
    its BM1684X F16 bmodels compiled by TPU-MLIR (batch 4 and 1)."""
    from pipeline.model.modelgen import build_clip_image_onnx

    d = tmp_path_factory.mktemp("diff")
    onnx_path = d / "tiny.onnx"
    build_clip_image_onnx(onnx_path, arch="tiny", seed=0, input_kind="float")
    imgs = [str(write(d / f"p{i}.jpg", photo(260 + 37 * i, 300 - 23 * i, 40 + i))) for i in range(3)]
    return {"dir": d, "onnx": onnx_path, "images": imgs, "bmodels": {}}


def bmodel(model, runtime: str, batch: int) -> str:
    key = (runtime, batch)
    if key not in model["bmodels"]:
        d = model["dir"]
        if runtime == "fake":
            path = write_fake_bmodel(d / f"fake_{batch}b.bmodel", model["onnx"], [batch])
        else:
            cmodel_python()
            from pipeline.toolchain.compile import compile_onnx

            side = compile_onnx(model["onnx"], d / "bm", batches=[batch], log=lambda s: None)[0]
            path = d / "bm" / side["bmodel"]
        model["bmodels"][key] = str(path)
    return model["bmodels"][key]


def reference(model, x: np.ndarray) -> np.ndarray:
    sess = ort_session(model["onnx"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_engine_numpy_sequence(runtime, model, tmp_path):
    """CLIP-TPU's numpy path: introspection, zero-padded batch, trimmed rows; a shape that matches
    no stage raises SailEngineError (engine.cpp:253-310); outputs match onnxruntime (F16 on the cmodel)."""
    x = np.random.default_rng(1).normal(size=(3, 3, 224, 224)).astype(np.float32)
    r = run(runtime, "engine_numpy", {"bmodel": bmodel(model, runtime, 4), "x": x.tolist()}, tmp_path)
    assert r.get("input_shape") == [4, 3, 224, 224], r
    assert r["output_shape"] == [4, 512]
    assert (r["input_dtype"], r["output_dtype"]) == ("BM_FLOAT32", "BM_FLOAT32")
    assert r["bad_shape"] == "SailEngineError"
    cos = cos_rows(r["y"], reference(model, x))
    assert cos.min() >= 0.999, cos


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_upload_and_crop(runtime, model, tmp_path):
    """Tensor -> tensor_to_bm_image is exact and BGR_PLANAR uint8; Bmcv.crop is exact; outside the
    VPP limits and with BICUBIC the BMImage-returning forms raise SailBMImageError (SAIL_CHECK_RET,
    cvwrapper.cpp:4190, 4263)."""
    r = run(runtime, "upload_crop", {}, tmp_path)
    # The one deliberate difference: Bmcv.crop's output rows are FFALIGN(w, SAIL_ALIGN) bytes, and
    # SAIL_ALIGN is 64 on SoC builds (IS_SOC_MODE: an SE7, what the fake models) but 1 on PCIe
    # builds (src/internal.h:117-121), which the cmodel build is. bm_image_to_tensor is zero-copy
    # and ignores the stride (cvwrapper.cpp:3903-3937): a 250-px crop reads back sheared on an SE7
    # (and the fake), exact on the cmodel. The backend never reads a crop through it.
    assert r == {"wh": [320, 256], "format": "FORMAT_BGR_PLANAR", "dtype": "DATA_TYPE_EXT_1N_BYTE",
                 "upload_exact": True, "crop_wh": [256, 256], "crop_format": "FORMAT_BGR_PLANAR",
                 "crop_exact": True, "crop250_readback_exact": runtime == "cmodel",
                 "crop_9000": "SailBMImageError", "resize_bicubic": "SailBMImageError"}, r


#: ties, saturation and a 2-element scalar tail (10 = 2 groups of 4 + 2)
QX = [0.5, 1.5, 2.5, -0.5, -1.5, 127.5, 200.0, -200.0, 0.5, -2.5]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_int8_input_quantisation(runtime, tmp_path):
    """AnyScale_SSE (the numpy Engine.process's quantisation, via Tensor.scale_from): whole groups of
    4 round half to even and saturate to [-128, 127]; the scalar tail rounds half away from zero and
    clamps int8 to [-127, 127] (src/internal.h:349-392, 432-475). Not "half away, [-127, 127]" for
    all: that is only the tail and the non-SSE AnyScale."""
    r = run(runtime, "quantise", {"x": QX, "scale": 1.0}, tmp_path)
    assert r == {"int8": [0, 2, 2, 0, -2, 127, 127, -128, 1, -3], "uint8": [0, 2, 2, 0, 0, 128, 200, 0, 1, 0]}, r


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_epp_batch_with_fresh_padding(runtime, model, tmp_path):
    """CLIP-TPU's EngineImagePreProcess sequence with CPU decode: 3 photos + 1 fresh pad in a 4-batch;
    rows come back with the pushed indices; PushImage leaves the pushed object's width field."""
    r = run(runtime, "epp_batch", {"bmodel": bmodel(model, runtime, 4), "images": model["images"]}, tmp_path)
    assert r.get("idxs") == [0, 1, 2, -1], r
    assert r["channels"] == [0, 0, 0, 0]
    assert r["moved_widths"] == [260, 277, 254, 224]  # min(w, h) of each centre square, and the pad
    # the device preprocessing: centre square, linear resize (the VPP's own on the cmodel)
    import cv2
    from PIL import Image

    from pipeline.data.images import normalize

    crops = []
    for p in model["images"]:
        a = np.asarray(Image.open(p).convert("RGB"))
        h, w = a.shape[:2]
        s = min(w, h)
        sq = a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        crops.append(cv2.resize(sq, (224, 224), interpolation=cv2.INTER_LINEAR))
    ref = reference(model, normalize(np.stack(crops)))
    cos = cos_rows(np.asarray(r["y"])[:3], ref)
    assert cos.min() >= 0.995, cos


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("case", ["push_twice", "bicubic"])
def test_epp_aborts(runtime, case, model, tmp_path):
    """The two aborts of issue #25, on the fake and on real SAIL alike: a BMImage pushed a second time
    (PushImage moved it: decoder_multi.cpp:1367, :128-140; cvwrapper.cpp:3260-3271) and
    BM_RESIZE_TPU_BICUBIC (the BM1684X VPP takes nearest and linear only: bmcv_1684x_vpp_internal.cpp:
    648-654), each thrown in an EngineImagePreProcess thread: std::terminate, SIGABRT. This is why
    the config refuses sail.resize = "bicubic" and why the backend pads with fresh images."""
    args = {"bmodel": bmodel(model, runtime, 4), "images": model["images"]}
    if case == "bicubic":
        r = run(runtime, "epp_batch", dict(args, resize="BM_RESIZE_TPU_BICUBIC"), tmp_path)
    else:
        r = run(runtime, "epp_push_twice", args, tmp_path)
    assert r.get("returncode") == -signal.SIGABRT, r
    assert "terminate called after throwing an instance of 'sail::SailBMImageError'" in r["stderr"], r["stderr"]


@pytest.fixture(scope="module")
def crops(model):
    from pipeline.data.images import DecodeOptions, decode_file, reference_crop

    c = np.stack([reference_crop(decode_file(os.fsencode(p), DecodeOptions())) for p in model["images"]])
    path = model["dir"] / "crops.npy"
    np.save(path, c)
    return path, c


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_backend_host_mode(runtime, model, crops, tmp_path):
    """SailHostDevice (numpy Engine.process, stage discovery, zero padding) equals the cpu backend's
    onnxruntime on the same ONNX: cosine >= 0.999 (F16 bmodel on the cmodel)."""
    from pipeline.data.images import normalize

    path, c = crops
    r = run(runtime, "backend", {"bmodel": bmodel(model, runtime, 4), "mode": "host", "crops": str(path),
                                 "runtime": "chip" if runtime == "fake" else "cmodel"}, tmp_path)
    assert "y" in r, r
    cos = cos_rows(r["y"], reference(model, normalize(c)))
    assert len(cos) == 3 and cos.min() >= 0.999, cos


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_backend_device_mode(runtime, model, tmp_path):
    """SailFilesDevice (CPU decode -> Tensor -> tensor_to_bm_image -> Bmcv.crop -> EPP, fresh pads)
    embeds every photo, close to CLIP's reference (the linear resize differs from PIL bicubic)."""
    from sail_helpers import cpu_reference

    imgs = model["images"]
    r = run(runtime, "backend", {"bmodel": bmodel(model, runtime, 4), "mode": "device", "images": imgs,
                                 "runtime": "chip" if runtime == "fake" else "cmodel"}, tmp_path)
    assert r.get("ids") == [0, 1, 2] and r["failures"] == [], r
    cos = cos_rows(r["y"], cpu_reference(ort_session(model["onnx"]), imgs))
    assert cos.min() >= 0.99, cos


def test_cmodel_sail_is_built_and_imports():
    """In the default suite: skips (saying what is missing and how to build it) when real SAIL on the
    cmodel is not there, so the slow cmodel half above cannot run; else imports it in the venv and
    opens the cmodel's device 0 (scripts/setup_sail_cmodel.sh --check)."""
    cmodel_python()
    p = subprocess.run([os.path.join(ROOT, "scripts", "setup_sail_cmodel.sh"), "--check"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "ok: sophon.sail from" in p.stdout, p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("n", [12, 41])
def test_shipped_config_on_real_sail_cmodel(n, model, tmp_path):
    """configs/bm1684x.toml as shipped (device mode, linear resize, one chip) with
    sail.runtime = "cmodel" and a 4-batch tiny bmodel from `compile`: the CLI exits 0 and every
    photo is a row (12 = 3 full batches; 41 ends on a short batch padded with fresh images), close
    to CLIP's reference on the cpu backend's onnxruntime."""
    from conftest import cli, cli_env
    from imagegen import make_images
    from sail_helpers import cpu_reference

    from pipeline.output import load_embeddings

    bm = bmodel(model, "cmodel", 4)
    files = make_images(tmp_path / "imgs", n, seed=n)
    out = tmp_path / "out"
    p = subprocess.run(cli("run", "--config", os.path.join(ROOT, "configs", "bm1684x.toml"), "-i", str(tmp_path / "imgs"),
                           "-o", str(out), "--set", 'sail.runtime="cmodel"', "--set", f'model.path="{bm}"',
                           "--progress", "log"), env=cli_env(), capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "real SAIL on the BM1684X cmodel" in p.stderr
    paths, emb = load_embeddings(out)
    assert sorted(paths) == sorted(str(f) for f in files)
    ref = cpu_reference(ort_session(model["onnx"]), paths)
    cos = cos_rows(np.asarray(emb), ref)
    assert cos.min() >= 0.99, cos
