"""`clip-pipeline build-model`: a CLIP image or text tower with synthetic weights, as ONNX."""

from __future__ import annotations

import click

from pipeline.commands import CONTEXT


@click.command("build-model", context_settings=CONTEXT)
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--tower", type=click.Choice(["image", "text"]), default="image", show_default=True,
              help="image: the vision transformer; text: the text transformer (ids -> embedding), see --text-form.")
@click.option("--arch", type=click.Choice(["vit-b32", "tiny", "tiny-336"]), default="vit-b32", show_default=True,
              help="tiny-336: a small test model with 336x336 input and 768-d embeddings.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--act", type=click.Choice(["quickgelu", "gelu"]), default="quickgelu", show_default=True,
              help="MLP activation: quickgelu (OpenAI's weights) or gelu (most open_clip/LAION checkpoints).")
@click.option("--input-kind", type=click.Choice(["float", "uint8"]), default="float", show_default=True,
              help="Image tower: float = CLIP-normalised NCHW input; uint8 = NHWC pixels, normalisation folded into conv1.")
@click.option("--text-form", type=click.Choice(["projected", "states"]), default="projected", show_default=True,
              help="Text tower: projected = ids -> [B,512]; states = ids -> ln_final states [B,77,width] + "
                   "<stem>.text_projection.npy (Sophgo's split: gather and projection on the host).")
@click.option("--int8", "int8", is_flag=True, help="Also write an int8 dynamically quantised copy (PATH with .int8.onnx).")
def build_model(path, tower, arch, seed, act, input_kind, text_form, int8) -> None:
    """Write a CLIP image or text tower with SYNTHETIC random weights as ONNX (no download, no torch).

    The embeddings of a synthetic model carry no meaning; use it to test and benchmark. An image
    and a text tower built with the same --arch, --seed and --act belong together (classify).
    """
    from pipeline.model.modelgen import build_clip_image_onnx, quantize_int8

    if tower == "text":
        from pipeline.text.model import build_clip_text_onnx

        info = build_clip_text_onnx(path, arch=arch, seed=seed, form=text_form, act=act)
        extra = f" + {info['projection']}" if text_form == "states" else ""
        click.echo(f"wrote {path}{extra}: CLIP text tower {arch} ({text_form}, {act}), {info['params']:,} parameters, "
                   f"input text int32 [batch,77] -> {info['output_name']} {info['output_shape']} — "
                   f"SYNTHETIC random weights (seed {seed}).")
    else:
        info = build_clip_image_onnx(path, arch=arch, seed=seed, input_kind=input_kind, act=act)
        click.echo(f"wrote {path}: {arch} ({act}), {info['params']:,} parameters, input {info['input_name']} "
                   f"{info['input_shape']} — SYNTHETIC random weights (seed {seed}).")
    if int8:
        dst = str(path).removesuffix(".onnx") + ".int8.onnx"
        quantize_int8(path, dst)
        click.echo(f"wrote {dst} (int8 dynamic quantisation of MatMul/Gemm weights).")


COMMANDS = [build_model]
