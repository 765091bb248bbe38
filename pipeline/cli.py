"""The `clip-pipeline` command line (click)."""

from __future__ import annotations

import json
import sys

import click

from pipeline.config import ConfigError
from pipeline.errors import RunFailure

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _ignore_signals() -> None:
    """The result is decided: a SIGINT/SIGTERM now must not turn it into a traceback or a death by
    signal (interpreter shutdown puts Python-level handlers back to the default; ignored stays ignored)."""
    import signal

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def _fail(message: str, code: int = 2) -> None:
    _ignore_signals()
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="clip-pipeline")
def cli() -> None:
    """Turn image directories into CLIP ViT-B/32 image embeddings, fast, on CPUs and SOPHON TPUs.

    Start with `clip-pipeline run --config configs/cpu.toml`, which embeds the bundled sample
    images with a synthetic model (random weights, built on first use).
    """


def _load(config, inputs, output_dir, sets, devices=(), input_list=None):
    from pipeline import config as cfgmod

    if input_list:
        sets = (*sets, f"input.list={json.dumps(input_list)}")
    return cfgmod.load(config, sets, input_paths=inputs, output_dir=output_dir, devices=devices)


@cli.command(context_settings=CONTEXT)
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

    from pipeline.progress import Progress
    from pipeline.supervisor import InterruptedBeforeStart, RunAborted, Supervisor

    def early(signum, frame):  # noqa: ARG001 - until the supervisor installs its own (SIGTERM too)
        raise InterruptedBeforeStart(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, early)
    try:
        cfg = _load(config, inputs, output_dir, sets, devices, input_list)
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
        if update:
            from pipeline.update import run_update

            result = run_update(cfg, progress=prog, log=prog.message)
        else:
            sup = Supervisor(cfg, restart=restart, progress=prog)
            sup.keep_handlers = True  # signals after the manifest is written change nothing
            result = sup.run()
    except ConfigError as exc:
        _fail(str(exc), 2)
    except (RunAborted, RunFailure) as exc:
        _fail(str(exc), 4)
    except KeyboardInterrupt as exc:  # SIGINT/SIGTERM while the run was being prepared (or before)
        import signal as _signal

        term = getattr(exc, "signum", _signal.SIGINT) == _signal.SIGTERM
        _fail(f"interrupted by {'SIGTERM' if term else 'SIGINT'} before this run started any work; the output holds "
              "what earlier runs left. Run the same command again to resume.", 143 if term else 130)
    _ignore_signals()
    if result.exit_code in (0, 3):
        if not quiet:
            click.echo(result.message)
    else:
        click.echo(f"error: {result.message}" if result.exit_code == 4 else result.message, err=True)
    sys.exit(result.exit_code)


def _dry_run(cfg, restart: bool = False) -> None:
    """Every check the real run makes before it builds a model or starts a worker (pipeline/preflight.py:
    same refusals, same exit status), then what the run would do. Writes nothing."""
    from pipeline import preflight
    from stages.source import config_inputs

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


def _exists(p: str) -> bool:
    import os

    return os.path.exists(p)


@cli.command("build-model", context_settings=CONTEXT)
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
    from pipeline.modelgen import build_clip_image_onnx, quantize_int8

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


@cli.command(context_settings=CONTEXT)
def devices() -> None:
    """List what each backend can see, and why a backend is unavailable."""
    from pipeline.backends import BACKENDS, get_backend

    for name in BACKENDS:
        try:
            info = get_backend(name).probe()
        except ModuleNotFoundError as exc:
            if (exc.name or "").startswith("pipeline.backends"):  # backend module not in this build
                reason = f"not included in this build ({exc.name.replace('.', '/')}.py is missing)"
            else:
                reason = f"Python module {exc.name} is not installed"
            info = {"available": False, "devices": [], "reason": reason}
        except ImportError as exc:
            info = {"available": False, "devices": [], "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a probe must never crash the listing
            info = {"available": False, "devices": [], "reason": f"{type(exc).__name__}: {exc}"}
        state = "available" if info["available"] else "unavailable"
        devs = ", ".join(map(str, info.get("devices", []))) or "-"
        click.echo(f"{name:5s} {state:11s} devices: {devs}  ({info.get('reason', '')})")


from pipeline.bench import bench as bench_cmd  # noqa: E402 - commands live in their own modules
from pipeline.cluster.cli import merge_cmd, plan_cmd, run_range_cmd, status_cmd  # noqa: E402
from pipeline.evaluate import eval_group  # noqa: E402
from pipeline.index import index_cmd  # noqa: E402
from pipeline.inspection import inspect_cmd  # noqa: E402
from pipeline.report import report_cmd  # noqa: E402
from pipeline.search_cmd import search_cmd  # noqa: E402
from pipeline.text.cli import classify_cmd, embed_text_cmd, fetch_vocab_cmd, tokenize_cmd  # noqa: E402
from pipeline.toolchain.cli import compile_cmd, verify_cmd  # noqa: E402

cli.add_command(inspect_cmd)
cli.add_command(report_cmd)
cli.add_command(search_cmd)
cli.add_command(index_cmd)
cli.add_command(eval_group)
cli.add_command(bench_cmd)
cli.add_command(compile_cmd)
cli.add_command(verify_cmd)
cli.add_command(fetch_vocab_cmd)
cli.add_command(tokenize_cmd)
cli.add_command(embed_text_cmd)
cli.add_command(classify_cmd)
cli.add_command(plan_cmd)
cli.add_command(run_range_cmd)
cli.add_command(merge_cmd)
cli.add_command(status_cmd)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
