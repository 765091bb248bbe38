"""ONNX image or text encoder -> BM1684X bmodel(s), driving TPU-MLIR's tools in the venv.

A text encoder (int token ids [B,77] in) compiles the same way with input shape [[B,77]]; its
sidecar records the tower, its clip_model (pairing) and form, and a states-form model's
projection is copied beside each bmodel as ``<bmodel stem>.text_projection.npy``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from pipeline.models import sha256_file  # noqa: F401 - also part of this module's API (tests)

from .env import TPU_MLIR_VERSION, find_venv, venv_env
from .parse import parse_compiler_profile, parse_model_info
from .preprocess import CLIP_MEAN_255, CLIP_SCALE_255

CHIP = "bm1684x"
QUANTIZE = "F16"
FLOAT_QUANTIZE = ("F16", "BF16", "F32")
CALIBRATED_QUANTIZE = ("INT8", "MIXED")  # need run_calibration on real photos first
DEFAULT_CALIB_COUNT = 32
# MIXED keeps these TPU-MLIR top ops in F16 (the rest INT8): the ops whose INT8 error a ViT is known
# to amplify -- LayerNorm (outlier channels), Softmax (attention probabilities), the GELU/QuickGELU
# sigmoid gate and its product -- an op-type rule, not a per-layer search (docs/tpu-mlir.md).
MIXED_F16_OPS = ("top.LayerNorm", "top.Softmax", "top.Sigmoid", "top.GELU")
SYNTHETIC_QUANT_NOTE = ("synthetic random weights quantise differently from trained CLIP weights: "
                        "check yours with `clip-pipeline verify BMODEL --images YOUR_PHOTOS`")


class CompileError(RuntimeError):
    """A TPU-MLIR tool failed; the message ends with its log tail."""


def bmodel_name(name: str, batch: int | str, chip: str = CHIP, quantize: str = QUANTIZE) -> str:
    return f"{name}_{chip}_{quantize.lower()}_{batch}b.bmodel"


def _fmt_list(xs: Iterable[float]) -> str:
    return ",".join(repr(float(x)) if not float(x).is_integer() else str(float(x)) for x in xs)


def transform_args(name: str, onnx_path, batch: int, mlir: str, fuse_preprocess: bool = False,
                   image_size: int = 224, test_input: str | None = None,
                   test_result: str | None = None, text_context: int | None = None) -> list[str]:
    """Arguments of ``model_transform`` for one fixed batch size (a text encoder: [[B, text_context]])."""
    shape = f"[[{int(batch)},{int(text_context)}]]" if text_context else f"[[{int(batch)},3,{image_size},{image_size}]]"
    args = ["model_transform", "--model_name", name, "--model_def", str(onnx_path),
            "--input_shapes", shape, "--mlir", mlir]
    if fuse_preprocess:
        args += ["--mean", _fmt_list(CLIP_MEAN_255), "--scale", _fmt_list(CLIP_SCALE_255),
                 "--pixel_format", "rgb"]
    if test_input:
        args += ["--test_input", test_input, "--test_result", test_result or f"{name}_top_outputs.npz"]
    return args


def deploy_args(mlir: str, bmodel: str, chip: str = CHIP, quantize: str = QUANTIZE,
                fuse_preprocess: bool = False, validate: bool = False, name: str | None = None,
                calibration_table: str | None = None, quantize_table: str | None = None) -> list[str]:
    """Arguments of ``model_deploy``; fast compile (``--skip_validation``) unless ``validate``.

    ``quantize`` INT8 or MIXED needs ``calibration_table``; MIXED deploys as INT8 with
    ``quantize_table`` (the layers kept in F16)."""
    q = quantize.upper()
    if q in CALIBRATED_QUANTIZE and not calibration_table:
        raise ValueError(f"--quantize {quantize} needs a calibration table")
    if q == "MIXED" and not quantize_table:
        raise ValueError("--quantize MIXED needs a quantize table")
    args = ["model_deploy", "--mlir", mlir, "--quantize", "INT8" if q == "MIXED" else q, "--chip", chip,
            "--model", bmodel]
    if calibration_table:
        args += ["--calibration_table", calibration_table]
    if quantize_table and q == "MIXED":
        args += ["--quantize_table", quantize_table]
    if fuse_preprocess:
        args += ["--fuse_preprocess", "--customization_format", "RGB_PLANAR"]
    if validate:
        args += ["--test_input", f"{name}_in_f32.npz", "--test_reference", f"{name}_top_outputs.npz"]
    else:
        args += ["--skip_validation"]
    return args


def calibration_args(mlir: str, dataset: str, count: int, table: str) -> list[str]:
    """Arguments of ``run_calibration`` (KL thresholds) over ``count`` npz inputs in ``dataset``."""
    return ["run_calibration", mlir, "--dataset", dataset, "--input_num", str(int(count)), "-o", table]


def mixed_quantize_table(mlir_text: str, ops: Sequence[str] = MIXED_F16_OPS) -> list[str]:
    """Names (MLIR locations) of the ops of types ``ops`` in a top-level MLIR: the MIXED layers kept
    in F16, one ``NAME F16`` line each in the quantize table."""
    import re

    locs = dict(re.findall(r'^#(loc\d+) = loc\("([^"]+)"\)', mlir_text, flags=re.M))
    names = []
    pat = re.compile(r'"(' + "|".join(re.escape(o) for o in ops) + r')"\(.*loc\(#(loc\d+)\)\s*$')
    for line in mlir_text.splitlines():
        m = pat.search(line)
        if m and m.group(2) in locs:
            names.append(locs[m.group(2)])
    return names


def write_calibration_inputs(images_dir, out_dir: Path, count: int, name: str, size: int = 224) -> list[str]:
    """The first ``count`` photos under ``images_dir`` through the pipeline's reference
    preprocessing (CLIP-normalised float32, one ``[1,3,H,W]`` npz each, which is what the top MLIR
    takes with or without fused preprocessing); returns their paths."""
    import numpy as np

    from .preprocess import load_images_u8, normalize_u8

    paths, u8 = load_images_u8(images_dir, size=size, limit=count)
    if not paths:
        raise ValueError(f"--calib-images {images_dir}: no images found (jpg/png/bmp/webp/tif)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for k in range(len(paths)):
        np.savez(out_dir / f"{k:05d}.npz", **{name: normalize_u8(u8[k:k + 1])})
    return paths


def combine_args(bmodels: Sequence[str], out: str) -> list[str]:
    return ["model_tool", "--combine", *[str(b) for b in bmodels], "-o", str(out)]


def onnx_synthetic_flag(onnx_path) -> bool | None:
    """``"synthetic"`` from the ONNX's sidecar ``<onnx>.json``; None when there is none."""
    side = Path(str(onnx_path) + ".json")
    if not side.is_file():
        return None
    try:
        v = json.loads(side.read_text()).get("synthetic")
    except (OSError, ValueError, AttributeError):
        return None
    return None if v is None else bool(v)


def run_tool(args: list[str], cwd, venv=None, log_name: str | None = None) -> float:
    """Run a TPU-MLIR tool from the venv in ``cwd``; return seconds; raise CompileError on failure."""
    d = find_venv(venv)
    exe = [str(d / "bin" / args[0]), *args[1:]]
    log = Path(cwd) / (log_name or f"{args[0]}.log")
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        rc = subprocess.run(exe, cwd=cwd, env=venv_env(venv), stdout=f, stderr=subprocess.STDOUT).returncode
    secs = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_bytes()[-4000:].decode(errors="replace")
        raise CompileError(f"{args[0]} failed (rc={rc}) in {cwd}:\n{' '.join(args)}\n--- log tail ---\n{tail}")
    return secs


def bmodel_info(bmodel, venv=None) -> dict:
    """Networks/stages/tensors of a bmodel from ``model_tool --info`` (no simulator run)."""
    d = find_venv(venv)
    r = subprocess.run([str(d / "bin" / "model_tool"), "--info", str(bmodel)], env=venv_env(venv),
                       capture_output=True, text=True)
    if r.returncode != 0 or "net 0" not in r.stdout:
        raise CompileError(f"model_tool --info {bmodel} failed:\n{(r.stdout + r.stderr)[-2000:]}")
    return parse_model_info(r.stdout)


def _write_json(path: Path, obj: dict):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def compile_onnx(onnx_path, out_dir, batches: Sequence[int], name: str | None = None,
                 fuse_preprocess: bool = False, combine: bool = False, validate: bool = False,
                 chip: str = CHIP, quantize: str = QUANTIZE, keep_workdir: bool = False,
                 venv=None, log: Callable[[str], None] = print, calib_images=None,
                 calib_count: int = DEFAULT_CALIB_COUNT) -> list[dict]:
    """Compile ``onnx_path`` to one bmodel per batch size (+ a combined one); return sidecars.

    Each output ``NAME_{chip}_{q}_{B}b.bmodel`` gets a ``.bmodel.json`` sidecar. Work happens in a
    temporary directory per batch (the tools write many files, and ``compiler_profile_0.txt``).

    ``quantize`` INT8 / MIXED: ``run_calibration`` first runs once (batch-1 MLIR) over the first
    ``calib_count`` photos of ``calib_images``; its table serves every batch size.
    """
    find_venv(venv)
    quantize = quantize.upper()
    calibrated = quantize in CALIBRATED_QUANTIZE
    if calibrated and not calib_images:
        raise ValueError(f"--quantize {quantize} needs --calib-images DIR (real photos, e.g. the ones you will embed)")
    if calibrated and (calib_count or 0) < 1:
        raise ValueError("--calib-count must be >= 1")
    onnx_path = Path(onnx_path).resolve()
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX not found: {onnx_path}")
    batches = sorted({int(b) for b in batches})
    if not batches or batches[0] < 1:
        raise ValueError("give at least one batch size >= 1")
    if combine and len(batches) < 2:
        raise ValueError("--combine needs at least two batch sizes")
    name = name or (onnx_path.stem + ("_u8" if fuse_preprocess else ""))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_sha = sha256_file(onnx_path)
    synthetic = onnx_synthetic_flag(onnx_path)
    text_context = onnx_text_context(onnx_path)
    if text_context and fuse_preprocess:
        raise ValueError("--fuse-preprocess is for image encoders; this ONNX takes token ids")
    if text_context and calibrated:
        raise ValueError(f"--quantize {quantize} is implemented for image encoders only (calibration "
                         "data for a text tower would be token ids of real captions); use F16")
    common = {
        "chip": chip, "quantize": quantize, "tpu_mlir_version": TPU_MLIR_VERSION,
        "fused_preprocess": bool(fuse_preprocess),
        "onnx": {"path": str(onnx_path), "sha256": onnx_sha, "bytes": onnx_path.stat().st_size,
                 "synthetic_weights": synthetic, **_onnx_identity(onnx_path)},
    }
    if text_context:
        common["tower"] = "text"
    if fuse_preprocess:
        common["preprocess"] = {"format": "RGB_PLANAR uint8 [N,3,H,W] (resize/crop not included)",
                                "mean": list(CLIP_MEAN_255), "scale": list(CLIP_SCALE_255),
                                "formula": "(x - mean) * scale per channel"}
    results = []
    work_root = Path(tempfile.mkdtemp(prefix=f"tpu-compile-{name}-"))
    cali_table = qtable = None
    try:
        if calibrated:
            cd = work_root / "calib"
            cd.mkdir()
            log(f"[compile] {name}: calibration inputs from {calib_images} (up to {calib_count} photos)")
            used = write_calibration_inputs(calib_images, cd / "data", calib_count, _onnx_input_name(onnx_path))
            mlir = f"{name}.mlir"
            t_ctr = run_tool(transform_args(name, onnx_path, 1, mlir, fuse_preprocess), cd, venv)
            log(f"[compile] {name}: run_calibration over {len(used)} photos (KL thresholds)")
            t_cal = run_tool(calibration_args(mlir, "data", len(used), f"{name}_cali_table"), cd, venv)
            cali_table = str(cd / f"{name}_cali_table")
            common["calibration"] = {
                "tool": "run_calibration (TPU-MLIR, method kl)", "images_dir": str(Path(calib_images).resolve()),
                "images": len(used), "seconds": round(t_ctr + t_cal, 2),
                "note": SYNTHETIC_QUANT_NOTE if synthetic else
                        "check parity with `clip-pipeline verify BMODEL --images YOUR_PHOTOS`"}
            shutil.copyfile(cali_table, out_dir / f"{name}_{chip}_cali_table")
            if quantize == "MIXED":
                layers = mixed_quantize_table((cd / mlir).read_text(errors="replace"))
                if not layers:
                    raise CompileError(f"no {', '.join(MIXED_F16_OPS)} op found in {mlir}: "
                                       "nothing to keep in F16 (use --quantize INT8)")
                qtable = str(cd / f"{name}_qtable")
                Path(qtable).write_text("".join(f"{n} F16\n" for n in layers))
                shutil.copyfile(qtable, out_dir / f"{name}_{chip}_mixed_qtable")
                common["quantize_table"] = {
                    "file": f"{name}_{chip}_mixed_qtable", "f16_layers": len(layers),
                    "rule": "op types kept in F16: " + ", ".join(MIXED_F16_OPS) + "; all other layers INT8"}
            log(f"[compile] calibration took {t_ctr + t_cal:.1f} s"
                + (f"; {len(layers)} layers kept in F16" if quantize == "MIXED" else ""))
        for b in batches:
            wd = work_root / f"b{b}"
            wd.mkdir()
            mlir = f"{name}.mlir"
            out_name = bmodel_name(name, b, chip, quantize)
            test_in = None
            if validate:
                import numpy as np

                from .preprocess import normalize_u8, random_token_ids, random_u8_images
                if text_context:
                    arr = random_token_ids(b, text_context, seed=0)
                else:
                    u8 = random_u8_images(b, seed=0)
                    if fuse_preprocess:  # model_transform takes the raw pixels and applies mean/scale
                        arr = u8.astype(np.float32)
                    else:
                        arr = normalize_u8(u8)
                test_in = str(wd / "test_input.npz")
                np.savez(test_in, **{_onnx_input_name(onnx_path): arr})
            log(f"[compile] {name} batch {b}: model_transform")
            t_tr = run_tool(transform_args(name, onnx_path, b, mlir, fuse_preprocess,
                                           test_input=test_in, text_context=text_context), wd, venv)
            log(f"[compile] {name} batch {b}: model_deploy --quantize {quantize} --chip {chip}"
                + ("" if validate else " --skip_validation"))
            t_dp = run_tool(deploy_args(mlir, out_name, chip, quantize, fuse_preprocess, validate, name,
                                        cali_table, qtable), wd, venv)
            prof = wd / "compiler_profile_0.txt"
            est = parse_compiler_profile(prof.read_text(errors="replace"), batch=b) if prof.is_file() else {}
            dst = out_dir / out_name
            shutil.copyfile(wd / out_name, dst)
            info = bmodel_info(dst, venv)
            st = info["networks"][0]["stages"][0]
            side = {
                "bmodel": dst.name, "batch": b, "network": info["networks"][0]["name"], **common,
                "input": st["inputs"][0], "output": st["outputs"][0],
                "compile_seconds": {"transform": round(t_tr, 2), "deploy": round(t_dp, 2),
                                    "total": round(t_tr + t_dp, 2)},
                "validated_by_compiler": bool(validate),
                "bmodel_bytes": dst.stat().st_size,
                "estimate": est or None,
                **_f16_estimate(out_dir, name, b, chip, quantize),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            _copy_projection(onnx_path, dst, side)
            _write_json(Path(str(dst) + ".json"), side)
            results.append(side)
            per_img = f", estimate {est['ms_per_image']:.3f} ms/image" if est else ""
            log(f"[compile] wrote {dst} ({side['bmodel_bytes'] / 1e6:.1f} MB, "
                f"{t_tr + t_dp:.1f} s{per_img})")
        if combine:
            # pyruntime_bm sizes its tensor buffers from stage 0: put the largest batch first.
            order = sorted(batches, reverse=True)
            label = "-".join(str(b) for b in batches)
            dst = out_dir / bmodel_name(name, label, chip, quantize)
            srcs = [str(out_dir / bmodel_name(name, b, chip, quantize)) for b in order]
            log(f"[compile] model_tool --combine ({', '.join(map(str, order))}) -> {dst}")
            t_c = run_tool(combine_args(srcs, str(dst)), work_root, venv, "combine.log")
            info = bmodel_info(dst, venv)
            side = {
                "bmodel": dst.name, "batch": order, "network": info["networks"][0]["name"], **common,
                "combined_from": [Path(s).name for s in srcs],
                "stages": [{"batch": s["inputs"][0]["shape"][0], "input": s["inputs"][0],
                            "output": s["outputs"][0]} for s in info["networks"][0]["stages"]],
                "input": info["networks"][0]["stages"][0]["inputs"][0],
                "output": info["networks"][0]["stages"][0]["outputs"][0],
                "compile_seconds": {"combine": round(t_c, 2),
                                    "total": round(t_c + sum(r["compile_seconds"]["total"] for r in results), 2)},
                "bmodel_bytes": dst.stat().st_size,
                "estimate": {str(r["batch"]): r["estimate"] for r in results},
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            _copy_projection(onnx_path, dst, side)
            _write_json(Path(str(dst) + ".json"), side)
            results.append(side)
            log(f"[compile] wrote {dst} ({side['bmodel_bytes'] / 1e6:.1f} MB)")
    finally:
        if keep_workdir:
            log(f"[compile] work dir kept: {work_root}")
        else:
            shutil.rmtree(work_root, ignore_errors=True)
    return results


def _f16_estimate(out_dir: Path, name: str, batch: int, chip: str, quantize: str) -> dict:
    """For INT8/MIXED: the F16 bmodel's compiler estimate (from its sidecar in ``out_dir``, if
    compiled there), side by side with this one's. Both are the compiler's estimates, not measured."""
    if quantize not in CALIBRATED_QUANTIZE:
        return {}
    out = {"estimate_kind": "compiler estimate (compiler_profile_0.txt), not a measurement"}
    side = out_dir / (bmodel_name(name, batch, chip, "F16") + ".json")
    try:
        f16 = json.loads(side.read_text()).get("estimate")
    except (OSError, ValueError):
        f16 = None
    out["f16_estimate"] = f16
    return out


def _onnx_input_name(onnx_path) -> str:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def onnx_text_context(onnx_path) -> int | None:
    """The context length if the ONNX is a text encoder (int32/int64 input [B, T]), else None."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    tt = inp.type.tensor_type
    dims = [d.dim_value or d.dim_param for d in tt.shape.dim]
    if tt.elem_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64) and len(dims) == 2:
        return dims[1] if isinstance(dims[1], int) and dims[1] > 0 else 77
    return None


def _onnx_identity(onnx_path) -> dict:
    """What pairs/describes the model, copied from the ONNX's sidecar (clip_model, tower, form, act)."""
    side = Path(str(onnx_path) + ".json")
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError):
        return {}
    return {k: info[k] for k in ("clip_model", "tower", "text_form", "act", "arch") if k in info}


def _copy_projection(onnx_path, bmodel: Path, side: dict) -> None:
    """A states-form text encoder's projection goes beside each bmodel (the host applies it)."""
    src = Path(onnx_path).with_name(Path(onnx_path).stem + ".text_projection.npy")
    if src.is_file():
        dst = bmodel.with_name(bmodel.stem + ".text_projection.npy")
        shutil.copyfile(src, dst)
        side["projection"] = {"file": dst.name, "sha256": sha256_file(dst)}
