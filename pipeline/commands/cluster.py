"""Commands of the cluster path: plan, run-range, merge, status (Slurm arrays, or by hand)."""

from __future__ import annotations

import json
import os
import sys

import click

from pipeline.commands import CONTEXT, fail
from pipeline.config import ConfigError
from pipeline.data.rundir import RunDir


def config_options(f):
    for opt in reversed([
        click.option("-c", "--config", type=click.Path(dir_okay=False), help="TOML config file (see configs/)."),
        click.option("-i", "--input", "inputs", multiple=True, metavar="DIR",
                     help="Image directory or file (repeatable); replaces input.paths."),
        click.option("-o", "--output", "output_dir", metavar="DIR", help="Output directory; replaces output.dir."),
        click.option("-d", "--device", "devices", multiple=True, metavar="DEV",
                     help="Device (repeatable); replaces infer.devices on this host."),
        click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config key (repeatable)."),
    ]):
        f = opt(f)
    return f


HOST_CONFIG_ENV = "CLIP_PIPELINE_HOST_CONFIG"


def with_host_config(cfg):
    """Apply this host's own settings (a TOML file named by $CLIP_PIPELINE_HOST_CONFIG, e.g. its
    infer.devices or a local copy of the model) on top of the run's config. Anything that changes
    the embeddings is still checked against the plan's fingerprint afterwards."""
    from pipeline import config as cfgmod

    path = os.environ.get(HOST_CONFIG_ENV)
    if not path:
        return cfg
    raw = cfg.to_dict()
    for section, values in cfgmod.load_raw(path).items():
        if not isinstance(values, dict):
            raise ConfigError(f"host config {path} (${HOST_CONFIG_ENV}): [{section}] must be a table")
        raw.setdefault(section, {}).update(values)
    return cfgmod.from_dict(raw, source=f"{cfg.source} + host config {path}")


def load_cfg(config, inputs, output_dir, sets, devices, config_dict=None):
    """The config: from --config (TOML), or else the plan's recorded config (run-range with only
    --output), plus --set / -d overrides."""
    from pipeline import config as cfgmod

    if config_dict:
        raw = json.loads(open(config_dict, "rb").read())
    elif config is None and output_dir and not inputs:
        from pipeline.cluster.plan import load_plan

        raw = json.loads(json.dumps(load_plan(os.path.abspath(output_dir)).record["config"]))
    else:
        return cfgmod.load(config, sets, input_paths=inputs, output_dir=output_dir, devices=devices)
    for a in sets:
        cfgmod.apply_override(raw, a)
    if output_dir:
        raw.setdefault("output", {})["dir"] = output_dir
    if devices:
        raw.setdefault("infer", {})["devices"] = [cfgmod.parse_value(d) for d in devices]
    return cfgmod.from_dict(raw, source=config_dict or "the plan's config")


@click.command("plan", context_settings=CONTEXT)
@config_options
@click.option("--range-shards", type=int, default=None, metavar="N",
              help="Shards per range (default: cluster.range_shards).")
@click.option("--restart", is_flag=True, help="Delete whatever the output directory holds and plan again.")
def plan_cmd(config, inputs, output_dir, devices, sets, range_shards, restart) -> None:
    """List the inputs once into OUTPUT/plan/ and fix the id ranges (Slurm: before the array job).

    Re-planning the same inputs with the same model is a no-op; a different model, preprocessing
    or listing is refused.
    """
    import shutil
    import time

    from pipeline.cluster.plan import make_plan

    try:
        cfg = load_cfg(config, inputs, output_dir, sets, devices)
        if restart and os.path.exists(cfg.output.dir):
            click.echo(f"Deleting {cfg.output.dir} (--restart).", err=True)
            shutil.rmtree(cfg.output.dir)
        t0 = time.monotonic()
        plan, created = make_plan(cfg, range_shards or cfg.cluster.range_shards,
                                  log=lambda m: click.echo(m, err=True))
    except ConfigError as exc:
        fail(str(exc))
    verb = "Planned" if created else "Plan unchanged:"
    click.echo(f"{verb} {plan.n_inputs} inputs in {plan.n_ranges} range(s) of {plan.range_size} "
               f"({plan.record['range_shards']} shards of {plan.shard_size}) in {plan.out} "
               f"[{time.monotonic() - t0:.1f}s]. Array indices: 0-{max(plan.n_ranges - 1, 0)}.")


@click.command("run-range", context_settings=CONTEXT)
@config_options
@click.option("--range", "range_", type=int, default=None, metavar="R",
              help="Range index (default: $SLURM_ARRAY_TASK_ID).")
@click.option("--attempt", default=None, metavar="NAME",
              help="Attempt name (default: host-pid-random); the same name resumes that attempt's shards.")
@click.option("--config-dict", type=click.Path(dir_okay=False), hidden=True)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON line.")
@click.option("--progress", type=click.Choice(["auto", "bar", "log", "none"]), default=None)
def run_range_cmd(config, inputs, output_dir, devices, sets, range_, attempt, config_dict, as_json, progress) -> None:
    """Embed one planned range on this host and commit it (idempotent: a committed range returns at once).

    Without --config the plan's recorded config is used (with --set / -d on top).
    Exit status: 0 committed (by this or an earlier attempt); 2 config or usage error (names the
    host); 4 the local pipeline aborted; 130/143 interrupted.
    """
    from pipeline.cluster.rangerun import RangeFailed, run_range
    from pipeline.run.progress import Progress

    if range_ is None:
        env = os.environ.get("SLURM_ARRAY_TASK_ID", "")
        if not env.isdigit():
            fail("give --range R (or run inside a Slurm array job, which sets SLURM_ARRAY_TASK_ID)")
        range_ = int(env)
    try:
        cfg = with_host_config(load_cfg(config, inputs, output_dir, sets, devices, config_dict))
        prog = Progress(progress or ("none" if as_json else cfg.run.progress), cfg.run.log_interval_s)
        res = run_range(cfg, range_, attempt=attempt, log=lambda m: click.echo(m, err=True), progress=prog)
    except ConfigError as exc:
        fail(str(exc), 2)
    except RangeFailed as exc:
        fail(str(exc), exc.exit_code)
    if as_json:
        click.echo(res.to_json())
    elif res.status == "done":
        click.echo(f"range {range_} was already committed (attempt {res.record.get('attempt')} on "
                   f"{res.record.get('host')}); nothing to do.")
    elif res.status == "lost":
        click.echo(f"range {range_}: another attempt ({res.record.get('attempt')}) committed first; "
                   "this attempt's output was deleted.")
    else:
        click.echo(f"range {range_} committed: {res.record['rows']} embedded, {res.record['failed']} failed "
                   f"(attempt {res.attempt}, {res.timings.get('total_s', 0):.1f}s).")


@click.command("merge", context_settings=CONTEXT)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--keep-attempts", is_flag=True, help="Keep attempt directories no commit refers to.")
def merge_cmd(out, keep_attempts) -> None:
    """Verify every range's commit (checksums), publish the shards, write the manifest last.

    Exit status: 0 merged; 3 merged, some inputs failed (failures.jsonl); 4 ranges missing
    (listed; resubmit them) or a commit does not verify; 2 no plan in OUT.
    """
    from pipeline.cluster.merge import MergeBroken, MergeIncomplete, merge

    try:
        res = merge(out, log=lambda m: click.echo(m, err=True), clean=not keep_attempts)
    except ConfigError as exc:
        fail(str(exc), 2)
    except (MergeIncomplete, MergeBroken) as exc:
        fail(str(exc), 4)
    msg = f"Merged {res.ranges} range(s), {res.shards} shard(s): {res.embedded} of {res.total} embedded into {out}"
    if res.failed:
        click.echo(f"{msg}; {res.failed} failed: see {RunDir(out).failures}.")
        sys.exit(3)
    click.echo(msg + ".")


@click.command("status", context_settings=CONTEXT)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--missing", is_flag=True, help="Print only the uncommitted range indices, as sbatch --array takes them.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_cmd(out, missing, as_json) -> None:
    """Ranges committed and missing in a cluster output directory."""
    from pipeline.cluster.merge import array_spec, status

    try:
        st = status(out)
    except ConfigError as exc:
        fail(str(exc), 2)
    if missing:
        click.echo(array_spec(st["missing"]))
        return
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    click.echo(f"plan {st['run_id'][:12]}: {st['inputs']} inputs, {st['ranges']} range(s) of {st['range_size']}")
    click.echo(f"committed: {st['committed']} of {st['ranges']}" + (", merged" if st["merged"] else ""))
    if st["missing"]:
        click.echo(f"missing: {array_spec(st['missing'])}")
    if st["attempts_without_commit"]:
        click.echo(f"attempts without a commit (running, dead or lost): {', '.join(st['attempts_without_commit'][:20])}")


COMMANDS = [plan_cmd, run_range_cmd, merge_cmd, status_cmd]
