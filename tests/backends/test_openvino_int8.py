"""openvino.precision = "int8" (pipeline/backends/openvino_int8.py): refused unless asked for and
without calibration photos or NNCF, the quantised tiny model close to fp32, made once and cached, a
run end to end with the calibration in its manifest, and resumes with another precision or another
calibration set refused. Tests that quantise need OpenVINO and NNCF and skip without them."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from pipeline import config
from pipeline.backends import openvino as ovb
from pipeline.backends import openvino_int8 as q8
from pipeline.errors import ConfigError, TextModelError
from tests.conftest import SAMPLES, invoke

try:
    import nncf  # noqa: F401
    import openvino  # noqa: F401
    HAVE_NNCF = True
except ImportError:
    HAVE_NNCF = False
needs_nncf = pytest.mark.skipif(not HAVE_NNCF, reason="openvino or nncf is not installed (pip install -e '.[openvino-int8]')")


def _cfg(model, calibration="", **ov):
    return config.from_dict({"model": {"path": str(model), "batch_size": 4}, "infer": {"backend": "openvino"},
                             "openvino": {"precision": "int8", "calibration": str(calibration), **ov}})


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """This test's own cache (quantised models, IR, the model hash memo)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "clip-pipeline"


def test_int8_is_only_ever_asked_for():
    for flags in ({"avx512_vnni", "amx_int8", "amx_bf16", "avx512_bf16"}, {"avx2"}):
        assert ovb.resolve_precision("auto", flags, ("BF16", "FP32", "INT8")).resolved != "int8"
    p = ovb.resolve_precision("int8", {"avx2"}, ("FP32",))
    assert (p.requested, p.resolved) == ("int8", "int8") and "no int8 dot-product" in p.reason
    assert "amx_int8" in ovb.resolve_precision("int8", {"amx_int8"}, ("FP32",)).reason
    with pytest.raises(ConfigError, match="openvino.precision"):
        config.from_dict({"openvino": {"precision": "int4"}})
    with pytest.raises(ConfigError, match="openvino.calibration_count: must be >= 1"):
        config.from_dict({"openvino": {"calibration_count": 0}})


def test_int8_refused_without_calibration_photos(tmp_path, tiny_model):
    model = tiny_model
    with pytest.raises(ConfigError, match=r"needs calibration photos: set config key openvino.calibration") as e:
        ovb.OpenVinoBackend.resolve(_cfg(model))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"config key openvino.calibration: .*nowhere is not a directory"):
        ovb.OpenVinoBackend.resolve(_cfg(model, tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a photo")
    with pytest.raises(ConfigError, match=r"config key openvino.calibration: .*empty holds no photos"):
        ovb.OpenVinoBackend.resolve(_cfg(model, tmp_path / "empty"))
    # the same refusal from run --dry-run, exit 2, before anything starts
    r = invoke("run", "--dry-run", "-i", SAMPLES, "-o", tmp_path / "o", "--set", f'model.path="{model}"',
               "--set", "infer.backend=openvino", "--set", "openvino.precision=int8")
    assert r.exit_code == 2 and "openvino.calibration" in r.output, r.output


def test_calibration_set_is_chosen_evenly_and_identified_by_content(tmp_path, photos):
    cal = q8.calibration_set(_cfg("m.onnx", photos[0].parent, calibration_count=4))
    names = sorted(p.name for p in photos)
    assert cal.files == (names[0], names[3], names[6], names[9]) and cal.available == len(photos)
    assert q8.calibration_set(_cfg("m.onnx", photos[0].parent, calibration_count=100)).files == tuple(names)
    # the same photos elsewhere: the same set; one photo's bytes changed: another
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in photos:
        (copy / p.name).write_bytes(p.read_bytes())
    assert q8.calibration_set(_cfg("m.onnx", copy, calibration_count=4)).digest == cal.digest
    (copy / names[3]).write_bytes((copy / names[3]).read_bytes() + b"\0")
    assert q8.calibration_set(_cfg("m.onnx", copy, calibration_count=4)).digest != cal.digest
    assert q8.calibration_set(_cfg("m.onnx", copy, calibration_count=5)).digest != cal.digest


def test_missing_nncf_is_one_clear_line(tmp_path, photos, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # find_spec / import nncf: not installed
    with pytest.raises(q8.NncfMissing, match=r"pip install -e '\.\[openvino-int8\]'") as e:
        ovb.OpenVinoBackend.resolve(_cfg(tmp_path / "m.onnx", photos[0].parent))
    assert "\n" not in str(e.value)
    with pytest.raises(q8.NncfMissing, match=r"openvino-int8"):
        q8.require_nncf(import_it=True)


def test_text_tower_refuses_int8(tmp_path):
    with pytest.raises(TextModelError, match="int8 is for the image tower only") as e:
        ovb.OpenVinoBackend.open_text(str(tmp_path / "t.onnx"), precision="int8")
    assert "\n" not in str(e.value)
    r = invoke("embed-text", "-t", "a dog", "-o", tmp_path / "o", "--backend", "openvino", "--precision", "int8")
    assert r.exit_code == 2 and "int8" in r.output


@needs_nncf
def test_int8_device_is_quantised_close_to_fp32_and_made_once(tmp_path, photos, cache, monkeypatch):
    """The tiny model quantised on the 12 photos: int8 really ran (FakeQuantize in the IR, embeddings
    not fp32's) and stays within a cosine of 0.98 of fp32 (min 0.991 here) on other photos; a second session loads
    the cached model without calibrating; another calibration count is another model."""
    from pipeline.data.images import DecodeOptions, crop, decode_file
    from pipeline.model.modelgen import build_clip_image_onnx

    model = tmp_path / "m.onnx"
    build_clip_image_onnx(model, arch="tiny", seed=0)
    cfg = _cfg(model, photos[0].parent, calibration_count=8)
    logged = []
    xml = ovb.int8_model(cfg, logged.append)
    assert xml.startswith(str(cache / "openvino-int8")) and xml.endswith("model.xml")
    assert len(logged) == 1 and "calibrating on 8 photos" in logged[0]
    assert "FakeQuantize" in open(xml).read()
    pixels = np.stack([crop(decode_file(os.fsencode(p), DecodeOptions()), "reference") for p in sorted(SAMPLES.iterdir())])
    fp32 = ovb.OpenVinoBackend.open_device(cfg.replace(openvino=config.OpenVinoConfig(precision="fp32")), "cpu:0")
    with monkeypatch.context() as m:
        m.setattr(q8, "quantize", lambda *a: pytest.fail("calibrated again although the model is cached"))
        dev = ovb.OpenVinoBackend.open_device(cfg, "cpu:0")
        assert ovb.int8_model(cfg, logged.append) == xml and len(logged) == 1
    assert dev.session.precision == "int8"
    c = _cos(dev.embed(pixels), fp32.embed(pixels))
    assert len(c) >= 4 and 0.98 < c.min() and c.max() < 0.999999, c  # close, and not fp32 itself
    other = ovb.int8_model(_cfg(model, photos[0].parent, calibration_count=6))
    assert other != xml and os.path.isfile(other)


def _int8_in_child(model, photos_dir, cache, barrier, conn) -> None:
    os.environ["XDG_CACHE_HOME"] = str(cache)
    logged: list[str] = []
    barrier.wait()
    conn.send((ovb.int8_model(_cfg(model, photos_dir, calibration_count=6), logged.append), len(logged)))


@needs_nncf
def test_parallel_processes_quantise_once(tmp_path, tiny_model, photos):
    """Two processes asking for the same int8 model at once: one calibrates, the other waits for
    the lock and loads its result."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    pipes, procs = [], []
    for _ in range(2):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_int8_in_child, args=(str(tiny_model), str(photos[0].parent), tmp_path / "cache",
                                                     barrier, send))
        p.start()
        pipes.append(recv)
        procs.append(p)
    try:
        got = [r.recv() if r.poll(300) else pytest.fail("no answer from a quantising process") for r in pipes]
    finally:
        for p in procs:
            p.join(30)
    (path_a, n_a), (path_b, n_b) = got
    assert path_a == path_b and path_a.endswith("model.xml") and os.path.isfile(path_a)
    assert n_a + n_b == 1  # calibrated once


@needs_nncf
def test_run_int8_records_calibration_and_refuses_another_on_resume(tmp_path, photos, cache):
    from pipeline.model.modelgen import build_clip_image_onnx

    model = tmp_path / "m.onnx"
    build_clip_image_onnx(model, arch="tiny", seed=0)
    out = tmp_path / "out"
    base = ["run", "-i", SAMPLES, "--set", f'model.path="{model}"', "--set", "infer.backend=openvino",
            "--set", 'infer.devices=["cpu:0", "cpu:1"]', "--set", "infer.threads=1", "--set", "model.batch_size=4",
            "--set", f'openvino.calibration="{photos[0].parent}"', "--progress", "none"]
    int8 = [*base, "--set", "openvino.precision=int8", "--set", "openvino.calibration_count=8"]
    dry = invoke(*int8, "-o", out, "--dry-run")
    assert dry.exit_code == 0 and "precision: int8" in dry.output and "calibration: 8 of the 12 photos" in dry.output
    assert not (cache / "openvino-int8").exists()  # the dry run quantises nothing
    r = invoke(*int8, "-o", out)
    assert r.exit_code == 0, r.output
    assert r.output.count("openvino int8: calibrating on 8 photos") == 1  # once, in the main process
    m = json.loads((out / "manifest.json").read_text())
    eng = m["model"]["engine"]
    assert eng["precision"] == "int8" and eng["calibration"]["photos"] == 8 and eng["calibration"]["of"] == 12
    assert eng["calibration"]["dir"] == str(photos[0].parent) and eng["nncf"]
    assert m["fingerprint"]["precision"] == "int8" and m["fingerprint"]["calibration"].startswith("8 photos, sha256 ")
    assert m["counts"]["embedded"] == len(list(SAMPLES.iterdir()))
    assert "backend:  openvino (int8)" in invoke("inspect", out).output
    (xml,) = (cache / "openvino-int8").glob("*/model.xml")
    made = xml.stat().st_mtime_ns
    # resumes with another calibration set or another precision are refused, naming the keys
    r = invoke(*base, "--set", "openvino.precision=int8", "--set", "openvino.calibration_count=6", "-o", out)
    assert r.exit_code == 2 and "openvino.calibration / openvino.calibration_count ('8 photos" in r.output, r.output
    r = invoke(*base, "--set", "openvino.precision=fp32", "-o", out)
    assert r.exit_code == 2 and "openvino.precision ('int8' there, 'fp32' now)" in r.output, r.output
    # another run with the same model and photos: the cached model, no calibration
    r = invoke(*int8, "-o", tmp_path / "out2")
    assert r.exit_code == 0 and "calibrating" not in r.output, r.output
    assert xml.stat().st_mtime_ns == made and len(list((cache / "openvino-int8").iterdir())) == 2  # dir + lock
    a = np.load(out / "embeddings" / "part-00000.npy")
    assert np.array_equal(a, np.load(tmp_path / "out2" / "embeddings" / "part-00000.npy"))


@needs_nncf
def test_parity_script_reports_int8_with_the_held_out_photos(tmp_path, tiny_model):
    """scripts/bf16_parity.py --precision int8: the README's int8 figures come from it."""
    import subprocess

    from tests.conftest import ROOT

    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, "scripts/bf16_parity.py", "--precision", "int8", "--model", str(tiny_model),
                           "--images", str(SAMPLES), "-n", "12", "--calibration-count", "5", "--threads", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    img = res["image"]
    assert res["precision"] == "int8" and res["calibration"]["photos"] == 5 and res["calibration"]["of"] == 12
    assert img["int8_vs_fp32"]["n"] == 12 and 0.98 < img["int8_vs_fp32"]["cosine_min"] < 0.999999
    assert img["fp32_vs_onnxruntime_fp32"]["cosine_min"] > 0.99999
    assert img["held_out"]["photos"] == 7 and img["held_out"]["int8_vs_fp32"]["n"] == 7
    assert "the 7 photos that did not calibrate" in proc.stdout
    bad = subprocess.run([sys.executable, "scripts/bf16_parity.py", "--precision", "int8", "--model", str(tiny_model),
                          "--text-model", str(tiny_model)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and "image tower only" in bad.stderr
