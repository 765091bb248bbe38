"""`clip-pipeline inspect OUT`: what a run directory holds, and (--verify) whether it is intact.

Exit status: 0 the run is complete (and, with --verify, every check passed); 3 the run is not
complete (interrupted, aborted or still running: run the same command again to resume it);
1 --verify found a problem (each is listed); 2 OUT is not a clip-pipeline run directory.
"""

from __future__ import annotations

import json
import sys

import click

from pipeline.query.inspection import NotARun, format_summary, summarize, verify

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


@click.command("inspect", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--verify", "do_verify", is_flag=True,
              help="Re-read every shard: sizes and CRC-32s recorded at write time, shapes, dtype, finiteness, norms, "
                   "paths vs the listing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (and problems) as JSON.")
def inspect_cmd(out: str, do_verify: bool, as_json: bool) -> None:
    """Show what the run in OUT holds: counts, shards, failures by reason, model, completeness.

    Exit status: 0 complete (and intact with --verify); 1 --verify found problems; 2 OUT is not
    a run directory; 3 the run is not complete (run the same command again to resume it).
    """
    try:
        s = summarize(out)
        problems = verify(out) if do_verify else None
    except NotARun as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if as_json:
        click.echo(json.dumps({**s, "verified": None if problems is None else not problems,
                               "problems": problems}, indent=2))
    else:
        click.echo(format_summary(s))
        if problems is not None:
            if problems:
                click.echo(f"verify:   {len(problems)} problem(s):")
                for p in problems:
                    click.echo(f"  - {p}")
            else:
                click.echo(f"verify:   OK ({s['shards']['complete']} shards re-read: shapes, dtype, finite, "
                           f"{'norms, ' if s['normalized'] else ''}paths match the listing)")
    if problems:
        sys.exit(EXIT_PROBLEMS)
    sys.exit(EXIT_OK if s["complete"] else EXIT_INCOMPLETE)
COMMANDS = [inspect_cmd]
