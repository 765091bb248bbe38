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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.model.models import sha256_file  # noqa: F401 - also part of this module's API (tests)

from .env import TPU_MLIR_VERSION, find_venv, venv_env
from .parse import parse_compiler_profile, parse_model_info
from .preprocess import CLIP_MEAN_255, CLIP_SCALE_255

CHIP = "bm1684x"
QUANTIZE = "F16"
FLOAT_QUANTIZE = ("F16", "BF16", "F32")
CALIBRATED_QUANTIZE = ("INT8", "MIXED")  # need run_calibration on real photos (captions) first
DEFAULT_CALIB_COUNT = 32
# MIXED: INT8 with the layers whose INT8 quantisation hurts the output cosine most kept in F16, found
# by TPU-MLIR's own sensitivity search (``run_calibration --search fast_search``) on the MLIR
# interpreter over the calibration photos (docs/tpu-mlir.md section 2b).
MIXED_SEARCH = "fast_search"
DEFAULT_MIXED_COS = 0.999        # the search's --expected_cos: the output cosine it tries to reach
MIXED_SEARCH_MAX_IMAGES = 8      # photos the search evaluates on (also its maximum number of rounds)
SYNTHETIC_QUANT_NOTE = ("synthetic random weights quantise differently from trained CLIP weights: "
                        "check yours with `clip-pipeline verify BMODEL --images YOUR_PHOTOS`")
SYNTHETIC_QUANT_NOTE_TEXT = ("synthetic random weights quantise differently from trained CLIP weights: "
                             "check yours with `clip-pipeline verify BMODEL --texts YOUR_CAPTIONS`")


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
    if quantize_table and q in CALIBRATED_QUANTIZE:  # INT8: layers that must stay float (nonfinite_layers)
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


def search_args(mlir: str, dataset: str, count: int, cali_table: str, qtable: str,
                expected_cos: float = DEFAULT_MIXED_COS, chip: str = CHIP,
                pre_qtable: str | None = None) -> list[str]:
    """Arguments of TPU-MLIR's mixed-precision search (``run_calibration --search fast_search``):
    on the MLIR interpreter, over ``count`` npz inputs, it finds the op types whose INT8 lowering
    costs output cosine, then per layer of those types the loss of quantising it, and keeps the
    worst 5 per round in F16 until the output cosine reaches ``expected_cos`` (or stops gaining);
    writes ``qtable``. The calibration table must exist (it is read, not rewritten)."""
    return ["run_calibration", mlir, "--dataset", dataset, "--input_num", str(int(count)),
            "--inference_num", str(int(count)), "--search", MIXED_SEARCH,
            "--expected_cos", repr(float(expected_cos)), "--calibration_table", cali_table,
            "--quantize_table", qtable, "--chip", chip] + (["--pre_qtable", pre_qtable] if pre_qtable else [])


def parse_quantize_table(text: str) -> list[tuple[str, str]]:
    """``(layer, mode)`` pairs of a TPU-MLIR quantize table (``#`` lines are comments)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 2:
            out.append((parts[0], parts[1]))
    return out


def mlir_layer_names(mlir_text: str) -> set[str]:
    """The layer names (MLIR locations) a quantize table can name, from a top-level MLIR."""
    import re

    return set(re.findall(r'^#loc\d+ = loc\("([^"]+)"\)', mlir_text, flags=re.M))


def nonfinite_layers(cali_table_text: str) -> list[str]:
    """Layers whose calibration threshold is not finite (``inf``/``nan`` in a TPU-MLIR calibration
    table): INT8 cannot represent them and ``model_deploy`` aborts lowering them ("can't get scale
    and zeropoint"). In CLIP's text tower these are the causal-mask additions (scores + a mask of
    -inf above the diagonal); they are kept in F16, which carries -inf exactly into the softmax."""
    import math

    out = []
    for line in cali_table_text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.lstrip().startswith("#"):
            try:
                th = float(parts[1])
            except ValueError:
                continue
            if not math.isfinite(th):
                out.append(parts[0])
    return out


def write_quantize_table(path: Path, layers: Sequence[str], header: str = "") -> None:
    """A TPU-MLIR quantize table keeping ``layers`` in F16."""
    Path(path).write_text(header + "".join(f"{n} F16\n" for n in layers))


def parse_search_log(text: str) -> dict:
    """What ``run_calibration --search fast_search`` reported (its ``Search_Qtable`` log / stdout):
    the all-INT8 and the final mixed output cosine (MLIR interpreter vs the F32 MLIR), the op types
    it found sensitive, the per-op-type and per-layer figures, and whether it stopped early because
    INT8 already reached the target."""
    import re

    def _f(pat):
        m = re.findall(pat, text)
        return float(m[-1]) if m else None

    early = _f(r"current int8 cos:\s*([-\d.e]+) is higher than expected_cos")
    types = re.findall(r"sensitive_op_type : \[([^\]]*)\]", text)
    layers: dict[str, float] = {}
    for name, loss in re.findall(r"layer (\S+), outputs_cos:\s*([-\d.e]+)", text):
        layers[name] = max(float(loss), layers.get(name, float("-inf")))
    return {
        "int8_cos": early if early is not None else _f(r"int8 outputs_cos:\s*([-\d.e]+)"),
        "mixed_cos": _f(r"mix model outputs_cos:\s*([-\d.e]+)"),
        "int8_already_meets_target": early is not None,
        "sensitive_op_types": [t.strip().strip("'\"") for t in types[-1].split(",")] if types and types[-1] else [],
        "op_type_cos_when_only_it_is_int8": {
            t: float(c) for t, c in re.findall(r"op_type : (\S+), similarity : ([-\d.e]+)", text)},
        "layer_loss_when_only_it_is_int8": layers,
        "seconds_reported": _f(r"total time:\s*([\d.]+)"),
    }


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


def read_captions(texts_file, count: int | None = None) -> list[str]:
    """The first ``count`` non-blank lines (stripped) of a UTF-8 file, one caption per line."""
    try:
        raw = Path(texts_file).read_bytes()
    except OSError as e:
        raise ValueError(f"{texts_file}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{texts_file}: not UTF-8 text (byte {e.start}); give one caption per line, UTF-8") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[:count] if count else lines


def tokenize_captions(captions: Sequence[str], context: int):
    """Token ids ``int32 [n, context]`` of ``captions`` by the project's CLIP BPE tokenizer
    (pipeline.text.tokenizer; a caption too long for the context is cut, end token last)."""
    from pipeline.text.tokenizer import get_tokenizer

    return get_tokenizer().tokenize(list(captions), context_length=int(context)).ids


def write_calibration_texts(texts_file, out_dir: Path, count: int, name: str, context: int,
                            dtype: str = "int32") -> list[str]:
    """The first ``count`` captions of ``texts_file`` (one per line, UTF-8, blank lines skipped)
    as token ids by the project's tokenizer, one ``[1, context]`` npz each with the ONNX input's
    name and integer dtype (what the top MLIR takes); returns the captions."""
    import numpy as np

    caps = read_captions(texts_file, count)
    if not caps:
        raise ValueError(f"--calib-texts {texts_file}: no captions (one per line, UTF-8)")
    ids = tokenize_captions(caps, context).astype(np.dtype(dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    for k in range(len(caps)):
        np.savez(out_dir / f"{k:05d}.npz", **{name: ids[k:k + 1]})
    return caps


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
                 calib_count: int = DEFAULT_CALIB_COUNT, calib_table=None, quantize_table=None,
                 mixed_cos: float = DEFAULT_MIXED_COS, calib_texts=None) -> list[dict]:
    """Compile ``onnx_path`` to one bmodel per batch size (+ a combined one); return sidecars.

    Each output ``NAME_{chip}_{q}_{B}b.bmodel`` gets a ``.bmodel.json`` sidecar. Work happens in a
    temporary directory per batch (the tools write many files, and ``compiler_profile_0.txt``).

    ``quantize`` INT8 / MIXED: ``run_calibration`` first runs once (batch-1 MLIR) over the first
    ``calib_count`` photos of ``calib_images``; its table serves every batch size (``calib_table``:
    reuse a table from an earlier compile instead). MIXED then runs TPU-MLIR's sensitivity search
    (``search_args``) on those photos for the layers to keep in F16, aiming at output cosine
    ``mixed_cos`` (``quantize_table``: reuse a table found before; no search).

    A text encoder calibrates on ``calib_texts`` instead (a file of captions, one per line): the
    first ``calib_count`` captions as token ids by the project's tokenizer.
    """
    find_venv(venv)
    quantize = quantize.upper()
    calib = _Calibration(calib_images, calib_texts, calib_count, calib_table, quantize_table, mixed_cos)
    _check_quantize_options(quantize, calib)
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
    job = _job(onnx_path, name, out_dir, chip, quantize, fuse_preprocess, calib, venv, log)
    results = []
    work_root = Path(tempfile.mkdtemp(prefix=f"tpu-compile-{name}-"))
    try:
        cali_table, qtable = _calibrate(job, calib, work_root) if quantize in CALIBRATED_QUANTIZE else (None, None)
        for b in batches:
            results.append(_compile_batch(job, b, work_root, validate, cali_table, qtable))
        if combine:
            results.append(_combine(job, batches, results, work_root))
    finally:
        if keep_workdir:
            log(f"[compile] work dir kept: {work_root}")
        else:
            shutil.rmtree(work_root, ignore_errors=True)
    return results


@dataclass(frozen=True)
class _Calibration:
    """compile_onnx's calibration options (INT8 / MIXED)."""

    images: Any
    texts: Any
    count: int
    table: Any  # a calibration table to reuse
    quantize_table: Any  # a MIXED quantize table to reuse
    mixed_cos: float

    @property
    def source(self) -> Any:
        return self.images or self.texts


@dataclass
class _Job:
    """One compile_onnx call: what every step reads, and the sidecar fields they share (`common`)."""

    onnx_path: Path
    name: str
    out_dir: Path
    chip: str
    quantize: str
    fuse_preprocess: bool
    text_context: int | None
    synthetic: bool | None
    venv: Any
    log: Callable[[str], None]
    common: dict


def _check_quantize_options(quantize: str, calib: _Calibration) -> None:
    """ValueError for a combination of quantize and calibration options that cannot work."""
    calibrated = quantize in CALIBRATED_QUANTIZE
    if calib.images and calib.texts:
        raise ValueError("give --calib-images DIR (image encoder) or --calib-texts FILE (text encoder), not both")
    if calibrated and not calib.source and not calib.table:
        raise ValueError(f"--quantize {quantize} needs --calib-images DIR (real photos, e.g. the ones you will "
                         "embed; a text encoder: --calib-texts FILE, real captions one per line)")
    if quantize == "MIXED" and not calib.source and not calib.quantize_table:
        raise ValueError("--quantize MIXED needs --calib-images DIR: the search for the layers to keep in F16 "
                         "runs on those photos (a text encoder: --calib-texts FILE; or give --quantize-table "
                         "FILE from an earlier MIXED compile)")
    if calib.source and not calibrated:
        raise ValueError(f"--calib-{'images' if calib.images else 'texts'} is for --quantize INT8 or MIXED")
    if calib.quantize_table and quantize != "MIXED":
        raise ValueError("--quantize-table is for --quantize MIXED")
    if calib.table and not calibrated:
        raise ValueError("--calib-table is for --quantize INT8 or MIXED")
    for opt, f in (("--calib-table", calib.table), ("--quantize-table", calib.quantize_table)):
        if f and not Path(f).is_file():
            raise ValueError(f"{opt} {f}: no such file")
    if not 0.0 < float(calib.mixed_cos) < 1.0:
        raise ValueError("--mixed-cos must be between 0 and 1 (e.g. 0.999)")
    if calibrated and (calib.count or 0) < 1:
        raise ValueError("--calib-count must be >= 1")


def _job(onnx_path: Path, name: str, out_dir: Path, chip: str, quantize: str, fuse_preprocess: bool,
         calib: _Calibration, venv, log: Callable[[str], None]) -> _Job:
    """The model's identity and tower (refusing options for the other tower) and the sidecar fields
    every bmodel of this compile shares."""
    onnx_sha = sha256_file(onnx_path)
    synthetic = onnx_synthetic_flag(onnx_path)
    text_context = onnx_text_context(onnx_path)
    if text_context and fuse_preprocess:
        raise ValueError("--fuse-preprocess is for image encoders; this ONNX takes token ids")
    if text_context and calib.images:
        raise ValueError(f"--calib-images is for image encoders; {onnx_path.name} takes token ids: "
                         "give --calib-texts FILE (real captions, one per line, UTF-8)")
    if calib.texts and not text_context:
        raise ValueError(f"--calib-texts is for text encoders; {onnx_path.name} takes images: "
                         "give --calib-images DIR (real photos)")
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
    return _Job(onnx_path, name, out_dir, chip, quantize, fuse_preprocess, text_context, synthetic, venv, log,
                common)


def _calibrate(job: _Job, calib: _Calibration, work_root: Path) -> tuple[str, str | None]:
    """INT8 / MIXED: the calibration table (made now over the calibration inputs, or reused) and the
    quantize table (layers kept in F16), both recorded in job.common. Returns their paths."""
    name, log = job.name, job.log
    cd = work_root / "calib"
    cd.mkdir()
    mlir = f"{name}.mlir"
    need_search = job.quantize == "MIXED" and not calib.quantize_table
    used: list[str] = []
    t_ctr = 0.0
    if calib.source and (need_search or not calib.table):
        if job.text_context:
            log(f"[compile] {name}: calibration inputs from {calib.texts} (up to {calib.count} captions)")
            used = write_calibration_texts(calib.texts, cd / "data", calib.count, _onnx_input_name(job.onnx_path),
                                           job.text_context, _onnx_input_dtype(job.onnx_path))
        else:
            log(f"[compile] {name}: calibration inputs from {calib.images} (up to {calib.count} photos)")
            used = write_calibration_inputs(calib.images, cd / "data", calib.count, _onnx_input_name(job.onnx_path))
    if need_search or not calib.table or calib.quantize_table:  # the batch-1 MLIR: calibrate / search / check names
        t_ctr = run_tool(transform_args(name, job.onnx_path, 1, mlir, job.fuse_preprocess,
                                        text_context=job.text_context), cd, job.venv)
    if job.text_context:
        note = (SYNTHETIC_QUANT_NOTE_TEXT if job.synthetic else
                "check parity with `clip-pipeline verify BMODEL --texts YOUR_CAPTIONS`")
    else:
        note = (SYNTHETIC_QUANT_NOTE if job.synthetic else
                "check parity with `clip-pipeline verify BMODEL --images YOUR_PHOTOS`")
    cali_table = str(cd / f"{name}_cali_table")
    if calib.table:
        shutil.copyfile(calib.table, cali_table)
        job.common["calibration"] = {
            "tool": "reused table (--calib-table), not calibrated in this run",
            "table": str(Path(calib.table).resolve()), "sha256": sha256_file(calib.table), "note": note}
        log(f"[compile] {name}: reusing calibration table {calib.table}")
    else:
        unit = "captions" if job.text_context else "photos"
        log(f"[compile] {name}: run_calibration over {len(used)} {unit} (KL thresholds)")
        t_cal = run_tool(calibration_args(mlir, "data", len(used), f"{name}_cali_table"), cd, job.venv)
        src = ({"texts_file": str(Path(calib.texts).resolve()), "texts": len(used),
                "tokenizer": "clip-bpe (pipeline.text.tokenizer)", "context": job.text_context}
               if job.text_context else
               {"images_dir": str(Path(calib.images).resolve()), "images": len(used)})
        job.common["calibration"] = {
            "tool": "run_calibration (TPU-MLIR, method kl)", **src,
            "seconds": round(t_ctr + t_cal, 2), "note": note}
        log(f"[compile] calibration took {t_ctr + t_cal:.1f} s")
    shutil.copyfile(cali_table, job.out_dir / f"{name}_{job.chip}_cali_table")
    forced = nonfinite_layers(Path(cali_table).read_text(errors="replace"))
    qtable = None
    if forced:
        log(f"[compile] {name}: {len(forced)} layers with a non-finite calibration threshold kept in "
            f"F16 ({', '.join(forced[:4])}{' ...' if len(forced) > 4 else ''})")
        job.common["f16_forced"] = {
            "layers": forced,
            "why": "non-finite calibration threshold (a causal attention mask adds -inf): INT8 cannot "
                   "represent it and model_deploy aborts lowering it; F16 carries -inf into the softmax"}
        forced_table = cd / f"{name}_forced_qtable"
        write_quantize_table(forced_table, forced, "# layers kept in F16: non-finite calibration threshold\n")
        if job.quantize == "INT8":
            qtable = str(forced_table)
    if job.quantize == "MIXED":
        qtable = _mixed_deploy_table(job, calib, cd, mlir, cali_table, used, forced)
    return cali_table, qtable


def _mixed_deploy_table(job: _Job, calib: _Calibration, cd: Path, mlir: str, cali_table: str,
                        used: Sequence[str], forced: list[str]) -> str:
    """MIXED: the quantize table (found or reused: _mixed_table), copied to the output with its
    record, plus the layers that must be F16 anyway (non-finite thresholds) for the deploy."""
    name, chip = job.name, job.chip
    qtable, record = _mixed_table(cd, mlir, name, chip, cali_table, calib.quantize_table, used,
                                  calib.source, calib.mixed_cos, job.venv, job.log, bool(job.text_context),
                                  f"{name}_forced_qtable" if forced else None)
    dst_q = job.out_dir / f"{name}_{chip}_mixed_qtable"
    if Path(qtable).resolve() != dst_q.resolve():
        shutil.copyfile(qtable, dst_q)
    record["file"] = dst_q.name
    _write_json(Path(str(dst_q) + ".json"), record)
    job.common["quantize_table"] = record
    extra = [n for n in forced if n not in record["layers"]]
    if extra:  # the deploy also needs the non-finite layers in F16
        merged = cd / f"{name}_deploy_qtable"
        merged.write_text(Path(qtable).read_text(errors="replace").rstrip("\n") + "\n"
                          + "".join(f"{n} F16\n" for n in extra))
        qtable = str(merged)
    return qtable


def _validation_input(job: _Job, b: int, wd: Path) -> str:
    """--validate: a random batch of b inputs (token ids, or pixels as the model takes them) for
    model_transform's reference run, saved as an .npz; returns its path."""
    import numpy as np

    from .preprocess import normalize_u8, random_token_ids, random_u8_images
    if job.text_context:
        arr = random_token_ids(b, job.text_context, seed=0)
    else:
        u8 = random_u8_images(b, seed=0)
        if job.fuse_preprocess:  # model_transform takes the raw pixels and applies mean/scale
            arr = u8.astype(np.float32)
        else:
            arr = normalize_u8(u8)
    test_in = str(wd / "test_input.npz")
    np.savez(test_in, **{_onnx_input_name(job.onnx_path): arr})
    return test_in


def _compile_batch(job: _Job, b: int, work_root: Path, validate: bool, cali_table: str | None,
                   qtable: str | None) -> dict:
    """model_transform + model_deploy for batch size b: the bmodel and its sidecar in the output."""
    name, log = job.name, job.log
    wd = work_root / f"b{b}"
    wd.mkdir()
    mlir = f"{name}.mlir"
    out_name = bmodel_name(name, b, job.chip, job.quantize)
    test_in = _validation_input(job, b, wd) if validate else None
    log(f"[compile] {name} batch {b}: model_transform")
    t_tr = run_tool(transform_args(name, job.onnx_path, b, mlir, job.fuse_preprocess,
                                   test_input=test_in, text_context=job.text_context), wd, job.venv)
    log(f"[compile] {name} batch {b}: model_deploy --quantize {job.quantize} --chip {job.chip}"
        + ("" if validate else " --skip_validation"))
    t_dp = run_tool(deploy_args(mlir, out_name, job.chip, job.quantize, job.fuse_preprocess, validate, name,
                                cali_table, qtable), wd, job.venv)
    prof = wd / "compiler_profile_0.txt"
    est = parse_compiler_profile(prof.read_text(errors="replace"), batch=b) if prof.is_file() else {}
    dst = job.out_dir / out_name
    shutil.copyfile(wd / out_name, dst)
    info = bmodel_info(dst, job.venv)
    st = info["networks"][0]["stages"][0]
    side = {
        "bmodel": dst.name, "batch": b, "network": info["networks"][0]["name"], **job.common,
        "input": st["inputs"][0], "output": st["outputs"][0],
        "compile_seconds": {"transform": round(t_tr, 2), "deploy": round(t_dp, 2),
                            "total": round(t_tr + t_dp, 2)},
        "validated_by_compiler": bool(validate),
        "bmodel_bytes": dst.stat().st_size,
        "estimate": est or None,
        **_f16_estimate(job.out_dir, name, b, job.chip, job.quantize),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _copy_projection(job.onnx_path, dst, side)
    _write_json(Path(str(dst) + ".json"), side)
    per_img = f", estimate {est['ms_per_image']:.3f} ms/image" if est else ""
    log(f"[compile] wrote {dst} ({side['bmodel_bytes'] / 1e6:.1f} MB, "
        f"{t_tr + t_dp:.1f} s{per_img})")
    return side


def _combine(job: _Job, batches: Sequence[int], results: Sequence[dict], work_root: Path) -> dict:
    """--combine: one bmodel holding every batch size's stage, and its sidecar."""
    name, chip, quantize = job.name, job.chip, job.quantize
    # pyruntime_bm sizes its tensor buffers from stage 0: put the largest batch first.
    order = sorted(batches, reverse=True)
    label = "-".join(str(b) for b in batches)
    dst = job.out_dir / bmodel_name(name, label, chip, quantize)
    srcs = [str(job.out_dir / bmodel_name(name, b, chip, quantize)) for b in order]
    job.log(f"[compile] model_tool --combine ({', '.join(map(str, order))}) -> {dst}")
    t_c = run_tool(combine_args(srcs, str(dst)), work_root, job.venv, "combine.log")
    info = bmodel_info(dst, job.venv)
    side = {
        "bmodel": dst.name, "batch": order, "network": info["networks"][0]["name"], **job.common,
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
    _copy_projection(job.onnx_path, dst, side)
    _write_json(Path(str(dst) + ".json"), side)
    job.log(f"[compile] wrote {dst} ({side['bmodel_bytes'] / 1e6:.1f} MB)")
    return side


def _mixed_table(cd: Path, mlir: str, name: str, chip: str, cali_table: str, given, used: Sequence[str],
                 calib_src, mixed_cos: float, venv, log: Callable[[str], None],
                 is_text: bool = False, pre_qtable: str | None = None) -> tuple[str, dict]:
    """The MIXED quantize table: ``given`` (checked against the MLIR's layer names; its record
    ``<given>.json`` carried over when there is one) or found now by TPU-MLIR's fast_search.
    Returns its path and the record for the sidecar."""
    names = mlir_layer_names((cd / mlir).read_text(errors="replace"))
    if given:
        layers = [n for n, _ in parse_quantize_table(Path(given).read_text(errors="replace"))]
        unknown = [n for n in layers if n not in names]
        if not layers or unknown:
            raise ValueError(f"--quantize-table {given}: " + (f"layer {unknown[0]!r} is not in this model's MLIR"
                             if unknown else "no 'LAYER MODE' line") + " (use a table found for this ONNX)")
        try:
            record = json.loads(Path(str(given) + ".json").read_text())
        except (OSError, ValueError):
            record = {}
        record.update({"reused_from": str(Path(given).resolve()), "f16_layers": len(layers), "layers": layers})
        record.setdefault("found_by", "unknown (table given with --quantize-table, no record beside it)")
        log(f"[compile] {name}: reusing quantize table {given} ({len(layers)} layers kept in F16)")
        return str(given), record
    count = min(len(used), MIXED_SEARCH_MAX_IMAGES)
    unit = "captions" if is_text else "photos"
    qtable = f"{name}_qtable"
    log(f"[compile] {name}: searching the layers to keep in F16 (TPU-MLIR run_calibration --search "
        f"{MIXED_SEARCH}, target output cosine {mixed_cos}, {count} {unit}, MLIR interpreter)")
    t = run_tool(search_args(mlir, "data", count, Path(cali_table).name, qtable, mixed_cos, chip, pre_qtable),
                 cd, venv, "search_qtable.log")
    text = "\n".join(p.read_text(errors="replace") for p in (cd / "Search_Qtable", cd / "search_qtable.log")
                     if p.is_file())
    found = parse_search_log(text)
    layers = ([n for n, _ in parse_quantize_table((cd / qtable).read_text(errors="replace"))]
              if (cd / qtable).is_file() else [])
    if found["int8_already_meets_target"] or not layers:
        raise ValueError(f"--quantize MIXED: the search found nothing to keep in F16 (all-INT8 output cosine "
                         f"{found['int8_cos']} on {count} calibration {unit}, target --mixed-cos {mixed_cos}): "
                         "use --quantize INT8, or raise --mixed-cos")
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise CompileError(f"the search's quantize table names {unknown[0]!r}, not a layer of {mlir}")
    header = (f"# clip-pipeline compile --quantize MIXED: layers kept in F16, found by TPU-MLIR run_calibration "
              f"--search {MIXED_SEARCH} --expected_cos {mixed_cos} on {count} {unit} of {calib_src}\n"
              f"# MLIR-interpreter output cosine vs F32: all-INT8 {found['int8_cos']}, this table "
              f"{found['mixed_cos']}\n")
    (cd / qtable).write_text(header + (cd / qtable).read_text(errors="replace"))
    record = {
        "found_by": f"TPU-MLIR run_calibration --search {MIXED_SEARCH} (sensitivity search on the MLIR "
                    "interpreter: op types whose INT8 costs output cosine, then the layers of those types "
                    "ranked by the cosine lost when only that layer is INT8; the worst 5 per round kept in F16)",
        "target_cos": float(mixed_cos), ("search_texts" if is_text else "search_images"): count,
        ("texts_file" if is_text else "images_dir"): str(Path(calib_src).resolve()), "search_seconds": round(t, 2),
        "f16_layers": len(layers), "layers": layers,
        "mlir_cos_all_int8": found["int8_cos"], "mlir_cos_mixed": found["mixed_cos"],
        "cos_kind": f"MLIR interpreter (INT8/mixed lowering) vs the F32 MLIR on the search {unit}; "
                    "not the simulator: check the bmodel with `clip-pipeline verify BMODEL "
                    + ("--texts CAPTIONS`" if is_text else "--images PHOTOS`"),
        "sensitive_op_types": found["sensitive_op_types"],
        "layer_loss_when_only_it_is_int8": found["layer_loss_when_only_it_is_int8"],
    }
    log(f"[compile] {name}: {len(layers)} layers kept in F16 ({t:.1f} s search; MLIR cosine all-INT8 "
        f"{found['int8_cos']} -> mixed {found['mixed_cos']})")
    return str(cd / qtable), record

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
    if quantize == "MIXED":
        try:
            out["int8_estimate"] = json.loads((out_dir / (bmodel_name(name, batch, chip, "INT8") + ".json"))
                                              .read_text()).get("estimate")
        except (OSError, ValueError):
            out["int8_estimate"] = None
    return out


def _onnx_input_name(onnx_path) -> str:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def _onnx_input_dtype(onnx_path) -> str:
    """numpy dtype name of the ONNX's (first non-initializer) input."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    return str(tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))


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
