"""`clip-pipeline report OUT`: where the time went, from OUT/report.json (drawing: pipeline/query/report.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.query.inspection import NotARun
from pipeline.query.report import NoReport, html_report, load_report, png_report, runs_of, runs_table, text_report, working_run


@click.command("report", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path())
@click.option("--html", "html_path", is_flag=False, flag_value="", default=None, metavar="[FILE]",
              help="Write an HTML page with charts (default FILE: OUT/report.html).")
@click.option("--png", "png_path", is_flag=False, flag_value="", default=None, metavar="[FILE]",
              help="Write the charts as a PNG image (default FILE: OUT/report.png).")
@click.option("--run", "run_no", type=int, default=None,
              help="Draw this run (1 = the first over OUT; see --all). Default: the run that did the most work.")
@click.option("--all", "show_all", is_flag=True, help="List every run recorded over OUT, then the chosen one.")
def report_cmd(out: str, html_path: str | None, png_path: str | None, run_no: int | None, show_all: bool) -> None:
    """Show where the time of the run in OUT went (from OUT/report.json).

    report.json keeps every run over OUT (a resume, a no-op re-run); this draws the run that did
    the most work unless --run N says otherwise. Prints a summary; --html / --png also draw
    throughput, per-stage utilisation and queue fill over time. Exit status 2 when OUT is not a
    run or has no report.json yet.
    """
    try:
        runs = runs_of(load_report(out))
    except (NotARun, NoReport) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if run_no is not None and not 1 <= run_no <= len(runs):
        click.echo(f"error: --run {run_no}: {out} records runs 1 to {len(runs)} (see --all)", err=True)
        sys.exit(2)
    chosen = run_no - 1 if run_no is not None else working_run(runs)
    rep = runs[chosen]
    if show_all or len(runs) > 1:
        click.echo(runs_table(runs, chosen) if show_all else
                   f"run {chosen + 1} of {len(runs)} over this directory (the one that did the most work; --all lists them)")
    click.echo(text_report(rep))
    title = str(Path(out).resolve())
    if html_path is not None:
        dst = Path(html_path or Path(out) / "report.html")
        dst.write_text(html_report(rep, title), encoding="utf-8")
        click.echo(f"wrote {dst}")
    if png_path is not None:
        dst = Path(png_path or Path(out) / "report.png")
        png_report(rep, dst, title)
        click.echo(f"wrote {dst}")
COMMANDS = [report_cmd]
