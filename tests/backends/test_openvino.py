"""The openvino backend (pipeline/backends/openvino.py): precision resolution and refusals, the bf16
hint, both image input forms and both text forms against onnxruntime, a run's manifest / inspect /
report, and a resume with another precision refused. Tests that need OpenVINO skip without it; the
bf16 ones also need a CPU with native bf16."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from pipeline import config
from pipeline.backends import openvino as ovb
from pipeline.errors import ConfigError
from tests.conftest import SAMPLES, invoke

NATIVE = {"avx512f", "avx512_bf16", "amx_bf16"}
CAPS = ("BF16", "FP32", "INT8")

try:
    import openvino  # noqa: F401
    HAVE_OV = True
except ImportError:
    HAVE_OV = False
needs_ov = pytest.mark.skipif(not HAVE_OV, reason="openvino is not installed (pip install -e '.[openvino]')")
needs_bf16 = pytest.mark.skipif(not (HAVE_OV and ovb.native_bf16_flags()), reason="this CPU has no native bf16")


# -- precision --------------------------------------------------------------------------------------
def test_auto_is_bf16_only_with_native_bf16():
    assert ovb.resolve_precision("auto", NATIVE, CAPS).resolved == "bf16"
    assert ovb.resolve_precision("auto", {"avx512f"}, CAPS).resolved == "fp32"  # emulated: fp32
    assert ovb.resolve_precision("auto", NATIVE, ("FP32",)).resolved == "fp32"  # the plugin says no
    assert ovb.resolve_precision("fp32", NATIVE, CAPS).resolved == "fp32"
    p = ovb.resolve_precision("auto", {"avx512_bf16"}, CAPS)
    assert (p.requested, p.resolved) == ("auto", "bf16") and "avx512_bf16" in p.reason


def test_bf16_refused_without_native_bf16():
    with pytest.raises(ConfigError, match=r"openvino.precision = \"bf16\" is refused: .*no native bf16.*slower than fp32"):
        ovb.resolve_precision("bf16", {"avx2", "avx512f"}, CAPS)
    assert ovb.resolve_precision("bf16", NATIVE, CAPS).resolved == "bf16"


def test_precision_key_checked():
    with pytest.raises(ConfigError, match="openvino.precision"):
        config.from_dict({"openvino": {"precision": "fp16"}})


def test_missing_openvino_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(ovb.OpenVinoMissing, match=r"pip install -e '\.\[openvino\]'") as e:
        ovb.import_openvino()
    assert "\n" not in str(e.value)
    assert ovb.OpenVinoBackend.probe()["available"] is False


@needs_ov
def test_resolving_the_precision_needs_no_openvino_import_once_probed(monkeypatch, tmp_path):
    """The CPU plugin's capabilities are remembered per openvino version and CPU flags, and the
    version comes from the package metadata: a run's main process resolves `auto` without importing
    openvino (~0.2 s of a core before any worker starts)."""
    import openvino

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ovb._ov_capabilities.cache_clear()
    first = ovb._ov_capabilities()
    assert "FP32" in first and (tmp_path / "clip-pipeline" / "openvino-capabilities.json").is_file()
    assert ovb.ov_version() == openvino.__version__.split("-")[0]

    def no_import():
        raise AssertionError("openvino imported")

    monkeypatch.setattr(ovb, "import_openvino", no_import)
    ovb._ov_capabilities.cache_clear()
    assert ovb._ov_capabilities() == first  # from the file
    monkeypatch.setattr(ovb, "cpu_flags", lambda: {"avx2"})  # another CPU: asked again
    ovb._ov_capabilities.cache_clear()
    with pytest.raises(AssertionError, match="openvino imported"):
        ovb._ov_capabilities()
    ovb._ov_capabilities.cache_clear()


def test_bf16_hint_only_for_the_cpu_backend_on_native_bf16():
    cpu = config.from_dict({})
    hint = ovb.bf16_hint(cpu, NATIVE)
    assert hint and "infer.backend=openvino" in hint and "openvino.precision=bf16" in hint and "\n" not in hint
    assert ovb.bf16_hint(cpu, {"avx2", "avx512f"}) is None
    assert ovb.bf16_hint(config.from_dict({"infer": {"backend": "openvino"}}), NATIVE) is None


def test_fingerprint_has_the_resolved_precision_for_openvino_only(monkeypatch):
    from pipeline.run.preflight import fingerprint, fingerprint_refusal

    monkeypatch.setattr(ovb, "_ov_capabilities", lambda: CAPS)
    monkeypatch.setattr(ovb, "cpu_flags", lambda: set(NATIVE))
    assert "precision" not in fingerprint(config.from_dict({}), {"sha256": "x"})
    auto = fingerprint(config.from_dict({"infer": {"backend": "openvino"}}), {"sha256": "x"})
    bf16 = fingerprint(config.from_dict({"infer": {"backend": "openvino"}, "openvino": {"precision": "bf16"}}),
                       {"sha256": "x"})
    fp32 = fingerprint(config.from_dict({"infer": {"backend": "openvino"}, "openvino": {"precision": "fp32"}}),
                       {"sha256": "x"})
    assert auto == bf16 and auto["precision"] == "bf16"  # "auto" here means bf16: the same embeddings
    msg = fingerprint_refusal("out", bf16, fp32)
    assert "openvino.precision ('bf16' there, 'fp32' now)" in msg


# -- the engine against onnxruntime ------------------------------------------------------------------
def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _crops(n=6, size=224):
    return np.random.default_rng(3).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@needs_ov
@pytest.mark.parametrize("input_kind", ["float", "uint8"])
def test_image_device_matches_onnxruntime(tmp_path, input_kind):
    from pipeline.backends.cpu import OnnxDevice
    from pipeline.model.modelgen import build_clip_image_onnx

    path = tmp_path / "m.onnx"
    build_clip_image_onnx(path, arch="tiny", seed=0, input_kind=input_kind)
    raw = {"model": {"path": str(path), "batch_size": 4}, "infer": {"backend": "openvino"},
           "openvino": {"precision": "fp32", "cache_dir": ""}}
    cfg = config.from_dict(raw)
    dev = ovb.OpenVinoBackend.open_device(cfg, "cpu:0")
    assert (dev.batch_size, dev.fixed_batch, dev.dim, dev.uint8_input) == (4, False, 512, input_kind == "uint8")
    ref = OnnxDevice(cfg, "cpu:0")
    for n in (4, 3, 1):  # any batch: a short tail piece too
        x = _crops(n)
        assert _cos(dev.embed(x), ref.embed(x)).min() > 0.99999
    if ovb.native_bf16_flags():
        bf = ovb.OpenVinoBackend.open_device(config.from_dict({**raw, "openvino": {"precision": "bf16", "cache_dir": ""}}),
                                             "cpu:0")
        c = _cos(bf.embed(_crops()), ref.embed(_crops()))
        assert 0.99 < c.min() < 1.0  # bf16 really ran (not fp32), and close


@needs_ov
def test_ir_cache_converts_once_and_gives_the_same_embeddings(tmp_path, monkeypatch):
    """openvino.ir_cache: the ONNX is converted to IR once (under the model's sha256), later sessions
    load the IR, and the embeddings are bit-identical to a session that reads the ONNX, at both
    precisions the CPU runs natively."""
    from pipeline.model.modelgen import build_clip_image_onnx

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # this test's own cache (and hash memo)
    path = str(tmp_path / "m.onnx")
    build_clip_image_onnx(path, arch="tiny", seed=0)
    xml = ovb.converted_model(path)
    assert xml.endswith("model.xml") and str(tmp_path / "cache" / "clip-pipeline" / "openvino-ir") in xml
    assert ovb.converted_model(path) == xml
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    for precision in ["fp32"] + (["bf16"] if ovb.native_bf16_flags() else []):
        onnx = ovb.OvSession(path, precision, 1, ir_cache=False).run(x)
        with monkeypatch.context() as m:
            m.setattr(ovb, "import_openvino", _no_conversion(ovb.import_openvino))
            ir = ovb.OvSession(path, precision, 1, ir_cache=True).run(x)
        assert np.array_equal(onnx, ir), precision


def _no_conversion(real):
    """import_openvino whose save_model fails the test: a cached IR must not be converted again."""
    def wrapped():
        ov = real()

        class Guard:
            def __getattr__(self, name):
                if name == "save_model":
                    raise AssertionError("the IR was converted again")
                return getattr(ov, name)
        return Guard()
    return wrapped


@needs_ov
def test_ir_cache_falls_back_to_the_onnx_when_it_cannot_be_written_or_is_being_written(tmp_path, monkeypatch):
    import fcntl

    from pipeline.model.modelgen import build_clip_image_onnx

    path = str(tmp_path / "m.onnx")
    build_clip_image_onnx(path, arch="tiny", seed=0)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the cache directory would go
    assert ovb.converted_model(path) == path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    target = ovb.ir_dir(path)
    target.parent.mkdir(parents=True)
    with open(target.with_name(f".{target.name}.lock"), "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process is converting it
        assert ovb.converted_model(path) == path
    assert ovb.converted_model(path).endswith("model.xml")
    assert not list(target.parent.glob("*.tmp"))
    assert ovb.converted_model(str(tmp_path / "m.onnx.json")) == str(tmp_path / "m.onnx.json")  # not ONNX: as given


@needs_ov
@pytest.mark.parametrize("form", ["projected", "states"])
def test_text_encoder_matches_onnxruntime(tmp_path, form):
    from pipeline.text.embed import TextEncoder
    from pipeline.text.model import build_clip_text_onnx

    path = tmp_path / "t.onnx"
    build_clip_text_onnx(path, arch="tiny", seed=0, form=form)
    prompts = ["a photo of a dog", "a diagram", "x" * 50]
    ref = TextEncoder(path).embed(prompts).embeddings
    ov32 = TextEncoder(path, backend="openvino", precision="fp32")
    assert ov32.form == form and ov32.identity()["engine"]["precision"] == "fp32"
    assert _cos(ov32.embed(prompts).embeddings, ref).min() > 0.99999


@needs_bf16
def test_text_cli_records_the_precision(tmp_path):
    r = invoke("embed-text", "-t", "a dog", "-t", "a cat", "-o", tmp_path / "o", "--backend", "openvino",
               "--precision", "bf16")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["backend"] == "openvino" and m["model"]["engine"]["precision"] == "bf16"


# -- a run ----------------------------------------------------------------------------------------------
@needs_ov
def test_run_records_precision_and_refuses_another_on_resume(tmp_path, tiny_model):
    out = tmp_path / "out"
    base = ["run", "-i", SAMPLES, "-o", out, "--set", f'model.path="{tiny_model}"', "--set", "infer.backend=openvino",
            "--set", 'infer.devices=["cpu:0"]', "--set", f'openvino.cache_dir="{tmp_path / "cache"}"', "-q"]
    r = invoke(*base, "--set", "openvino.precision=fp32")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["fingerprint"]["precision"] == "fp32" and m["model"]["engine"]["precision"] == "fp32"
    assert m["counts"]["embedded"] == len(list(SAMPLES.iterdir()))
    assert "backend:  openvino (fp32) on cpu:0" in invoke("inspect", out).output
    assert any((tmp_path / "cache").iterdir())  # openvino.cache_dir: the compiled model is kept
    rep = json.loads((out / "report.json").read_text())
    assert rep["backend"] == "openvino" and rep["model"]["engine"]["precision"] == "fp32"
    if ovb.native_bf16_flags():
        r = invoke(*base, "--set", "openvino.precision=auto")
        assert r.exit_code == 2 and "openvino.precision ('fp32' there, 'bf16' now)" in r.output
    again = invoke(*base, "--set", "openvino.precision=fp32")  # same precision: resumes (nothing left to do)
    assert again.exit_code == 0, again.output


@needs_ov
def test_dry_run_shows_the_resolved_precision(tmp_path, tiny_model):
    r = invoke("run", "--dry-run", "-i", SAMPLES, "-o", tmp_path / "o", "--set", f'model.path="{tiny_model}"',
               "--set", "infer.backend=openvino")
    assert r.exit_code == 0, r.output
    want = "bf16" if ovb.native_bf16_flags() else "fp32"
    assert f"precision: {want} (openvino.precision = \"auto\"" in r.output
    assert "--set infer.backend=openvino" not in r.output  # the hint is for the cpu backend only
    cpu = invoke("run", "--dry-run", "-i", SAMPLES, "-o", tmp_path / "o", "--set", f'model.path="{tiny_model}"')
    assert cpu.exit_code == 0, cpu.output
    assert ("--set infer.backend=openvino --set openvino.precision=bf16" in cpu.output) == bool(ovb.native_bf16_flags())


# -- the bench's openvino cases ------------------------------------------------------------------------
@needs_bf16
def test_bench_openvino_cases(tmp_path, tiny_model):
    """bench --openvino: OpenVINO fp32/bf16 ceilings, the pipeline on each, bf16 2b and loop, and the
    issue #28 ratios, beside the cpu cases (the DataLoader baseline left out)."""
    import os
    import subprocess

    from tests.conftest import ROOT, cli

    out = tmp_path / "bench.json"
    proc = subprocess.run(cli("bench", "--case", "cpu", "--openvino", "--no-dataloader", "--images", SAMPLES,
                              "--model", tiny_model, "--cpu-images", "8", "--batch", "4", "--repeats", "1",
                              "--json", out, "-q"),
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OpenVINO bf16 model-only ceiling" in proc.stdout
    cpu = json.loads(out.read_text())["cases"]["cpu"]
    run = cpu["runs"][0]
    assert "dataloader" not in run
    for k in ("ov_fp32_ceiling", "ov_bf16_ceiling", "ov_fp32_pipeline", "ov_bf16_pipeline",
              "ov_bf16_pipeline_ready_crops", "ov_bf16_single_loop"):
        assert cpu["median_images_per_s"][k] > 0, k
    assert run["ov_bf16_pipeline"]["images"] == 8
    assert {"ov_bf16_pipeline/pipeline", "ov_bf16_pipeline/single_loop", "ov_bf16_pipeline/ov_bf16_ceiling",
            "ov_bf16_pipeline_ready_crops/ov_bf16_ceiling"} <= set(cpu["ratios"])
    assert "pipeline/dataloader" not in cpu["ratios"]
    assert cpu["openvino"]["engine"]["precision"] == "bf16"


def test_the_run_tail_goes_as_half_batches_at_bf16_quarter_batches_at_fp32():
    """A quarter batch costs ~35% more per image than a full one at bf16 (AMX), about the same at
    fp32: the run plan cuts the tail by the resolved precision (Backend.tail_pieces)."""
    from pipeline.run.plan import run_tail

    def tail(precision):
        cfg = config.from_dict({"infer": {"backend": "openvino", "devices": ["cpu:0", "cpu:1"]},
                                "openvino": {"precision": precision}, "model": {"batch_size": 16}})
        return run_tail(cfg, 2, ovb.OpenVinoBackend.tail_pieces(cfg))

    assert tail("bf16") == (64, 8, 24)  # (inputs sent as pieces, images per piece, a device's cap)
    assert tail("fp32") == (64, 4, 20)
