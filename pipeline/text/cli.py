"""Text-side commands: fetch-vocab, tokenize (embed-text and classify join them here)."""

from __future__ import annotations

import json
import sys

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


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
        _fail(str(exc))
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
        _fail(str(exc))
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
