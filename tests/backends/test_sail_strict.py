"""The fake sophon.sail is as strict as SAIL's source (issue #11), and the sail backend survives it.

Each behaviour below is one the real library has (the fake's comments cite the SAIL / libsophon
source line) that is harsher than a friendly test double would be. Every test first proves the
FAKE fails where the real library fails, then that the backend never triggers it or handles it.
None of this was seen on hardware: docs/sail-backend.md keeps the table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from imagegen import photo, write
from sail_helpers import (
    FAKE_SAIL_DIR,
    cpu_reference,
    misuse_log,
    ort_session,
    use_fake_sail,
    write_fake_bmodel,
)

from pipeline.backends.base import DeviceError
from pipeline.config import ConfigError, from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from pipeline.model.modelgen import build_clip_image_onnx

    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    build_clip_image_onnx(path, arch="tiny", seed=0, input_kind="float")
    return path


@pytest.fixture
def fake(monkeypatch):
    use_fake_sail(monkeypatch, tpus=2)
    from sophon import sail

    assert sail.__fake__
    return sail


def cfg_for(bmodel, mode="device", **sail):
    return from_dict({"model": {"path": str(bmodel)}, "infer": {"backend": "sail", "devices": [0]},
                      "sail": {"mode": mode, **sail}})


def open_dev(cfg, dev="sail:0"):
    from pipeline.backends.sail import SailBackend

    return SailBackend.open_device(cfg, dev)


def run_snippet(code: str, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    """Run `code` against the fake in a fresh interpreter: what aborts the process must not kill pytest."""
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([FAKE_SAIL_DIR, ROOT]), FAKE_SAIL_TPUS="1", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


EPP_SCRIPT = """
    import sys, time, cv2, numpy as np
    import sophon.sail as sail
    bmodel, resize, set_convert, img = {bmodel!r}, {resize!r}, {set_convert!r}, {img!r}
    epp = sail.EngineImagePreProcess(bmodel, 0, False)
    epp.InitImagePreProcess(getattr(sail.sail_resize_type, resize), True, 8, 8)
    if set_convert:
        epp.SetConvertAtrr(((0.0146, -1.79), (0.0150, -1.75), (0.0142, -1.48)))
    handle = sail.Handle(0)
    for i in range(4):
        bmimg = sail.Decoder(img, True, 0).read(handle)  # a fresh image per push: PushImage moves it
        while epp.PushImage(0, i, bmimg) != 0:
            time.sleep(0.01)
    out = epp.GetBatchData_Npy()
    print("BATCH", out[3])
"""


def epp_run(bmodel, img, resize="BM_RESIZE_TPU_LINEAR", set_convert=True):
    return run_snippet(EPP_SCRIPT.format(bmodel=str(bmodel), resize=resize, set_convert=set_convert, img=str(img)))


# ------------------------------------------------------------------ EPP: resize the VPP rejects
def test_fake_dies_on_a_bicubic_preprocess_batch_as_a_bm1684x_would(tmp_path, onnx_model):
    """decoder_multi.cpp:1941-1947 maps BM_RESIZE_TPU_BICUBIC to bmcv.resize(BICUBIC); libsophon's
    BM1684X VPP rejects it (bmcv_1684x_vpp_internal.cpp:648-654); the throw in a detached thread
    ends the process with SIGABRT. LINEAR, the same script otherwise, delivers its batch."""
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    img = write(tmp_path / "a.jpg", photo(320, 240, 1))
    ok = epp_run(bm, img)
    assert ok.returncode == 0 and "BATCH [0, 1, 2, 3]" in ok.stdout, ok.stderr
    dead = epp_run(bm, img, resize="BM_RESIZE_TPU_BICUBIC")
    assert dead.returncode == -signal.SIGABRT, (dead.returncode, dead.stderr)
    assert "BATCH" not in dead.stdout
    assert "BMCV_INTER_BICUBIC is not supported on BM1684X" in dead.stderr
    assert "terminate called after throwing an instance of 'sail::SailBMImageError'" in dead.stderr


def test_push_before_set_convert_attr_aborts(tmp_path, onnx_model):
    """Every preprocess thread starts with `if (!set_convert_attr_flag) throw SailRuntimeError(
    "invalid status")`; the threads start at the first push. The backend always calls
    InitImagePreProcess and SetConvertAtrr in its constructor, before any push."""
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    img = write(tmp_path / "a.jpg", photo(320, 240, 1))
    dead = epp_run(bm, img, set_convert=False)
    assert dead.returncode == -signal.SIGABRT and "sail::SailRuntimeError" in dead.stderr, dead.stderr


def test_backend_calls_init_and_set_convert_before_any_push(fake, tmp_path, onnx_model, monkeypatch):
    calls = []
    for name in ("InitImagePreProcess", "SetConvertAtrr", "PushImage"):
        orig = getattr(fake.EngineImagePreProcess, name)
        monkeypatch.setattr(fake.EngineImagePreProcess, name,
                            lambda self, *a, _o=orig, _n=name: (calls.append(_n), _o(self, *a))[1])
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    img = write(tmp_path / "a.jpg", photo(320, 240, 1))
    open_dev(cfg_for(bm)).embed_files([0], [os.fsencode(img)])
    assert calls[:2] == ["InitImagePreProcess", "SetConvertAtrr"] and set(calls[2:]) == {"PushImage"}


# -------------------------------------------------------------------------- EPP: lifecycle
def test_epp_lifecycle_as_in_decoder_multi(fake, tmp_path, onnx_model):
    sail = fake
    bm = write_fake_bmodel(tmp_path / "b1.bmodel", onnx_model, [1])
    epp = sail.EngineImagePreProcess(str(bm), 0, False)
    path = str(write(tmp_path / "a.jpg", photo(300, 300, 2)))

    def image():  # PushImage moves the BMImage: every push needs a fresh one
        return sail.Decoder(path, True, 0).read(sail.Handle(0))

    img = image()
    # before InitImagePreProcess: `if (pre_process_ == NULL) return 1;`
    assert epp.SetConvertAtrr(((1, 0),) * 3) == 1
    assert epp.PushImage(0, 0, img) == 1
    assert img.width() == 300 and img._arr is not None  # refused: not moved
    assert epp.InitImagePreProcess(sail.sail_resize_type.BM_RESIZE_TPU_LINEAR, True, 1, 1) == 0
    before = {t.name for t in threading.enumerate()}
    assert epp.SetConvertAtrr(((1 / 255, 0),) * 3) == 0
    # a second SetConvertAtrr returns 0 (EngineImagePreProcess_CC ignores ImagePreProcess_CC's 1)
    # and changes nothing
    assert epp.SetConvertAtrr(((100.0, 5.0),) * 3) == 0
    mine = {f"fake-sail-preprocess-{epp._tag}", f"fake-sail-infer-{epp._tag}"}
    assert not mine & before
    assert epp.PushImage(0, 0, img) == 0
    assert img._arr is None and img.width() == 300  # moved: no memory left, width field kept
    names = {t.name for t in threading.enumerate()}
    assert mine <= names  # the threads start at the first push
    epp.GetBatchData_Npy()
    x, _ = sail.LAST_EPP_INPUT
    assert 0 <= x.min() and x.max() <= 1.0  # the first alpha/beta (1/255, 0), not (100, 5)
    # nobody takes batches: the inference thread buffers at most 5, then everything backs up
    # until PushImage returns 2 (`ChannelIdx_queue.size() >= queue_size_in_`)
    codes = []
    for i in range(40):
        codes.append(epp.PushImage(0, i, image()))
        if codes[-1] == 2:
            break
        time.sleep(0.05)
    assert codes[-1] == 2 and codes.count(0) >= 6, codes
    deadline = time.monotonic() + 5
    while len(epp._results) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(epp._results) == 5  # EngineImagePreProcess_CC: max_queue_size_ = 5
    epp.GetBatchData_Npy()  # room again
    deadline = time.monotonic() + 5
    while epp.PushImage(0, 99, image()) != 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_backend_retries_push_on_a_full_queue(fake, tmp_path, onnx_model, monkeypatch):
    """PushImage returns 2 while the input queue is full: the backend pushes again, and a queue
    that stays full past sail.timeout_s is a DeviceError, never a hang. (The backend keeps one
    batch in flight with a 2-batch queue, so on the fake it never actually sees a 2: forced here.)"""
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    dev = open_dev(cfg_for(bm, timeout_s=1.0))
    real = dev.epp.PushImage
    script = iter([2, 2, 2])
    dev.epp.PushImage = lambda c, i, img: next(script, None) or real(c, i, img)
    img = write(tmp_path / "a.jpg", photo(260, 200, 1))
    assert dev.embed_files([0], [os.fsencode(img)]).ids == [0]
    pushes = []
    dev.epp.PushImage = lambda c, i, img: pushes.append(i) or 2

    class Clock:  # the backend's clock: each look advances it 0.1 s, a sleep takes no time
        now = 0.0

        def monotonic(self) -> float:
            self.now += 0.1
            return self.now

        def sleep(self, _s: float) -> None:
            pass

    from pipeline.backends import sail

    clock = Clock()
    monkeypatch.setattr(sail, "time", clock)
    with pytest.raises(DeviceError, match="queue stayed full"):
        dev.embed_files([1], [os.fsencode(img)])
    # it pushed again until sail.timeout_s (1 s) had passed on its clock, then gave up
    assert len(pushes) >= 5 and clock.now >= 1.0


# ------------------------------------------------------ bmcv errors in the preprocess threads
def test_bmcv_error_in_a_preprocess_thread_aborts(tmp_path, onnx_model):
    """decoder_multi.cpp:1816, 1823 (convert_format), 1914-1975 (resize): a non-zero bmcv status
    is thrown in a detached thread. FAKE_SAIL_BMCV_FAIL_WIDTHS stands in for any such failure."""
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    img = write(tmp_path / "a.jpg", photo(333, 240, 1))
    dead = run_snippet(EPP_SCRIPT.format(bmodel=str(bm), resize="BM_RESIZE_TPU_LINEAR", set_convert=True, img=str(img)),
                       FAKE_SAIL_BMCV_FAIL_WIDTHS="333")
    assert dead.returncode == -signal.SIGABRT and "bmcv api fail" in dead.stderr, dead.stderr


def test_pipeline_survives_an_input_that_aborts_the_device_process(tmp_path, onnx_model, monkeypatch):
    """The device process dies (SIGABRT) on one input, twice: the supervisor restarts it, the input
    ends as crashed_worker, every other input is embedded, the run completes (exit 3)."""
    from pipeline.output import load_embeddings
    from pipeline.run.supervisor import run

    use_fake_sail(monkeypatch, tpus=1)
    monkeypatch.setenv("FAKE_SAIL_BMCV_FAIL_WIDTHS", "333")  # the centre square of bad.jpg is 333 wide
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(9):
        write(imgs / f"ok{i}.jpg", photo(300 + 10 * i, 260, 10 + i))
    write(imgs / "bad.jpg", photo(400, 333, 3))
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    cfg = from_dict({"input": {"paths": [str(imgs)]}, "output": {"dir": str(tmp_path / "out"), "shard_size": 4},
                     "model": {"path": str(bm)}, "infer": {"backend": "sail", "devices": [0], "batch_timeout_ms": 20},
                     "run": {"progress": "none", "start_timeout_s": 120, "stall_timeout_s": 60, "max_restarts": 5}})
    res = run(cfg)
    assert res.exit_code == 3, res.message
    paths, emb = load_embeddings(res.out_dir)
    assert sorted(os.path.basename(p) for p in paths) == sorted(f"ok{i}.jpg" for i in range(9))
    import json

    with open(os.path.join(res.out_dir, "failures.jsonl"), encoding="utf-8") as fh:
        fails = [json.loads(x) for x in fh]
    assert [(os.path.basename(f["path"]), f["reason"]) for f in fails] == [("bad.jpg", "crashed_worker")]


# ---------------------------------------------------------------- failed inference launches
# (tests/backends/test_sail.py: test_fake_failed_launch_is_silent_and_leaves_stale_outputs,
#  test_host_failed_launch_is_device_error, test_device_mode_failed_launch_is_device_error)


# ------------------------------------------------------------------- non-FP32 input bmodels
def _uint8_nchw_mean_onnx(path):
    """uint8 [N,3,224,224] -> per-channel mean [N,3] (a stand-in for a bmodel with uint8 input)."""
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("GlobalAveragePool", ["f"], ["p"]),
         helper.make_node("Flatten", ["p"], ["embedding"], axis=1)],
        "mean", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_fake_feeds_signed_int8_to_a_uint8_input_bmodel(fake, tmp_path):
    """decoder_multi.cpp:2411-2414: any non-FP32 input gets DATA_TYPE_EXT_1N_BYTE_SIGNED, and
    2480-2489 multiply alpha and beta by the input scale: bright pixels saturate at 127."""
    sail = fake
    onnx_path = _uint8_nchw_mean_onnx(tmp_path / "mean.onnx")
    bm = write_fake_bmodel(tmp_path / "u8.bmodel", onnx_path, [1], input_dtype="uint8")
    bright = np.full((300, 300, 3), 200, np.uint8)
    epp = sail.EngineImagePreProcess(str(bm), 0, False)
    epp.InitImagePreProcess(sail.sail_resize_type.BM_RESIZE_TPU_LINEAR, True, 1, 1)
    epp.SetConvertAtrr(((1.0, 0.0),) * 3)
    epp.PushImage(0, 0, sail.Bmcv(sail.Handle(0)).mat_to_bm_image(bright))
    y = epp.GetBatchData_Npy()[0]["embedding"]
    np.testing.assert_allclose(y, [[127, 127, 127]])  # not 200: int8 saturation, read back as uint8


def test_fake_scales_alpha_beta_by_the_int8_input_scale(fake, tmp_path, onnx_model):
    sail = fake
    bm = write_fake_bmodel(tmp_path / "i8.bmodel", onnx_model, [1], input_dtype="int8")
    import json

    meta = json.loads(bm.read_text())
    meta["input_scale"] = 20.0
    bm.write_text(json.dumps(meta))
    epp = sail.EngineImagePreProcess(str(bm), 0, False)
    epp.InitImagePreProcess(sail.sail_resize_type.BM_RESIZE_TPU_LINEAR, True, 1, 1)
    epp.SetConvertAtrr(((1 / 255, -0.5),) * 3)
    grey = np.full((224, 224, 3), 153, np.uint8)
    epp.PushImage(0, 0, sail.Bmcv(sail.Handle(0)).mat_to_bm_image(grey))
    epp.GetBatchData_Npy()
    x, _ = sail.LAST_EPP_INPUT  # what the network computed on (int8 / scale)
    # int8 = rint((153/255 - 0.5) * 20) = rint(2.0) = 2 -> 2 / 20 = 0.1
    np.testing.assert_allclose(x, 0.1, atol=1e-6)


@pytest.mark.parametrize("kind", ["uint8_nhwc", "uint8_nchw", "int8"])
def test_device_mode_refuses_non_float32_input_bmodels(fake, tmp_path, onnx_model, kind):
    from pipeline.model.modelgen import build_clip_image_onnx

    if kind == "uint8_nhwc":  # our fused bmodels: normalisation folded in, uint8 pixels in
        path = tmp_path / "fused.onnx"
        build_clip_image_onnx(path, arch="tiny", seed=0, input_kind="uint8")
        bm = write_fake_bmodel(tmp_path / "b4.bmodel", path, [4], input_dtype="uint8")
    elif kind == "uint8_nchw":
        bm = write_fake_bmodel(tmp_path / "b4.bmodel", _uint8_nchw_mean_onnx(tmp_path / "m.onnx"), [4], input_dtype="uint8")
    else:
        bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4], input_dtype="int8")
    with pytest.raises(ConfigError) as ei:
        open_dev(cfg_for(bm))
    msg = str(ei.value)
    assert "\n" not in msg and str(bm) in msg
    if kind != "int8":
        assert "signed-int8" in msg and 'sail.mode = "host"' in msg


def test_host_mode_still_runs_fused_uint8_bmodels(fake, tmp_path):
    from pipeline.model.modelgen import build_clip_image_onnx

    path = tmp_path / "fused.onnx"
    build_clip_image_onnx(path, arch="tiny", seed=0, input_kind="uint8")
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", path, [4], input_dtype="uint8")
    dev = open_dev(cfg_for(bm, "host"))
    px = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    sess = ort_session(path)
    np.testing.assert_allclose(dev.embed(px), sess.run(None, {sess.get_inputs()[0].name: px})[0], atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------- Bmcv.crop and the VPP
def test_fake_crop_is_planar_strided_and_vpp_bound(fake, tmp_path):
    sail = fake
    h = sail.Handle(0)
    bmcv = sail.Bmcv(h)
    img = sail.Decoder(str(write(tmp_path / "a.jpg", photo(500, 300, 4))), True, 0).read(h)
    assert img.format() == sail.Format.FORMAT_BGR_PACKED
    sq = bmcv.crop(img, 100, 0, 300, 300)
    assert sq.format() == sail.Format.FORMAT_BGR_PLANAR and sq._stride == 320  # 300 -> 64-byte multiple
    bgr = np.asarray(sail._to_bgr_packed(sq))
    np.testing.assert_array_equal(bgr, np.asarray(sail._to_bgr_packed(img))[:, 100:400])
    # zero-copy bm_image_to_tensor ignores the row padding (§3.4): sheared rows
    t = bmcv.bm_image_to_tensor(sq)
    assert not np.array_equal(t.asnumpy()[0], sq._arr)
    # outside the VPP limits (8..8192 a side): bmcv fails, crop_and_resize returns SAIL_ERR_BMI_BMCV
    # (cvwrapper.cpp:4107-4110) and the BMImage-returning forms raise it (SAIL_CHECK_RET, :4190, :4263)
    wide = sail.Decoder(str(write(tmp_path / "w.jpg", photo(9000, 300, 5))), True, 0).read(h)
    with pytest.raises(sail.SailBMImageError):
        bmcv.crop(wide, 4350, 0, 300, 300)
    tiny = sail.Decoder(str(write(tmp_path / "t.jpg", photo(6, 6, 6))), True, 0).read(h)
    with pytest.raises(sail.SailBMImageError):
        bmcv.resize(tiny, 224, 224, sail.bmcv_resize_algorithm.BMCV_INTER_LINEAR)


@pytest.mark.parametrize("w,h", [(9000, 300), (300, 9000), (6, 6), (6, 300), (8300, 8300)])
def test_device_mode_images_outside_the_vpp_limits(fake, tmp_path, onnx_model, monkeypatch, w, h):
    """A 9000-pixel-wide JPEG and a 6-pixel one: decoded by the JPU, never cropped by the VPP,
    CLIP's exact crop on the CPU instead; the embedding equals the CPU reference."""
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    dev = open_dev(cfg_for(bm))
    crops = []
    orig = dev.bmcv.crop
    monkeypatch.setattr(dev.bmcv, "crop", lambda img, *a: (crops.append((img.width(), img.height())), orig(img, *a))[1])
    big = write(tmp_path / "x.jpg", photo(w, h, 7))
    normal = write(tmp_path / "n.jpg", photo(400, 300, 8))
    res = dev.embed_files([0, 1], [os.fsencode(big), os.fsencode(normal)])
    assert res.ids == [0, 1] and not res.failures
    assert crops == [(400, 300)]  # only the normal image was cropped on the device
    ref = cpu_reference(ort_session(onnx_model), [big])
    np.testing.assert_allclose(res.embeddings[0], ref[0], atol=1e-4, rtol=1e-4)


def test_device_mode_bmcv_crop_that_raises_is_a_per_input_cpu_crop(fake, tmp_path, onnx_model, monkeypatch):
    """The BMImage-returning Bmcv.crop raises SailBMImageError on a bmcv failure (SAIL_CHECK_RET,
    src/cvwrapper.cpp:4190). Should one raise inside the limits, only that input is affected: it
    takes CLIP's exact crop on the CPU and is embedded; the device goes on with the next batch."""
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    dev = open_dev(cfg_for(bm))
    orig = dev.bmcv.crop

    def crop(img, *a):
        if img.width() == 333:
            raise fake.SailBMImageError("BMImage related error!")
        return orig(img, *a)

    monkeypatch.setattr(dev.bmcv, "crop", crop)
    bad = write(tmp_path / "bad.jpg", photo(333, 250, 3))
    good = write(tmp_path / "good.jpg", photo(400, 300, 4))
    res = dev.embed_files([0, 1], [os.fsencode(bad), os.fsencode(good)])
    assert res.ids == [0, 1] and not res.failures
    ref = cpu_reference(ort_session(onnx_model), [bad])
    np.testing.assert_allclose(res.embeddings[0], ref[0], atol=1e-4, rtol=1e-4)  # the CPU's exact crop
    assert dev.embed_files([2], [os.fsencode(good)]).ids == [2]


# -------------------------------------------------------------------------- mat_to_bm_image
def test_fake_mat_to_bm_image_refuses_non_uint8_with_type_error(fake):
    """SAIL src/bind.cpp binds it with py::arg("input_array").noconvert() over array_t<uint8_t>."""
    bmcv = fake.Bmcv(fake.Handle(0))
    for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint16), [[[0, 0, 0]]]):
        with pytest.raises(TypeError, match="incompatible function arguments"):
            bmcv.mat_to_bm_image(bad)
    assert bmcv.mat_to_bm_image(np.zeros((8, 8, 3), np.uint8)).width() == 8


def test_device_mode_uploads_only_uint8(fake, tmp_path, onnx_model):
    """16-bit PNG and a greyscale JPEG take the CPU path and are uploaded as uint8 BGR."""
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    dev = open_dev(cfg_for(bm))
    p16 = tmp_path / "deep.png"
    write(p16, photo(300, 260, 9).astype(np.uint16) * 257)
    grey = tmp_path / "grey.jpg"
    write(grey, photo(300, 260, 10)[:, :, 2])
    res = dev.embed_files([0, 1], [os.fsencode(p16), os.fsencode(grey)])
    assert res.ids == [0, 1] and not res.failures
    with pytest.raises(ValueError, match="uint8"):
        dev._upload(np.zeros((8, 8, 3), np.float32))


# ------------------------------------------------------------ one Engine, two threads: loud
def test_fake_fails_loudly_on_concurrent_engine_process(fake, tmp_path, onnx_model, monkeypatch):
    """The numpy Engine.process writes engine-owned tensors with no lock (engine.cpp:1290-1330)."""
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    eng = fake.Engine(str(bm), 0, fake.IOMode.SYSIO)
    g = eng.get_graph_names()[0]
    name = eng.get_input_names(g)[0]
    monkeypatch.setenv("FAKE_SAIL_NUMPY_RELEASE_GIL", "1")
    monkeypatch.setenv("FAKE_SAIL_INFER_MS", "200")
    errors = []

    def call():
        try:
            eng.process(g, {name: np.zeros((4, 3, 224, 224), np.float32)})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    ts = [threading.Thread(target=call) for _ in range(2)]
    for t in ts:
        t.start()
        time.sleep(0.05)
    for t in ts:
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], fake.FakeSailMisuse)
    assert not isinstance(errors[0], Exception)  # `except Exception` in the code under test cannot hide it
    assert "no lock" in misuse_log()


def test_overlap_never_enters_one_engine_twice(tmp_path, onnx_model, monkeypatch):
    """infer.overlap runs the device call on one background thread with one batch in flight, and
    stage discovery happens before it starts: a whole host-mode run with the GIL-free stress knob
    (every call wide open for a second thread) records no misuse."""
    from pipeline.output import load_embeddings
    from pipeline.run.supervisor import run

    use_fake_sail(monkeypatch, tpus=1)
    monkeypatch.setenv("FAKE_SAIL_NUMPY_RELEASE_GIL", "1")
    monkeypatch.setenv("FAKE_SAIL_INFER_MS", "30")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(24):
        write(imgs / f"p{i:02d}.jpg", photo(240 + i, 230, 30 + i))
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [1, 4])
    cfg = from_dict({"input": {"paths": [str(imgs)]}, "output": {"dir": str(tmp_path / "out")},
                     "model": {"path": str(bm)},
                     "infer": {"backend": "sail", "devices": [0], "batch_timeout_ms": 5, "overlap": True},
                     "sail": {"mode": "host"}, "run": {"progress": "none", "start_timeout_s": 120}})
    res = run(cfg)
    assert res.exit_code == 0, res.message
    assert len(load_embeddings(res.out_dir)[0]) == 24
    assert misuse_log() == ""


# --------------------------------------------------------------- Decoder: by the name's end
def test_fake_decoder_picks_the_still_image_path_by_name_ending(fake, tmp_path):
    """cvwrapper.cpp:255-265 is_pic_file: compare the last 3/4 characters of the whole path."""
    sail = fake
    assert sail._is_pic_file("/x/photojpg") and sail._is_pic_file("/x/a.xjpeg") and sail._is_pic_file("b.PNG")
    assert not sail._is_pic_file("/x/a.Jpg") and not sail._is_pic_file("/x/a.jfif")
    with pytest.raises(IndexError):  # std::string::compare past the end -> std::out_of_range
        sail._is_pic_file("ab")
    data = (write(tmp_path / "src.jpg", photo(64, 48, 1))).read_bytes()
    nodot = tmp_path / "photojpg"
    nodot.write_bytes(data)
    assert sail.Decoder(str(nodot), True, 0).read(sail.Handle(0)).width() == 64  # still-image path
    odd = tmp_path / "photo.Jpg"
    odd.write_bytes(data)
    with pytest.raises(RuntimeError):  # FFmpeg path, whose constructor fails for a JPEG here
        sail.Decoder(str(odd / "missing"), True, 0)


@pytest.mark.parametrize("name", ["a.jpg", "b.JPEG", "c.tar.jpeg", "photojpg", "x.ajpg", "d.Jpg", "e.jfif",
                                  "f.png", "noext", "g.JPG"])
def test_backend_sends_the_decoder_only_names_sail_treats_as_pictures(fake, tmp_path, onnx_model, name):
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    dev = open_dev(cfg_for(bm))
    p = tmp_path / name
    write(p, photo(120, 100, 3), "JPEG")  # JPEG content behind every name
    if dev._hw_eligible(str(p)):
        assert fake._is_pic_file(str(p))
    res = dev.embed_files([0], [os.fsencode(p)])
    assert res.ids == [0] and not res.failures


# -------------------------------------------------------------------- the shipped config
def test_shipped_bm1684x_config_runs_end_to_end_on_the_fake(tmp_path, onnx_model, monkeypatch):
    """configs/bm1684x.toml as shipped (device mode, linear), only the model path and the
    input/output directories replaced; 32-image batches of the fake bmodel."""
    from pipeline.config import load
    from pipeline.output import load_embeddings
    from pipeline.run.supervisor import run

    use_fake_sail(monkeypatch, tpus=1)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(40):
        write(imgs / f"p{i:02d}.jpg", photo(200 + 7 * i, 300 - 3 * i, 60 + i))
    (imgs / "broken.jpg").write_bytes((imgs / "p00.jpg").read_bytes()[:500])
    bm = write_fake_bmodel(tmp_path / "clip_32b.bmodel", onnx_model, [32])
    cfg = load(os.path.join(ROOT, "configs", "bm1684x.toml"),
               [f'model.path="{bm}"', 'run.progress="none"'], input_paths=[str(imgs)], output_dir=str(tmp_path / "out"))
    assert cfg.sail.mode == "device" and cfg.sail.resize == "linear"
    res = run(cfg)
    assert res.exit_code == 3, res.message  # completed, with the broken file failed
    paths, emb = load_embeddings(res.out_dir)
    assert len(paths) == 40 and np.isfinite(np.asarray(emb)).all()
    assert misuse_log() == ""


def test_cli_refuses_bicubic_on_the_shipped_config_in_a_fresh_process(tmp_path):
    """The must-show line, as a user types it: exit 2, one line on stderr, nothing started."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/bm1684x.toml",
                        "--set", "sail.resize=\"bicubic\"", "-o", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "sail.resize" in lines[0] and "BM1684X" in lines[0], p.stderr
    assert not out.exists()


def test_device_error_message_names_the_failure(fake, tmp_path, onnx_model, monkeypatch):
    """A stale batch on a chip is a DeviceError naming the chip, never embeddings."""
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    dev = open_dev(cfg_for(bm), "sail:1")
    a = write(tmp_path / "a.jpg", photo(300, 200, 1))
    b = write(tmp_path / "b.jpg", photo(300, 200, 2))
    dev.embed_files([0], [os.fsencode(a)])
    monkeypatch.setenv("FAKE_SAIL_FAIL_DEVS", "1")
    with pytest.raises(DeviceError, match="dev_id 1"):
        dev.embed_files([1], [os.fsencode(b)])


# ------------------------------------------------------------------- EXIF orientation (issue #25)
def test_device_mode_routes_rotated_jpegs_to_the_cpu_decoder(fake, tmp_path, onnx_model, monkeypatch):
    """sail.Decoder decodes with sophon-opencv imdecode(IMREAD_COLOR), which applies the EXIF
    orientation (SAIL src/cvwrapper.cpp:1532-1575; the fake's cv2.imdecode does the same); CLIP's
    reference, host mode and the CPU decoder do not. Device mode sends a JPEG whose orientation is
    not 1 to the CPU decoder, so it embeds what the reference embeds."""
    from PIL import Image

    from pipeline.backends import sail as sail_backend

    def rotated(path, orientation, seed):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(photo(400, 260, seed)).save(path, quality=92, exif=exif.tobytes())
        return path

    files = [rotated(tmp_path / "r6.jpg", 6, 1), rotated(tmp_path / "r3.jpg", 3, 2), rotated(tmp_path / "r1.jpg", 1, 3)]
    # the fake's hardware decoder really rotates: orientation 6 comes out 260 wide, 400 high
    h = fake.Handle(0)
    assert fake.Decoder(str(files[0]), True, 0).read(h).width() == 260
    assert [sail_backend.exif_orientation(f.read_bytes()[:70000]) for f in files] == [6, 3, 1]
    bm = write_fake_bmodel(tmp_path / "b4.bmodel", onnx_model, [4])
    ref = cpu_reference(ort_session(onnx_model), files)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)

    from pipeline.data.images import DecodeOptions, decode_file, normalize, reference_crop

    fed_ref = normalize(np.stack([reference_crop(decode_file(os.fsencode(f), DecodeOptions())) for f in files]))

    def embed():
        dev = open_dev(cfg_for(bm))
        res = dev.embed_files([0, 1, 2], [os.fsencode(f) for f in files])
        e = res.embeddings / np.linalg.norm(res.embeddings, axis=1, keepdims=True)
        x, idxs = fake.LAST_EPP_INPUT  # what the network was fed, per pushed index
        fed = np.stack([x[idxs.index(i)] for i in range(3)])
        return (e * ref).sum(1), np.abs(fed - fed_ref).mean(axis=(1, 2, 3))

    cos, diff = embed()
    # routed: the reference's orientation (random-weight embeddings are insensitive, so the fed
    # pixels are checked too: only the linear-vs-bicubic resize differs, in normalised units)
    assert cos.min() >= 0.999 and diff.max() < 0.1, (cos, diff)
    # without the rule (the hardware decoder for every JPEG), the rotated ones are fed rotated
    monkeypatch.setattr(sail_backend, "exif_orientation", lambda head: 1)
    bad_cos, bad_diff = embed()
    assert bad_diff[2] < 0.1 and bad_diff[:2].min() > 0.3, bad_diff
    assert bad_cos[:2].max() < cos[:2].min(), (bad_cos, cos)
