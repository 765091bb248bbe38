"""`clip-pipeline run`: embed the inputs into an output directory (also --dry-run, --update, --cluster ray)."""

from __future__ import annotations

import sys

import click

from pipeline.commands import CONTEXT, fail, ignore_signals, load_config
from pipeline.config import ConfigError


@click.command(context_settings=CONTEXT)
@click.option("-c", "--config", type=click.Path(dir_okay=False), help="TOML config file (see configs/).")
@click.option("-i", "--input", "inputs", multiple=True, metavar="DIR",
              help="Image directory or file to embed (repeatable); replaces input.paths.")
@click.option("-l", "--list", "input_list", metavar="FILE",
              help="File list (text, one path per line, or .parquet); replaces input.list.")
@click.option("-o", "--output", "output_dir", metavar="DIR", help="Output directory; replaces output.dir.")
@click.option("-d", "--device", "devices", multiple=True, metavar="DEV",
              help="Device (repeatable), e.g. cpu:0, or a dev_id for sail; replaces infer.devices.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override any config key, e.g. --set infer.threads=2 (repeatable; TOML values).")
@click.option("--restart", is_flag=True, help="Delete a previous run in the output directory and start over.")
@click.option("--update", is_flag=True,
              help="Over a finished output: embed only the inputs that are new since (appended as new shards; "
                   "existing rows never change), record the removed ones.")
@click.option("--dry-run", is_flag=True,
              help="Make every check the run makes before it starts (same refusals and exit status), count the "
                   "inputs, show the devices and any existing run, and exit; writes nothing.")
@click.option("--progress", type=click.Choice(["auto", "bar", "log", "none"]), default=None,
              help="Progress display (default: run.progress; bar on a terminal, log lines otherwise).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--cluster", type=click.Choice(["ray"]), default=None,
              help="Run across a Ray cluster (plan, one task per range, merge); see docs/cluster.md. Default: cluster.engine.")
@click.option("--address", default=None, metavar="HOST:PORT",
              help="Ray cluster address for --cluster ray (default: cluster.address, \"auto\").")
def run(config, inputs, input_list, output_dir, devices, sets, restart, update, dry_run, progress, quiet, cluster,
        address) -> None:
    """Embed every image under the input directories into OUTPUT (resumable).

    Exit status: 0 all embedded; 3 completed, some inputs failed (failures.jsonl); 2 bad
    config or usage (incl. unwritable output, or an output made with another model or
    preprocessing: --restart); 4 aborted (no device left, disk full, inputs changed); 130/143
    interrupted by SIGINT/SIGTERM (run the same command again to resume); 1 internal error.
    See docs/robustness.md.
    """
    import signal

    from pipeline.errors import RunFailure
    from pipeline.run.progress import Progress
    from pipeline.run.signals import InterruptedBeforeStart
    from pipeline.run.supervisor import Supervisor

    def early(signum, frame):  # noqa: ARG001 - until the supervisor installs its own (SIGTERM too)
        raise InterruptedBeforeStart(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, early)
    try:
        cfg = load_config(config, inputs, output_dir, sets, devices, input_list)
        if update and restart:
            raise ConfigError("--update and --restart contradict each other: --update keeps the finished run, "
                              "--restart deletes it")
        if update and (cluster or cfg.cluster.engine):
            raise ConfigError("--update runs on this host only: drop --cluster (or cluster.engine) for the update")
        if dry_run:
            _dry_run(cfg, restart)
            return
        if (cluster or cfg.cluster.engine) == "ray":
            from pipeline.cluster.ray_runner import run_on_ray

            code, message = run_on_ray(cfg, address=address, restart=restart,
                                       log=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)))
            if code in (0, 3):
                if not quiet:
                    click.echo(message)
            else:
                click.echo(f"error: {message}", err=True)
            sys.exit(code)
        mode = "none" if quiet else (progress or cfg.run.progress)
        prog = Progress(mode, cfg.run.log_interval_s, quiet=quiet)
        _bf16_hint(cfg, quiet)
        if update:
            from pipeline.run.update import run_update

            result = run_update(cfg, progress=prog, log=prog.message)
        else:
            sup = Supervisor(cfg, restart=restart, progress=prog)
            sup.signals.keep = True  # signals after the manifest is written change nothing
            result = sup.run()
    except ConfigError as exc:
        fail(str(exc), 2)
    except RunFailure as exc:  # RunAborted, a full disk found at start
        fail(str(exc), 4)
    except KeyboardInterrupt as exc:  # SIGINT/SIGTERM while the run was being prepared (or before)
        term = getattr(exc, "signum", signal.SIGINT) == signal.SIGTERM
        fail(f"interrupted by {'SIGTERM' if term else 'SIGINT'} before this run started any work; the output holds "
             "what earlier runs left. Run the same command again to resume.", 143 if term else 130)
    ignore_signals()
    if result.exit_code in (0, 3):
        if not quiet:
            click.echo(result.message)
    else:
        click.echo(f"error: {result.message}" if result.exit_code == 4 else result.message, err=True)
    sys.exit(result.exit_code)


def _dry_run(cfg, restart: bool = False) -> None:
    """Every check the real run makes before it builds a model or starts a worker (pipeline/run/preflight.py:
    same refusals, same exit status), then what the run would do. Writes nothing."""
    from pipeline.data.listing import config_inputs
    from pipeline.run import preflight

    pf = preflight.check(cfg, restart=restart)
    warnings: list[str] = list(pf.warnings)
    n = sum(1 for _ in config_inputs(cfg, warnings.append))
    if pf.changes:
        warnings.append(preflight.changes_note(pf.changes, pf.manifest.get("status") == "complete"))
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"config: {cfg.source} (valid)")
    click.echo(f"inputs: {n} files under {', '.join(cfg.input.paths)}")
    click.echo(f"backend: {cfg.infer.backend}, devices: {', '.join(map(str, pf.devices))}")
    if cfg.infer.backend == "openvino":
        from pipeline.backends.openvino import resolve_precision

        p = resolve_precision(cfg.openvino.precision)
        click.echo(f"precision: {p.resolved} (openvino.precision = \"{p.requested}\": {p.reason})")
        if p.resolved == "int8":
            from pipeline.backends.openvino import calibration_of

            cal = calibration_of(cfg)
            click.echo(f"calibration: {len(cal.files)} of the {cal.available} photos in {cal.directory} "
                       f"(sha256 {cal.digest[:16]}; quantised once before the workers start, then cached)")
    _bf16_hint(cfg)
    click.echo(f"model: {cfg.model.path}" + ("" if _exists(cfg.model.path) else
                                            f" (missing; will be built: {cfg.model.build})" if cfg.model.build else " (missing)"))
    click.echo(f"output: {cfg.output.dir}")
    if pf.manifest is not None:
        if restart or cfg.output.on_existing == "restart":
            action = "--restart deletes it and starts over"
        elif pf.manifest.get("status") == "complete":
            action = "the run re-checks the inputs and has nothing left to embed"
        else:
            action = "the run resumes it"
        click.echo(f"existing run in {cfg.output.dir}: {pf.state}; {action}")
    if pf.changes:
        click.echo(f"inputs changed: {pf.changes.summary()}")


def _bf16_hint(cfg, quiet: bool = False) -> None:
    from pipeline.backends.openvino import bf16_hint

    hint = None if quiet else bf16_hint(cfg)
    if hint:
        click.echo(hint, err=True)


def _exists(p: str) -> bool:
    import os

    return os.path.exists(p)


COMMANDS = [run]
