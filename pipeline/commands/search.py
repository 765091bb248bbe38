"""`clip-pipeline search OUT`: queries (images through OUT's pipeline, or vectors), exact or indexed."""

from __future__ import annotations

import json
import os
import sys

import click
import numpy as np

from pipeline.backends import NAMES as BACKEND_NAMES
from pipeline.config import ConfigError
from pipeline.query.index import search_index as index_search
from pipeline.query.search import SearchResult, search_out
from pipeline.run.featurize import embed_inputs, manifest_of, query_config
from pipeline.text.embed import TextModelError, embed_texts
from pipeline.text.tokenizer import TokenizerError
from pipeline.text.vocab import VocabError

# -- queries -----------------------------------------------------------------------------------

def load_query_vectors(path: str, dim: int | None) -> np.ndarray:
    """Query vectors from a .npy file ([dim] or [q, dim]); a clear error for anything else."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"--vectors {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--vectors {path}: not a readable .npy array ({exc})") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise ConfigError(f"--vectors {path}: expected a numeric [dim] or [queries, dim] array, got {arr.dtype} {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ConfigError(f"--vectors {path}: the vectors have {arr.shape[1]} dimensions, the output's embeddings {dim}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ConfigError(f"--vectors {path}: the array holds NaN or infinite values")
    return arr


def embed_query_images(out: str, images: list[str], *, model: str | None = None, devices: tuple = (),
                       log=None) -> np.ndarray:
    """Embed query images with OUT's model, backend and preprocessing (the normal pipeline)."""
    import tempfile


    for p in images:
        if not os.path.exists(p):
            raise ConfigError(f"query image {p} does not exist (--image)")
        if os.path.isdir(p):
            raise ConfigError(f"query image {p} is a directory; give image files (--image, repeatable)")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"query image {p} cannot be read (permission denied) (--image)")
    cfg, _ = query_config(out, model=model, devices=devices)
    with tempfile.TemporaryDirectory(prefix="clipp-query-") as tmp:
        res = embed_inputs(cfg, list(images), os.path.join(tmp, "out"), quiet=True)
    if res.failures:
        f = res.failures[0]
        raise ConfigError(f"query image {os.fsdecode(f.get('path', '?'))} cannot be used: {f.get('reason')} "
                          f"({f.get('message', '')}); give a readable JPEG/PNG/... image (--image)")
    return res.embeddings


def _print_text(result: SearchResult, labels: list[str]) -> None:
    for label, hits in zip(labels, result.hits, strict=True):
        click.echo(f"# {label}")
        for rank, h in enumerate(hits, 1):
            click.echo(f"{rank:3d}  {h.score:+.4f}  {h.path}")


@click.command("search", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("out", type=click.Path(exists=False))
@click.option("--text", "texts", multiple=True, metavar="TEXT",
              help="Query text (repeatable), embedded with the text tower paired with OUT's image model.")
@click.option("--text-model", metavar="PATH", default=None,
              help="Text tower for --text (default: the one paired with OUT's image model, as `classify` finds it).")
@click.option("--text-backend", type=click.Choice(BACKEND_NAMES), default="cpu", show_default=True,
              help="Where --text queries are embedded.")
@click.option("--text-precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="--text-backend openvino: inference precision (auto = bf16 where the CPU has native bf16).")
@click.option("--image", "images", multiple=True, metavar="PATH",
              help="Query image (repeatable), embedded with OUT's model, backend and preprocessing.")
@click.option("--vectors", metavar="Q.npy", help="Query vectors, [dim] or [queries, dim] (.npy), used as given.")
@click.option("-k", "--top", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Results per query.")
@click.option("--index", "use_index", is_flag=True,
              help="Search the faiss index built by `clip-pipeline index OUT` instead of the exact scan.")
@click.option("--index-file", "index_path", metavar="FILE", default=None,
              help="The index file, when it is not OUT's default (implies --index).")
@click.option("--no-rerank", "no_rerank", is_flag=True,
              help="ivf-pq: rank by the compressed codes alone (default: re-score the candidates exactly from the shards).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="IVF indexes: lists visited per query.")
@click.option("--model", metavar="PATH", help="Model file, when it moved since OUT was made (must be the same model).")
@click.option("-d", "--device", "devices", multiple=True, metavar="DEV", help="Device for embedding queries (default: OUT's).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def search_cmd(out, texts, text_model, text_backend, text_precision,
               images, vectors, k, use_index, index_path, no_rerank, nprobe, model,
               devices, as_json) -> None:
    """Top-k nearest embeddings in OUT to each query, by inner product (cosine for normalised runs).

    Exact by default: a chunked scan of the memory-mapped shards that never loads the whole
    array. A run that is not complete is searched as far as its completed shards go, with a
    note on stderr. Exit status: 0 results printed; 2 bad usage or input.
    """
    def fail(msg: str) -> None:
        click.echo(f"error: {msg}", err=True)
        sys.exit(2)

    if not texts and not images and not vectors:
        fail("give at least one query: --text TEXT, --image PATH (both repeatable) or --vectors Q.npy")
    try:
        if not os.path.isdir(out):
            raise ConfigError(f"{out} is not a directory: give the output directory of a run")
        manifest = manifest_of(out)
        dim = None
        parts, labels = [], []
        if texts:
            parts.append(embed_texts(list(texts), model=text_model, run=out, backend=text_backend,
                                     precision=text_precision))
            labels += [f"text {t!r}" for t in texts]
            dim = parts[-1].shape[1]
        if images:
            parts.append(embed_query_images(out, list(images), model=model, devices=devices))
            labels += [f"image {p}" for p in images]
            dim = parts[-1].shape[1]
        if vectors:
            v = load_query_vectors(vectors, dim)
            parts.append(v)
            labels += [f"vector {i} of {vectors}" for i in range(len(v))]
        queries = np.concatenate(parts)
        if use_index or index_path:
            result = index_search(out, queries, k, index_path, nprobe=nprobe, exact_rerank=not no_rerank)
        else:
            result = search_out(out, queries, k)
    except ConfigError as exc:
        fail(str(exc))
    except (ValueError, FileNotFoundError, TextModelError, TokenizerError, VocabError) as exc:
        fail(str(exc))  # e.g. no tokenizer vocab (an offline install): the one line says what to do
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if manifest.get("synthetic_weights"):
        click.echo("note: OUT was made with SYNTHETIC random weights: the similarities carry no meaning.", err=True)
    if as_json:
        click.echo(json.dumps({
            "out": str(out), "rows_searched": result.rows_searched, "notes": result.notes,
            "exact": not (use_index or index_path),
            "queries": [{"query": lab, "hits": [{"rank": r, "row": h.row, "path": h.path, "score": h.score}
                                                for r, h in enumerate(hits, 1)]}
                        for lab, hits in zip(labels, result.hits, strict=True)],
        }, indent=2))
    else:
        _print_text(result, labels)



COMMANDS = [search_cmd]
