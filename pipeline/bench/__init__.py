"""`clip-pipeline bench`: the pipeline against its ceilings and the designs people write by hand.

Every case runs in one invocation on the same machine and inputs, repeated and interleaved
(`--repeats`), so ratios are taken between runs that saw the same background load; medians are
reported. Cases:

  cpu     1. model-only ceiling: the same model, processes and threads fed pre-decoded tensors
          2. clip-pipeline end to end on a directory of JPEGs (a real run, shards written)
          2b. the same run with decode replaced by ready crops (fake.ready_crops): what the
             orchestration reaches without the host's decode work, which splits 1 - 2/1 into
             decode (2b - 2) and everything else (1 - 2b)
          3. a single-process loop like the reference program's CPU path (decode + preprocess a
             batch with PIL, then infer with every core, repeat)
          4. a torch-DataLoader-style baseline (worker processes doing reference preprocessing
             into float batches, the main process inferring); torch itself is not needed
          + optional int8 model: its ceiling, end to end, and its cosine vs the fp32 model
  fake    fake devices with an accelerator's batch latency, decode replaced by ready crops
          (fake.ready_crops, bench-only): images/s vs the devices' ceiling, host CPU s / 1000 img
  memory  peak RSS/PSS of the whole process tree for growing input counts (fake backend)

Throughput of a pipeline run is the steady rate from the moment every device has delivered its
first batch to the last result; start-up
(spawn, model load) is reported separately as time to first embedding. Baselines are timed from
the end of their first batch, ceilings after a warm-up batch, so every figure excludes model load.

The modules: `sampler` (CPU and memory of the process tree, from /proc), `corpus` (the inputs: a
directory of JPEGs given by --images, linked or empty input trees), `baselines` (the ceilings and
hand-written designs, each in a spawned process), `runs` (one measured pipeline run), `cases` (the
cases and their summaries) and `table`; the command line is pipeline/commands/bench.py.
"""

SCHEMA = "clip-pipeline-bench/1"  # of the --json results


def write_results(path, results: dict) -> None:
    """A benchmark's results as indented JSON at `path` (its directory made), and a line on stderr
    naming it: `bench --json` and the drivers in scripts/ (one format for every results file)."""
    import json
    import sys
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
