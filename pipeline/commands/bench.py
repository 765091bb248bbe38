"""`clip-pipeline bench`: the command line of pipeline/bench (the cases, their table and JSON)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

from pipeline.bench import SCHEMA
from pipeline.bench.cases import case_cpu, case_dispatch, case_fake, case_memory
from pipeline.bench.corpus import BenchUsageError
from pipeline.bench.sampler import machine_info
from pipeline.bench.table import table


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--case", "cases", multiple=True, type=click.Choice(["cpu", "fake", "memory", "dispatch"]),
              help="Which cases to run (repeatable; default cpu and fake). dispatch: tail and uneven-fleet "
                   "throughput, credit vs round_robin (2 CPU devices if --model exists, 8 fake devices).")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of JPEGs for the cpu case (and the dispatch case's 2 CPU devices), e.g. a copy of "
                   "the 1000-photo corpus docs/performance.md uses; no default: the bench reads no path it was not given.")
@click.option("--model", type=click.Path(dir_okay=False), default="models/clip-vit-b32-synthetic.onnx",
              show_default=True, help="fp32 float-input ONNX model (the baselines always use it).")
@click.option("--pipeline-model", type=click.Path(dir_okay=False), default=None,
              help="Model the pipeline and its ceiling use (e.g. the uint8-input variant); default --model.")
@click.option("--int8-model", type=click.Path(dir_okay=False), default=None,
              help="Also bench this int8 model (ceiling, end to end, cosine vs --model).")
@click.option("--cpu-images", type=int, default=192, show_default=True, help="JPEGs per cpu-case run.")
@click.option("--cpu-lengths", default=None,
              help="Run-length sweep for the cpu case, e.g. 64,192,1000 (JPEGs per run; replaces --cpu-images): "
                   "every length in every repeat, interleaved, so start-up, steady state and tail each show.")
@click.option("--batch", type=int, default=16, show_default=True, help="Batch size (cpu case).")
@click.option("--layout", default="2x1", show_default=True,
              help="cpu pipeline layout: PROCSxTHREADS inference processes x intra-op threads.")
@click.option("--mode", type=click.Choice(["reference", "fast"]), default="fast", show_default=True,
              help="Pipeline preprocess.mode (the baselines always use the reference transform).")
@click.option("--decode-workers", type=int, default=1, show_default=True)
@click.option("--items-per-message", type=int, default=16, show_default=True)
@click.option("--fake-devices", default="1,8", show_default=True, help="Device counts for the fake case.")
@click.option("--fake-seconds", type=float, default=6.0, show_default=True,
              help="Images per fake run = this many seconds at the devices' ceiling.")
@click.option("--fake-decode-workers", type=int, default=1, show_default=True)
@click.option("--fake-items-per-message", type=int, default=32, show_default=True)
@click.option("--fake-overlap", type=click.Choice(["default", "on", "off", "both"]), default="default", show_default=True,
              help="infer.overlap in the fake case: the config default, on, off, or both interleaved run by run.")
@click.option("--memory-sizes", default="1000,10000,100000", show_default=True)
@click.option("--openvino", is_flag=True,
              help="cpu case: also the openvino backend (pip install -e '.[openvino]'): OpenVINO fp32 and bf16 "
                   "ceilings, the pipeline on each, bf16 with ready crops, and a hand-written OpenVINO bf16 loop.")
@click.option("--no-dataloader", is_flag=True, help="cpu case: leave out the DataLoader-style baseline (case 4).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Runs per case (medians reported).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def bench(cases, images, model, pipeline_model, int8_model, cpu_images, cpu_lengths, batch, layout, mode, decode_workers,
          items_per_message, fake_devices, fake_seconds, fake_decode_workers, fake_items_per_message, fake_overlap,
          memory_sizes, openvino, no_dataloader, repeats, json_path, quiet) -> None:
    """Benchmark the pipeline against its model-only ceiling and hand-written baselines.

    Prints a table (and the full results as JSON with --json). See docs/performance.md.
    """
    try:
        procs, threads = (int(x) for x in layout.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected PROCSxTHREADS such as 2x1, got {layout!r}", param_hint="--layout") from None
    cases = cases or ("cpu", "fake")
    if "cpu" in cases:
        for m in filter(None, (model, pipeline_model, int8_model)):
            if not os.path.exists(m):
                raise BenchUsageError(
                    f"model {m} does not exist: build it with `clip-pipeline build-model {m}` "
                    "(add --input-kind uint8 or --int8 for the variants)")
        if images is None:
            raise BenchUsageError("the cpu case needs a directory of JPEGs: pass --images DIR, "
                                  "or run only --case fake / --case memory")
        if not images.is_dir():
            raise BenchUsageError(
                f"the bench corpus {images} does not exist (the cpu case needs a directory of JPEGs): "
                "pass --images DIR, or run only --case fake / --case memory")
    p = {"images": images, "model": os.path.abspath(model),
         "pipeline_model": os.path.abspath(pipeline_model) if pipeline_model else None,
         "int8_model": os.path.abspath(int8_model) if int8_model else None,
         "cpu_images": cpu_images, "cpu_lengths": _ints(cpu_lengths) if cpu_lengths else None, "batch": batch,
         "cpu_procs": procs, "cpu_threads": threads, "mode": mode,
         "decode_workers": decode_workers, "items_per_message": items_per_message,
         "fake_devices": _ints(fake_devices), "fake_seconds": fake_seconds,
         "fake_decode_workers": fake_decode_workers, "fake_items_per_message": fake_items_per_message,
         "fake_overlap": fake_overlap, "memory_sizes": _ints(memory_sizes), "repeats": repeats,
         "openvino": openvino, "dataloader": not no_dataloader}
    if openvino and "cpu" in cases:
        from pipeline.backends.openvino import import_openvino, resolve_precision
        from pipeline.errors import ConfigError

        try:
            import_openvino()
            resolve_precision("bf16", key="bench --openvino (bf16)")
        except ConfigError as exc:
            raise BenchUsageError(str(exc)) from None

    def say(msg: str) -> None:
        if not quiet:
            click.echo(f"[bench {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", err=True)

    res: dict = {"schema": SCHEMA, "command": " ".join(sys.argv), "machine": machine_info(),
                 "params": {k: str(v) if isinstance(v, Path) else v for k, v in p.items()}, "cases": {}}
    work = Path(tempfile.mkdtemp(prefix="clipp-bench-"))
    try:
        runners = {"cpu": case_cpu, "fake": case_fake, "memory": case_memory, "dispatch": case_dispatch}
        for name in ("cpu", "fake", "memory", "dispatch"):
            if name in cases:
                res["cases"][name] = runners[name](p, work, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    click.echo(table(res))
    if json_path:
        from pipeline.bench import write_results

        write_results(json_path, res)


COMMANDS = [bench]
