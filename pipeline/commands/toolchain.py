"""Click commands ``compile`` and ``verify`` (registered in the main CLI group; also standalone:
``python -m pipeline.commands.toolchain compile ...``)."""
from __future__ import annotations

import sys

import click

from pipeline.toolchain.env import TpuMlirMissing


def _fail_missing(e: TpuMlirMissing):
    click.echo(str(e), err=True)
    sys.exit(3)


@click.command("compile")
@click.argument("onnx_path", metavar="ONNX", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out-dir", default="models", show_default=True, type=click.Path(file_okay=False),
              help="Where NAME_bm1684x_f16_{B}b.bmodel (+ .json sidecars) go.")
@click.option("-b", "--batch", "batches", type=int, multiple=True, default=(1,), show_default=True,
              help="Static batch size; repeat for several bmodels (--batch 1 --batch 8 ...).")
@click.option("--name", default=None, help="Model/network name (default: ONNX stem, +_u8 when fused).")
@click.option("--fuse-preprocess", is_flag=True,
              help="Fuse CLIP normalisation: the bmodel takes uint8 RGB planar [N,3,224,224].")
@click.option("--combine", is_flag=True, help="Also combine all batch sizes into one multi-stage bmodel.")
@click.option("--validate", is_flag=True,
              help="Let TPU-MLIR compare each step with onnxruntime and run the bmodel on the "
                   "simulator during compile (slow: minutes for ViT-B/32). Default: --skip_validation.")
@click.option("--quantize", default="F16", show_default=True,
              type=click.Choice(["F16", "BF16", "F32", "INT8", "MIXED"], case_sensitive=False),
              help="INT8: TPU-MLIR calibration (run_calibration) on --calib-images (a text encoder: "
                   "--calib-texts), then INT8; MIXED: "
                   "INT8 with the layers whose INT8 hurts the output cosine most kept in F16, found by "
                   "TPU-MLIR's sensitivity search (run_calibration --search fast_search) on those photos. "
                   "Synthetic random weights quantise differently from trained CLIP weights: check with "
                   "`verify BMODEL --images PHOTOS`.")
@click.option("--calib-images", default=None, type=click.Path(exists=True, file_okay=False),
              help="Photos to calibrate INT8/MIXED on (use the images you will embed).")
@click.option("--calib-texts", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A text encoder's calibration data: real captions, one per line (UTF-8), tokenised "
                   "by the project's CLIP tokenizer (use captions like the prompts you will embed).")
@click.option("--calib-count", default=32, show_default=True, type=click.IntRange(min=1),
              help="How many of --calib-images (--calib-texts lines) to calibrate on.")
@click.option("--calib-table", default=None, type=click.Path(exists=True, dir_okay=False),
              help="INT8/MIXED: reuse NAME_bm1684x_cali_table from an earlier compile of the same ONNX "
                   "instead of calibrating again.")
@click.option("--mixed-cos", default=0.999, show_default=True, type=float,
              help="MIXED: the output cosine (MLIR interpreter vs F32, on up to 8 calibration photos) the "
                   "search keeps adding F16 layers for (5 per round, until reached or no gain).")
@click.option("--quantize-table", "quantize_table", default=None, type=click.Path(exists=True, dir_okay=False),
              help="MIXED: reuse NAME_bm1684x_mixed_qtable from an earlier MIXED compile (no search).")
@click.option("--keep-workdir", is_flag=True, help="Keep the temporary TPU-MLIR work directory.")
@click.option("--venv", default=None, help="TPU-MLIR venv (default: $CLIP_PIPELINE_TPU_MLIR_VENV or "
                                            "~/.cache/clip-pipeline/tpu-mlir-venv).")
def compile_cmd(onnx_path, out_dir, batches, name, fuse_preprocess, combine, validate, quantize,
                calib_images, calib_texts, calib_count, calib_table, mixed_cos, quantize_table, keep_workdir, venv):
    """Compile an ONNX CLIP image or text encoder into BM1684X bmodel(s) with TPU-MLIR."""
    from pipeline.toolchain.compile import CompileError, compile_onnx

    try:
        compile_onnx(onnx_path, out_dir, batches, name=name, fuse_preprocess=fuse_preprocess,
                     combine=combine, validate=validate, quantize=quantize.upper(),
                     keep_workdir=keep_workdir, venv=venv, log=click.echo,
                     calib_images=calib_images, calib_count=calib_count, calib_table=calib_table,
                     quantize_table=quantize_table, mixed_cos=mixed_cos, calib_texts=calib_texts)
    except TpuMlirMissing as e:
        _fail_missing(e)
    except (CompileError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@click.command("verify")
@click.argument("bmodel", type=click.Path(exists=True, dir_okay=False))
@click.option("--onnx", "onnx_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Reference ONNX (default: the one recorded in BMODEL.json).")
@click.option("--images", "images_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Also compare on real images (reference CLIP preprocessing).")
@click.option("--max-images", default=64, show_default=True, type=int)
@click.option("--texts", "texts_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Text encoder: also compare on these captions (one per line, UTF-8; the first "
                   "--max-texts), tokenised by the project's tokenizer; embeddings at the end token.")
@click.option("--max-texts", default=64, show_default=True, type=int)
@click.option("-b", "--batch", "batches", type=int, multiple=True,
              help="Only these stages of a multi-stage bmodel (default: all).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--min-cosine", default=None, type=float,
              help="Exit 1 when the minimum row cosine falls below this "
                   "(default: 0.9999; 0.99 for an INT8/MIXED bmodel).")
@click.option("--venv", default=None, help="TPU-MLIR venv (default: $CLIP_PIPELINE_TPU_MLIR_VENV or "
                                            "~/.cache/clip-pipeline/tpu-mlir-venv).")
def verify_cmd(bmodel, onnx_path, images_dir, max_images, texts_file, max_texts, batches, seed, min_cosine, venv):
    """Run BMODEL on the BM1684X simulator and compare it with onnxruntime (slow: seconds per
    forward for a tiny model, minutes for ViT-B/32)."""
    from pipeline.toolchain.compile import CompileError
    from pipeline.toolchain.runner import SimulatorError
    from pipeline.toolchain.verify import verify

    try:
        r = verify(bmodel, onnx_path, seed=seed, images_dir=images_dir, max_images=max_images,
                   batches=batches or None, venv=venv, log=click.echo, texts_file=texts_file,
                   max_texts=max_texts)
    except TpuMlirMissing as e:
        _fail_missing(e)
    except (CompileError, SimulatorError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    quant = _sidecar_quantize(bmodel)
    if min_cosine is None:
        min_cosine = 0.99 if quant in ("INT8", "MIXED") else 0.9999
    if quant in ("INT8", "MIXED"):
        what = "--texts YOUR_CAPTIONS" if r.text else "--images YOUR_PHOTOS"
        click.echo(f"[verify] {quant} bmodel: parity depends on the weights and inputs. Synthetic random "
                   "weights quantise differently from trained CLIP weights: run `clip-pipeline verify "
                   f"BMODEL {what}` with your own model to know yours.")
    ok = r.cos_min >= min_cosine
    click.echo(f"[verify] overall: max_abs_diff={r.max_abs_diff:.6g} cos_min={r.cos_min:.7f} "
               f"-> {'PASS' if ok else 'FAIL'} (min cosine {min_cosine})")
    sys.exit(0 if ok else 1)


def _sidecar_quantize(bmodel) -> str | None:
    import json
    from pathlib import Path

    try:
        return str(json.loads(Path(str(bmodel) + ".json").read_text()).get("quantize", "")).upper() or None
    except (OSError, ValueError, AttributeError):
        return None


COMMANDS = [compile_cmd, verify_cmd]


@click.group()
def main():
    """TPU-MLIR toolchain commands (standalone entry; the project CLI registers the same commands)."""


main.add_command(compile_cmd)
main.add_command(verify_cmd)

if __name__ == "__main__":
    main()
