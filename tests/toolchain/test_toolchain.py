"""TPU-MLIR toolchain: fast unit tests of the pure parts, and slow end-to-end tests (compile the
tiny CLIP tower, run it on the BM1684X simulator) that need the venv from
scripts/setup_tpu_mlir.sh and are skipped, with the reason, when it is absent.

    pytest tests/toolchain/test_toolchain.py            # fast tests only (slow ones deselected by default)
    pytest -m slow tests/toolchain/test_toolchain.py    # end-to-end on the simulator (~1-2 minutes)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.commands.toolchain import compile_cmd, verify_cmd
from pipeline.toolchain import env as tenv
from pipeline.toolchain.compile import bmodel_name, combine_args, deploy_args, onnx_synthetic_flag, transform_args
from pipeline.toolchain.parse import parse_compiler_profile, parse_model_info, stage_batches
from pipeline.toolchain.preprocess import CLIP_MEAN_255, CLIP_SCALE_255, normalize_u8

ROOT = Path(__file__).resolve().parents[2]

PROFILE_TAIL = """\
                                                                                           Cast_125|GDMA_MATRIX|s:496570|b:338|g:50|e:496941|t:372|dr:1|sz:2048|bw:5.13
--------------------------------------
API_END total_cycle:496942|b:338|g:50
TCYC : 496942
GDMA SUMMARY : |dr[0] S2L:2471808|dr[1] L2S:1207552|dr[2] S2S:0|dr[3] L2L:0
DDR BW USAGE : 10.77424223%
#######################################


flops: 123565440, runtime: 0.520592ms, ComputationAbility: 0.237356T
"""

MODEL_INFO = """\
bmodel version: B.2.2+v1.30.2-20260831
chip: BM1684X
create time: Thu Nov 26 23:39:04 2026

kernel_module name: libbm1684x_kernel_module.so
kernel mode: normal
==========================================
net 0: [tiny]  static
------------
stage 0, core num: 1
input: image, [4, 3, 224, 224], float32, scale: 1, zero_point: 0
output: embedding_MatMul_f32, [4, 512], float32, scale: 1, zero_point: 0
------------
stage 1, core num: 1
input: image, [1, 3, 224, 224], float32, scale: 1, zero_point: 0
output: embedding_MatMul_f32, [1, 512], float32, scale: 1, zero_point: 0

device mem size: 2567680 (weight: 708608, instruct: 48640, runtime: 1810432)
"""


# ---------------------------------------------------------------- fast unit tests (pure parts)

def test_parse_compiler_profile_estimate():
    est = parse_compiler_profile(PROFILE_TAIL, batch=4)
    assert est["kind"] == "estimate"
    assert "not a measurement" in est["source"]
    assert est["ms_per_batch"] == pytest.approx(0.520592)
    assert est["ms_per_image"] == pytest.approx(0.520592 / 4)
    assert est["cycles"] == 496942 and est["flops"] == 123565440 and est["sections"] == 1


def test_parse_compiler_profile_sums_sections_and_handles_garbage():
    two = PROFILE_TAIL + "\nflops: 10, runtime: 1.5ms, ComputationAbility: 0.1T\n"
    assert parse_compiler_profile(two)["ms_per_batch"] == pytest.approx(2.020592)
    assert "ms_per_image" not in parse_compiler_profile(two)
    assert parse_compiler_profile("nothing here") == {}


def test_parse_model_info_multistage():
    info = parse_model_info(MODEL_INFO)
    assert info["chip"] == "bm1684x"
    (net,) = info["networks"]
    assert net["name"] == "tiny" and net["static"]
    assert stage_batches(info) == [4, 1]
    assert net["stages"][1]["inputs"][0] == {"name": "image", "shape": [1, 3, 224, 224], "dtype": "float32"}
    assert net["stages"][0]["outputs"][0]["name"] == "embedding_MatMul_f32"
    fused = MODEL_INFO.replace("input: image, [4, 3, 224, 224], float32", "input: image_raw, [4, 3, 224, 224], uint8")
    assert parse_model_info(fused)["networks"][0]["stages"][0]["inputs"][0]["dtype"] == "uint8"


def test_transform_and_deploy_args():
    t = transform_args("m", "/x/m.onnx", 8, "m.mlir")
    assert t[:2] == ["model_transform", "--model_name"]
    assert t[t.index("--input_shapes") + 1] == "[[8,3,224,224]]"
    assert "--mean" not in t and "--test_input" not in t
    tf = transform_args("m", "/x/m.onnx", 1, "m.mlir", fuse_preprocess=True)
    mean = [float(x) for x in tf[tf.index("--mean") + 1].split(",")]
    scale = [float(x) for x in tf[tf.index("--scale") + 1].split(",")]
    np.testing.assert_allclose(mean, np.array([0.48145466, 0.4578275, 0.40821073]) * 255, rtol=1e-12)
    np.testing.assert_allclose(scale, 1 / (np.array([0.26862954, 0.26130258, 0.27577711]) * 255), rtol=1e-12)
    assert tf[tf.index("--pixel_format") + 1] == "rgb"

    d = deploy_args("m.mlir", "m_bm1684x_f16_8b.bmodel")
    assert d[d.index("--quantize") + 1] == "F16" and d[d.index("--chip") + 1] == "bm1684x"
    assert "--skip_validation" in d and "--fuse_preprocess" not in d
    df = deploy_args("m.mlir", "o.bmodel", fuse_preprocess=True, validate=True, name="m")
    assert "--skip_validation" not in df
    assert df[df.index("--customization_format") + 1] == "RGB_PLANAR"
    assert df[df.index("--test_reference") + 1] == "m_top_outputs.npz"
    assert combine_args(["a.bmodel", "b.bmodel"], "c.bmodel") == [
        "model_tool", "--combine", "a.bmodel", "b.bmodel", "-o", "c.bmodel"]
    assert bmodel_name("clip", 32) == "clip_bm1684x_f16_32b.bmodel"


def test_fused_constants_are_clips_normalisation():
    mean = np.array([0.48145466, 0.4578275, 0.40821073]) * 255
    std = np.array([0.26862954, 0.26130258, 0.27577711]) * 255
    np.testing.assert_allclose(CLIP_MEAN_255, mean, rtol=1e-7)
    np.testing.assert_allclose(CLIP_SCALE_255, 1 / std, rtol=1e-12)
    u8 = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 3, 16, 16)
    ref = (u8 / 255.0 - (mean / 255).reshape(1, 3, 1, 1)) / (std / 255).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(normalize_u8(u8), ref, atol=2e-5)


def test_verify_images_are_the_pipelines_reference_crops(photos):
    """verify's image inputs come from the pipeline's own preprocessing (no second implementation)."""
    from pipeline.data.images import DecodeOptions, decode_file, reference_crop
    from pipeline.toolchain.preprocess import load_images_u8

    paths, u8 = load_images_u8(photos[0].parent)
    assert paths == sorted(str(f) for f in photos) and u8.shape == (len(photos), 3, 224, 224)
    for p, chw in zip(paths, u8):
        ref = reference_crop(decode_file(os.fsencode(p), DecodeOptions()))
        np.testing.assert_array_equal(chw.transpose(1, 2, 0), ref)


def test_onnx_synthetic_flag(tmp_path):
    p = tmp_path / "m.onnx"
    assert onnx_synthetic_flag(p) is None
    (tmp_path / "m.onnx.json").write_text(json.dumps({"synthetic": True}))
    assert onnx_synthetic_flag(p) is True
    (tmp_path / "m.onnx.json").write_text(json.dumps({"arch": "x"}))
    assert onnx_synthetic_flag(p) is None


def test_missing_venv_message(tmp_path, monkeypatch):
    missing = tmp_path / "no-venv"
    monkeypatch.setenv(tenv.VENV_ENV, str(missing))
    assert tenv.venv_dir() == missing
    assert tenv.venv_python() == missing / "bin" / "python"
    with pytest.raises(tenv.TpuMlirMissing) as ei:
        tenv.find_venv()
    msg = str(ei.value)
    assert "scripts/setup_tpu_mlir.sh" in msg and str(missing) in msg and tenv.VENV_ENV in msg
    assert "Python 3.10" in msg


def test_wrong_python_venv_is_refused(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)  # 3.11, not 3.10
    with pytest.raises(tenv.TpuMlirMissing, match=r"tpu_mlir needs 3\.10"):
        tenv.find_venv(venv)


def test_cli_commands_and_missing_venv_exit(tmp_path, monkeypatch):
    assert compile_cmd.name == "compile" and verify_cmd.name == "verify"
    monkeypatch.setenv(tenv.VENV_ENV, str(tmp_path / "absent"))
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    r = CliRunner().invoke(compile_cmd, [str(onnx), "-o", str(tmp_path / "out"), "-b", "1"])
    assert r.exit_code == 3 and "setup_tpu_mlir.sh" in r.output
    bm = tmp_path / "m.bmodel"
    bm.write_bytes(b"x")
    r = CliRunner().invoke(verify_cmd, [str(bm), "--onnx", str(onnx)])
    assert r.exit_code == 3 and "setup_tpu_mlir.sh" in r.output


def test_runner_refuses_missing_bmodel(tmp_path):
    from pipeline.toolchain import BmodelRunner
    with pytest.raises(FileNotFoundError):
        BmodelRunner(tmp_path / "nope.bmodel")


# ---------------------------------------------------------------- slow: real compile + simulator

def _venv_or_skip():
    try:
        return tenv.find_venv()
    except tenv.TpuMlirMissing as e:
        pytest.skip("TPU-MLIR venv unavailable (Python 3.10 + tpu_mlir; run scripts/setup_tpu_mlir.sh): "
                    + str(e).splitlines()[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _venv_or_skip()
    from pipeline.model.modelgen import build_clip_image_onnx

    d = tmp_path_factory.mktemp("tpu")
    onnx = d / "tiny.onnx"
    build_clip_image_onnx(onnx, arch="tiny", seed=0, input_kind="float")
    return onnx


@pytest.fixture(scope="module")
def compiled(tiny):
    from pipeline.toolchain.compile import compile_onnx

    out = tiny.parent / "out"
    sides = compile_onnx(tiny, out, [1, 4], combine=True, log=lambda s: None)
    return out, sides


@pytest.mark.slow
def test_compile_writes_bmodels_and_sidecars(tiny, compiled):
    from pipeline.toolchain.compile import sha256_file

    out, sides = compiled
    assert [s["bmodel"] for s in sides] == [
        "tiny_bm1684x_f16_1b.bmodel", "tiny_bm1684x_f16_4b.bmodel", "tiny_bm1684x_f16_1-4b.bmodel"]
    for s in sides:
        bm = out / s["bmodel"]
        assert bm.stat().st_size == s["bmodel_bytes"] > 1_000_000
        assert json.loads(Path(str(bm) + ".json").read_text()) == s
        assert s["chip"] == "bm1684x" and s["quantize"] == "F16" and not s["fused_preprocess"]
        assert s["onnx"]["sha256"] == sha256_file(tiny)
        assert s["onnx"]["synthetic_weights"] is True
    for s, b in zip(sides[:2], (1, 4)):
        assert s["batch"] == b
        assert s["input"] == {"name": "image", "shape": [b, 3, 224, 224], "dtype": "float32"}
        assert s["output"]["shape"] == [b, 512]
        assert s["estimate"]["kind"] == "estimate" and s["estimate"]["ms_per_image"] > 0
        assert s["estimate"]["ms_per_image"] == pytest.approx(s["estimate"]["ms_per_batch"] / b, rel=1e-4)
        assert s["compile_seconds"]["total"] > 0
    assert sides[2]["batch"] == [4, 1] and [st["batch"] for st in sides[2]["stages"]] == [4, 1]


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
def test_simulator_matches_onnxruntime(tiny, compiled, batch):
    from pipeline.toolchain.verify import verify

    out, _ = compiled
    r = verify(out / f"tiny_bm1684x_f16_{batch}b.bmodel", tiny, log=lambda s: None)
    (c,) = r.comparisons
    assert c.rows == batch
    assert c.cos_min >= 0.9999, c.line()
    assert c.max_abs_diff < 0.05, c.line()


@pytest.mark.slow
def test_combined_bmodel_exposes_both_stages(tiny, compiled):
    import onnxruntime as ort

    from pipeline.toolchain import BmodelRunner
    from pipeline.toolchain.compile import bmodel_info
    from pipeline.toolchain.preprocess import random_u8_images
    from pipeline.toolchain.verify import cosine_rows

    out, _ = compiled
    bm = out / "tiny_bm1684x_f16_1-4b.bmodel"
    assert stage_batches(bmodel_info(bm)) == [4, 1]
    sess = ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"])
    x = normalize_u8(random_u8_images(4, seed=7))
    ref = sess.run(None, {"image": x})[0]
    with BmodelRunner(bm) as r:
        assert r.networks == ["tiny"]
        assert r.nets["tiny"]["inputs"][0]["shape"] == [4, 3, 224, 224]  # buffers of stage 0
        (y4,) = r.forward([x])
        (y1,) = r.forward([x[:1]])  # the batch-1 stage, through forward_dynamic
    assert y4.shape == (4, 512) and y1.shape == (1, 512)
    assert cosine_rows(y4, ref).min() >= 0.9999
    assert cosine_rows(y1, ref[:1]).min() >= 0.9999


@pytest.mark.slow
def test_fused_preprocess_uint8_bmodel_agrees(tiny, tmp_path):
    from imagegen import photo, write

    from pipeline.toolchain.compile import compile_onnx
    from pipeline.toolchain.verify import verify

    (side,) = compile_onnx(tiny, tmp_path, [1], fuse_preprocess=True, log=lambda s: None)
    assert side["fused_preprocess"] and side["bmodel"] == "tiny_u8_bm1684x_f16_1b.bmodel"
    assert side["input"]["dtype"] == "uint8" and side["input"]["shape"] == [1, 3, 224, 224]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k, (w, h) in enumerate([(300, 240), (200, 400)]):
        write(imgs / f"{k}.png", photo(w, h, k))
    r = verify(tmp_path / side["bmodel"], tiny, images_dir=imgs, log=lambda s: None)
    assert r.fused_preprocess
    assert [c.rows for c in r.comparisons] == [1, 2]
    assert r.cos_min >= 0.9999, [c.line() for c in r.comparisons]


@pytest.mark.slow
def test_cli_standalone_verify_exit_codes(tiny, compiled):
    out, _ = compiled
    bm = out / "tiny_bm1684x_f16_1b.bmodel"
    cmd = [sys.executable, "-m", "pipeline.commands.toolchain", "verify", str(bm)]  # ONNX from sidecar
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout and "cos_min=" in ok.stdout
    bad = subprocess.run(cmd + ["--min-cosine", "1.5"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "FAIL" in bad.stdout


# --- INT8 / MIXED (issue 19) ------------------------------------------------------------------------

_MLIR_SNIPPET = '''module {
    %10 = "top.LayerNorm"(%9, %0, %0) {axis = 2 : si32} : (tensor<1x50x64xf32>, none, none) -> tensor<1x50x64xf32> loc(#loc10)
    %14 = "top.MatMul"(%11, %12, %13) {do_relu = false} : (tensor<1x50x64xf32>) -> tensor<1x50x192xf32> loc(#loc14)
    %26 = "top.Add"(%25, %8) : (tensor<1x50x64xf32>, tensor<1x50x64xf32>) -> tensor<1x50x64xf32> loc(#loc26)
}
#loc10 = loc("ln_pre_LayerNormalization")
#loc14 = loc("blocks.0.attn.qkv_Add")
#loc26 = loc("blocks.0.resid_attn_Add")
'''

# The parts of TPU-MLIR 1.30's `run_calibration --search fast_search` log (its `Search_Qtable` file)
# that parse_search_log reads, as the tiny model's search printed them.
_SEARCH_LOG = '''INFO:root:run float mode: tiny.mlir
INFO:root:op_type : top.LayerNorm, similarity : 1.0
INFO:root:op_type : top.Add, similarity : 0.998396912188682
INFO:root:op_type : top.MatMul, similarity : 0.9999071386936839
INFO:root:sensitive_op_type : ['top.Add'], please pay attention to these types of operations
INFO:root:all search layer number: 2
INFO:root:layer tokens_pos_Add, outputs_cos:0.001733146385382911, outputs_snr:0.0069584344241173345
INFO:root:layer blocks.0.resid_attn_Add, outputs_cos:0.00015779849809227642, outputs_snr:0.0006315963042144013
INFO:root:>>>run result:
INFO:root:float layer number: 2, mix model outputs_cos: 0.999867
INFO:root:int8 outputs_cos:0.997932 old
INFO:root:mix model outputs_cos:0.999867
INFO:root:total time:16.557796478271484
'''


def test_int8_and_mixed_deploy_args_and_search():
    from pipeline.toolchain.compile import calibration_args, mlir_layer_names, parse_quantize_table, parse_search_log, search_args

    d = deploy_args("m.mlir", "m_bm1684x_int8_8b.bmodel", quantize="INT8", calibration_table="m_cali_table")
    assert d[d.index("--quantize") + 1] == "INT8"
    assert d[d.index("--calibration_table") + 1] == "m_cali_table" and "--quantize_table" not in d
    m = deploy_args("m.mlir", "o.bmodel", quantize="MIXED", calibration_table="t", quantize_table="q")
    assert m[m.index("--quantize") + 1] == "INT8" and m[m.index("--quantize_table") + 1] == "q"
    with pytest.raises(ValueError, match="calibration table"):
        deploy_args("m.mlir", "o.bmodel", quantize="INT8")
    with pytest.raises(ValueError, match="quantize table"):
        deploy_args("m.mlir", "o.bmodel", quantize="MIXED", calibration_table="t")
    assert bmodel_name("clip", 32, quantize="MIXED") == "clip_bm1684x_mixed_32b.bmodel"
    c = calibration_args("m.mlir", "data", 16, "m_cali_table")
    assert c[:2] == ["run_calibration", "m.mlir"] and c[c.index("--input_num") + 1] == "16"
    s = search_args("m.mlir", "data", 8, "m_cali_table", "m_qtable", 0.9995)
    assert s[:2] == ["run_calibration", "m.mlir"] and s[s.index("--search") + 1] == "fast_search"
    assert s[s.index("--expected_cos") + 1] == "0.9995" and s[s.index("--inference_num") + 1] == "8"
    assert s[s.index("--calibration_table") + 1] == "m_cali_table" and s[s.index("--quantize_table") + 1] == "m_qtable"
    assert mlir_layer_names(_MLIR_SNIPPET) == {"ln_pre_LayerNormalization", "blocks.0.attn.qkv_Add",
                                               "blocks.0.resid_attn_Add"}
    assert parse_quantize_table("# comment\n###\nblocks.0.resid_attn_Add F16\n\ntokens_pos_Add  F16\n") == [
        ("blocks.0.resid_attn_Add", "F16"), ("tokens_pos_Add", "F16")]
    r = parse_search_log(_SEARCH_LOG)
    assert r["int8_cos"] == 0.997932 and r["mixed_cos"] == 0.999867 and not r["int8_already_meets_target"]
    assert r["sensitive_op_types"] == ["top.Add"] and r["op_type_cos_when_only_it_is_int8"]["top.Add"] < 0.999
    assert max(r["layer_loss_when_only_it_is_int8"], key=r["layer_loss_when_only_it_is_int8"].get) == "tokens_pos_Add"
    early = parse_search_log("job success, current int8 cos:0.99951 is higher than expected_cos:0.999,no need")
    assert early["int8_already_meets_target"] and early["int8_cos"] == 0.99951 and early["mixed_cos"] is None


def test_mixed_option_errors(tmp_path, monkeypatch):
    from pipeline.toolchain.compile import compile_onnx

    monkeypatch.setattr(tenv, "find_venv", lambda venv=None: tmp_path)
    monkeypatch.setattr("pipeline.toolchain.compile.find_venv", lambda venv=None: tmp_path)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    q = tmp_path / "q"
    q.write_text("a F16\n")
    with pytest.raises(ValueError, match="MIXED needs --calib-images"):
        compile_onnx(onnx, tmp_path / "o", [1], quantize="MIXED", calib_table=q)
    with pytest.raises(ValueError, match="--quantize-table is for --quantize MIXED"):
        compile_onnx(onnx, tmp_path / "o", [1], quantize="INT8", calib_images=tmp_path, quantize_table=q)
    with pytest.raises(ValueError, match="--calib-table is for"):
        compile_onnx(onnx, tmp_path / "o", [1], quantize="F16", calib_table=q)
    with pytest.raises(ValueError, match="--mixed-cos"):
        compile_onnx(onnx, tmp_path / "o", [1], quantize="MIXED", calib_images=tmp_path, mixed_cos=1.5)


def test_nn_top1_agreement():
    from pipeline.toolchain.verify import nn_top1_agreement

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(10, 16))
    assert nn_top1_agreement(ref + 1e-6 * rng.normal(size=ref.shape), ref) == 1.0
    assert nn_top1_agreement(rng.normal(size=(10, 16)), ref) < 1.0
    with pytest.raises(ValueError):
        nn_top1_agreement(ref[:1], ref[:1])


@pytest.mark.slow
def test_int8_and_mixed_compile_and_verify_on_simulator(tiny, tmp_path):
    """Calibrate the tiny (synthetic) model on the sample photos, compile INT8, then MIXED (TPU-MLIR's
    sensitivity search picks the F16 layers), verify both on the simulator against onnxruntime fp32
    on the same photos: MIXED must be a different bmodel, keep real layers of the model in F16, and
    be closer to fp32 than INT8 (synthetic weights: the bounds are loose on purpose)."""
    import onnx

    from pipeline.toolchain.compile import compile_onnx
    from pipeline.toolchain.verify import verify

    samples = Path(__file__).resolve().parents[2] / "samples" / "images"
    f16 = compile_onnx(tiny, tmp_path, [4], log=lambda s: None)[0]
    cos = {}
    for q in ("INT8", "MIXED"):
        side = compile_onnx(tiny, tmp_path, [4], quantize=q, calib_images=samples, calib_count=6,
                            log=lambda s: None)[0]
        assert side["bmodel"] == f"tiny_bm1684x_{q.lower()}_4b.bmodel" and side["quantize"] == q
        assert side["calibration"]["images"] == 6 and "synthetic" in side["calibration"]["note"]
        assert side["f16_estimate"] == f16["estimate"] and side["estimate"]["ms_per_image"] > 0
        assert (q == "MIXED") == ("quantize_table" in side)
        r = verify(tmp_path / side["bmodel"], images_dir=samples, max_images=8, log=lambda s: None)
        img = r.comparisons[-1]
        assert img.rows == 8 and img.nn_top1_agreement is not None
        assert 0.95 <= r.cos_min < 0.99999, r.cos_min  # quantised: close, but not float-exact
        cos[q] = (img.cos_min, img.cos_mean)
    qt = side["quantize_table"]
    assert side["int8_estimate"] is not None and qt["file"] == "tiny_bm1684x_mixed_qtable"
    assert "fast_search" in qt["found_by"] and qt["search_images"] == 6 and qt["f16_layers"] == len(qt["layers"]) > 0
    assert qt["mlir_cos_mixed"] > qt["mlir_cos_all_int8"], qt
    # every F16 layer is a real node of the model (TPU-MLIR names a layer OUTPUT_OPTYPE)
    nodes = {f"{n.output[0]}_{n.op_type}" for n in onnx.load(str(tiny)).graph.node}
    assert set(qt["layers"]) <= nodes, set(qt["layers"]) - nodes
    table = (tmp_path / "tiny_bm1684x_mixed_qtable").read_text()
    rows = [ln.split() for ln in table.splitlines() if ln.strip() and not ln.startswith("#")]
    assert [r[0] for r in rows] == qt["layers"] and all(r[1] == "F16" for r in rows)
    assert json.loads((tmp_path / "tiny_bm1684x_mixed_qtable.json").read_text())["layers"] == qt["layers"]
    # a different bmodel from INT8, and closer to fp32 on the same photos
    assert (tmp_path / "tiny_bm1684x_mixed_4b.bmodel").read_bytes() != (tmp_path / "tiny_bm1684x_int8_4b.bmodel").read_bytes()
    assert cos["MIXED"][0] > cos["INT8"][0] and cos["MIXED"][1] > cos["INT8"][1], cos
    # reuse: the table and the calibration from this compile, another batch size, no search
    side1 = compile_onnx(tiny, tmp_path / "again", [1], quantize="MIXED",
                         calib_table=tmp_path / "tiny_bm1684x_cali_table",
                         quantize_table=tmp_path / "tiny_bm1684x_mixed_qtable", log=lambda s: None)[0]
    assert side1["quantize_table"]["layers"] == qt["layers"] and side1["quantize_table"]["reused_from"]
    assert side1["quantize_table"]["found_by"] == qt["found_by"] and "reused" in side1["calibration"]["tool"]
    bad = tmp_path / "bad_qtable"
    bad.write_text("no_such_layer F16\n")
    with pytest.raises(ValueError, match="no_such_layer"):
        compile_onnx(tiny, tmp_path / "bad", [1], quantize="MIXED", calib_table=tmp_path / "tiny_bm1684x_cali_table",
                     quantize_table=bad, log=lambda s: None)
