"""`clip-pipeline index OUT`: build a faiss index over a run's embeddings (pipeline/query/index.py)."""

from __future__ import annotations

import json
import os

import click

from pipeline.config import ConfigError
from pipeline.query.index import AUTO_FLAT_MAX_ROWS, DEFAULT_NPROBE, RECALL_K, build_index, index_dir


@click.command("index", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("out", type=click.Path())
@click.option("--kind", type=click.Choice(["auto", "flat", "ivf-pq"]), default="auto", show_default=True,
              help=f"flat: exact (IndexFlatIP, all vectors in memory); ivf-pq: approximate, dim/16 bytes per "
                   f"vector; auto: flat up to {AUTO_FLAT_MAX_ROWS:,} rows, ivf-pq above.")
@click.option("--index-dir", "where", metavar="DIR", default=None, help="Where to write the index (default: OUT/index).")
@click.option("--nprobe", type=click.IntRange(min=1), default=DEFAULT_NPROBE, show_default=True,
              help="ivf-pq: inverted lists visited per query (recorded; `search --nprobe` overrides it).")
@click.option("--nlist", type=click.IntRange(min=1), default=None,
              help="ivf-pq: inverted lists (default: sqrt(rows), at most rows/39).")
@click.option("--json", "as_json", is_flag=True, help="Print index.json.")
def index_cmd(out, kind, where, nprobe, nlist, as_json) -> None:
    """Build a faiss index over OUT's embeddings (needs the [index] extra: faiss-cpu).

    Prints the recall@10 of the index against the exact scan, measured on sample rows of OUT.
    Search it with `clip-pipeline search OUT --index ...`. Exit status: 0 built; 2 bad usage.
    """
    import sys

    try:
        if not os.path.isdir(out):
            raise ConfigError(f"{out} is not a directory: give the output directory of a run")
        info = build_index(out, kind, where, nprobe=nprobe, nlist=nlist, log=lambda m: click.echo(m, err=True))
    except (ConfigError, FileNotFoundError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    d = index_dir(out, where)
    click.echo(f"Built {info['factory']} over {info['rows']:,} x {info['dim']} vectors in {info['build_s']:.2f}s "
               f"into {d}")
    if info.get("rerank_factor"):
        click.echo(f"recall@{RECALL_K} of the codes alone: {info['recall_at_10_codes_only']:.3f}; with the "
                   f"{info['rerank_factor']} x k candidates re-scored exactly (what search --index does):")
    click.echo(f"recall@{RECALL_K} vs exact search: {info['recall_at_10']:.3f} ({info['recall_queries']} sample rows "
               f"of OUT as queries" + (f", nprobe {info['nprobe']})" if info.get("nprobe") else ")"))
    if info["run_status"] != "complete":
        click.echo(f"note: {out} is not complete (status: {info['run_status']}); the index covers its "
                   f"{len(info['shards'])} completed shards. Rebuild it when the run is complete.", err=True)
    if info["synthetic_weights"]:
        click.echo("note: OUT was made with SYNTHETIC random weights: neighbours carry no meaning.", err=True)
COMMANDS = [index_cmd]
