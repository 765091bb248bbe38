"""Text-side commands: fetch-vocab, tokenize, embed-text, classify."""

from __future__ import annotations

import json

import click

from pipeline.backends import NAMES as BACKEND_NAMES
from pipeline.commands import CONTEXT, fail


@click.command("fetch-vocab", context_settings=CONTEXT)
@click.option("--wheel", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Take the file from this open_clip_torch wheel instead of downloading it (offline machines).")
@click.option("--dest", type=click.Path(dir_okay=False), default=None,
              help="Where to write it (default: the package data directory, or ~/.cache/clip-pipeline if read-only).")
def fetch_vocab_cmd(wheel, dest) -> None:
    """Fetch CLIP's tokenizer vocab (bpe_simple_vocab_16e6.txt.gz) and check its sha256.

    It is taken from the open_clip_torch wheel (`pip download --no-deps`: no torch). `pip install`
    of this project does this already; run it by hand after an offline install.
    """
    import os

    from pipeline.text import vocab

    if dest is None:
        data_dir = vocab.PACKAGE_DATA.parent
        writable = os.access(data_dir if data_dir.exists() else data_dir.parent, os.W_OK)
        dest = vocab.PACKAGE_DATA if writable else vocab.user_cache_path()
    try:
        path = vocab.fetch(dest, wheel=wheel)
    except vocab.VocabError as exc:
        fail(str(exc))
    click.echo(f"CLIP vocab ready: {path} (sha256 {vocab.VOCAB_SHA256[:12]}... checked)")


@click.command("tokenize", context_settings=CONTEXT)
@click.argument("texts", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt.")
def tokenize_cmd(texts, as_json) -> None:
    """Show CLIP's token ids for each TEXT (sot ... eot, without the zero padding)."""
    from pipeline.text.tokenizer import get_tokenizer
    from pipeline.text.vocab import VocabError

    try:
        tok = get_tokenizer()
    except VocabError as exc:
        fail(str(exc))
    res = tok(list(texts))
    for i, text in enumerate(texts):
        n = int(min(res.lengths[i], res.context_length))
        ids = res.ids[i, :n].tolist()
        if as_json:
            click.echo(json.dumps({"text": text, "ids": ids, "tokens": int(res.lengths[i]),
                                   "truncated": bool(res.lengths[i] > res.context_length)}, ensure_ascii=False))
        else:
            note = f"  (truncated from {res.lengths[i]} tokens)" if res.lengths[i] > res.context_length else ""
            click.echo(" ".join(map(str, ids)) + note)


def _backend_options(f):
    f = click.option("--backend", type=click.Choice(BACKEND_NAMES), default="cpu", show_default=True,
                     help="cpu: onnxruntime (ONNX); openvino: OpenVINO on the CPU (ONNX, --precision); sail: a text "
                          "bmodel on a SOPHON chip; sim: a text bmodel on the BM1684X simulator (slow); fake: a "
                          "deterministic stand-in for tests.")(f)
    f = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
                     help="openvino: inference precision (auto = bf16 where the CPU has native bf16, else fp32; bf16 "
                          "is refused where it would be emulated).")(f)
    f = click.option("--device", default="0", show_default=True, help="sail: the chip's dev_id.")(f)
    f = click.option("--threads", type=int, default=None, help="cpu: intra-op threads (default: usable cores).")(f)
    f = click.option("--batch-size", type=int, default=32, show_default=True,
                     help="Prompts per inference call (a fixed-batch bmodel uses its own).")(f)
    f = click.option("--text-model", type=click.Path(dir_okay=False), default=None,
                     help="Text tower (ONNX for cpu, bmodel for sail), either form; default: the one paired with the "
                          "image run.")(f)
    f = click.option("--text-projection", type=click.Path(dir_okay=False, exists=True), default=None,
                     help="Projection .npy for a states-form text model (default: found beside the model).")(f)
    f = click.option("--assume-paired", is_flag=True,
                     help="Accept a text model whose pairing with the image model cannot be checked (recorded as asserted).")(f)
    return f


def _encoder(text_model, backend, device, threads, batch_size, projection, precision="auto"):
    import os

    from pipeline.text.embed import TextEncoder

    threads = threads or len(os.sched_getaffinity(0))
    return TextEncoder(text_model, backend=backend, device=device, threads=threads, batch_size=batch_size,
                       projection=projection, precision=precision)


def _warn_synthetic(what: str) -> None:
    click.echo(f"WARNING: {what} SYNTHETIC random weights: these results carry no meaning. "
               "Use real CLIP weights for real use (scripts/download.sh).", err=True)


def _default_text_model(log) -> str:
    """No image run, no --text-model: the synthetic text tower paired with the default image model."""
    from pipeline.model.modelgen import clip_model_id
    from pipeline.text.embed import _build_synthetic_text, synthetic_text_path

    cm = clip_model_id("vit-b32", 0, "quickgelu")
    path = synthetic_text_path("models/clip-vit-b32-synthetic.onnx", cm)
    if not path.exists():
        _build_synthetic_text(path, cm, log)
    return str(path)


@click.command("embed-text", context_settings=CONTEXT)
@click.option("-t", "--text", "texts", multiple=True, metavar="TEXT", help="A prompt (repeatable).")
@click.option("-f", "--text-file", type=click.Path(dir_okay=False), default=None,
              help="A UTF-8 file with one prompt per line.")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Output directory: embeddings.npy, prompts.jsonl, manifest.json.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="An image output: use (and check) the text model paired with its image model.")
@_backend_options
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--no-normalize", is_flag=True, help="Write raw projected embeddings (default: L2-normalised, like image output).")
@click.option("--no-truncate", is_flag=True,
              help="A prompt longer than 77 tokens is an error (default: truncated, with a warning).")
def embed_text_cmd(texts, text_file, output, run_dir, backend, precision, device, threads, batch_size, text_model,
                   text_projection, assume_paired, dtype, no_normalize, no_truncate) -> None:
    """Embed prompts with CLIP's text tower: OUTPUT/embeddings.npy + prompts.jsonl + manifest.json.

    Without --text-model or --run, the synthetic ViT-B/32 text tower that pairs with the default
    image model is used (built on first use; SYNTHETIC weights, as the default image model).
    """
    from pathlib import Path

    from pipeline.text import prompts as pr
    from pipeline.text.embed import TextModelError, paired_text_model
    from pipeline.text.outputs import write_text_output
    from pipeline.text.tokenizer import TokenizerError, get_tokenizer
    from pipeline.text.vocab import VocabError

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    try:
        tok = get_tokenizer()
        items = pr.from_options(texts, text_file)
        pr.check_not_empty(items, tok.clean)
        pairing = None
        if run_dir:
            p = paired_text_model(run_dir, text_model, assume_paired=assume_paired, log=log)
            text_model, pairing = p.path or None, p.as_dict() | {"image_run": str(Path(run_dir).resolve())}
            if p.clip_model == "fake":
                backend = "fake"
        elif text_model is None and backend != "fake":
            text_model = _default_text_model(log)
        enc = _encoder(text_model, backend, device, threads, batch_size, text_projection, precision)
        res = enc.embed([it.text for it in items], normalize=not no_normalize, truncate=not no_truncate)
        ident = enc.identity()
        if ident.get("synthetic"):
            _warn_synthetic(f"text model {ident.get('path') or backend} has")
        cut = res.tokens.truncated
        if cut:
            shown = ", ".join(f"{items[i].source} ({res.tokens.lengths[i]} tokens)" for i in cut[:5])
            more = f" and {len(cut) - 5} more" if len(cut) > 5 else ""
            log(f"warning: {len(cut)} of {len(items)} prompts are longer than 77 tokens and were truncated "
                f"(end-of-text kept last): {shown}{more}; recorded in prompts.jsonl, --no-truncate makes this an error")
        write_text_output(Path(output), res.embeddings, items, res.tokens, ident, tok.info(), not no_normalize, dtype,
                          backend, pairing)
    except (pr.PromptError, TextModelError, TokenizerError, VocabError, ValueError) as exc:
        fail(str(exc))
    note = " — SYNTHETIC weights" if ident.get("synthetic") else ""
    click.echo(f"wrote {len(items)} text embeddings [{len(items)}, {enc.dim}] to {output}{note}")


@click.command("classify", context_settings=CONTEXT)
@click.argument("run_dir", metavar="OUT", type=click.Path(file_okay=False, exists=True))
@click.option("--labels", required=True, type=click.Path(dir_okay=False), help="Class names, one per line (UTF-8).")
@click.option("--templates", type=click.Path(dir_okay=False), default=None,
              help='Prompt templates, one per line, each with "{}" for the class name (default: "a photo of a {}.").')
@click.option("-k", "--top-k", type=int, default=5, show_default=True)
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Where to write predictions (default: OUT/zeroshot).")
@click.option("--partial", is_flag=True, help="Classify the finished shards of an incomplete run.")
@_backend_options
def classify_cmd(run_dir, labels, templates, top_k, output, partial, backend, precision, device, threads, batch_size,
                 text_model, text_projection, assume_paired) -> None:
    """Zero-shot classify the images of a finished run: top-k labels and probabilities (CSV and JSONL).

    Class embedding = mean of the normalised template embeddings, renormalised; logits = 100 x
    image . class; probabilities = softmax over the classes. Refuses a text model that does not
    belong with the run's image model.
    """
    import hashlib
    import time
    from pathlib import Path

    import numpy as np

    from pipeline.data.rundir import MANIFEST, atomic_write_bytes, atomic_write_json, npy_bytes, software_versions
    from pipeline.output import load_embeddings
    from pipeline.text import outputs as out_mod
    from pipeline.text import prompts as pr
    from pipeline.text.embed import TextModelError, paired_text_model, read_run_manifest
    from pipeline.text.tokenizer import get_tokenizer
    from pipeline.text.vocab import VocabError

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    if top_k < 1:
        fail("--top-k must be >= 1")
    try:
        manifest = read_run_manifest(run_dir)
        if manifest.get("status") != "complete" and not partial:
            fail(f"the run in {run_dir} is not complete (status {manifest.get('status')!r}): finish it "
                  "(run the same command again) or pass --partial")
        tok = get_tokenizer()
        label_items = pr.read_lines(labels, "labels")
        pr.check_not_empty(label_items, tok.clean, "label")
        pr.check_unique(label_items, "label")
        tmpl_items = pr.read_lines(templates, "templates") if templates else [pr.Prompt("a photo of a {}.", "default")]
        pr.check_templates(tmpl_items)
        names = [it.text.strip() for it in label_items]
        tmpls = [it.text for it in tmpl_items]
        pairing = paired_text_model(run_dir, text_model, assume_paired=assume_paired, log=log)
        if pairing.clip_model == "fake":  # a run of the fake image backend: the fake text backend
            backend = "fake"
        enc = _encoder(pairing.path or None, backend, device, threads, batch_size, text_projection, precision)
        img_synth = bool(manifest.get("synthetic_weights") or manifest["model"].get("synthetic"))
        ident = enc.identity()
        synthetic = img_synth or bool(ident.get("synthetic"))
        if synthetic:
            _warn_synthetic("the image model has" if img_synth and not ident.get("synthetic") else
                            "the text model has" if not img_synth else "the image and text models have")
        paths, emb = load_embeddings(run_dir)
        if len(paths) and emb.shape[1] != enc.dim:
            fail(f"image embeddings are {emb.shape[1]}-d but text model {pairing.path} makes {enc.dim}-d: "
                  "they do not belong together")
        truncated: list[str] = []

        def encode(texts: list[str]) -> np.ndarray:
            r = enc.embed(texts, normalize=True)
            truncated.extend(texts[i] for i in r.tokens.truncated)
            return r.embeddings

        classes = out_mod.class_embeddings(encode, names, tmpls)
        if truncated:
            log(f"warning: {len(truncated)} class prompts are longer than 77 tokens and were truncated, "
                f"e.g. {truncated[0][:60]!r}")
        out = Path(output) if output else Path(run_dir) / "zeroshot"
        out_mod.prepare_dir(out, "zeroshot")
        normalized = bool(manifest.get("config", {}).get("output", {}).get("normalize", True))
        n = out_mod.write_predictions(out, paths, out_mod.zero_shot(emb, classes, top_k, normalized), names, top_k)
        atomic_write_bytes(out / "class_embeddings.npy", npy_bytes(classes))
        m = {
            "format": out_mod.ZEROSHOT_FORMAT, "kind": "zeroshot", "status": "complete",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "image_run": {"dir": str(Path(run_dir).resolve()), "status": manifest.get("status"),
                          "model": {k: manifest["model"].get(k) for k in ("path", "sha256", "synthetic", "arch")},
                          "normalized": normalized},
            "text_model": ident, "pairing": pairing.as_dict(), "backend": backend, "tokenizer": tok.info(),
            "labels": {"file": str(labels), "count": len(names),
                       "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()},
            "templates": tmpls, "top_k": min(top_k, len(names)), "logit_scale": out_mod.LOGIT_SCALE,
            "images": n, "synthetic_weights": synthetic, "versions": software_versions(),
        }
        if synthetic:
            m["warning"] = "SYNTHETIC random weights: these predictions carry no meaning"
        atomic_write_json(out / MANIFEST, m)
    except (pr.PromptError, TextModelError, VocabError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    note = " — SYNTHETIC weights: these predictions carry no meaning" if synthetic else ""
    click.echo(f"classified {n} images into {len(names)} classes ({len(tmpls)} templates): {out}/predictions.csv, "
               f"predictions.jsonl{note}")


COMMANDS = [fetch_vocab_cmd, tokenize_cmd, embed_text_cmd, classify_cmd]
