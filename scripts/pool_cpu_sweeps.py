#!/usr/bin/env python3
"""Pool the runs of several `clip-pipeline bench --case cpu --cpu-lengths ...` results.

    python3 scripts/pool_cpu_sweeps.py scripts/bench/results/cpu-sweep-vitb32-bicubic2x-*.json

One sweep of 5 repeats leaves a ratio such as pipeline/ceiling uncertain by about +-1% on a shared
VM (the ceiling itself moves by a few percent between repeats). Every repeat of a sweep is already
interleaved (ceiling, pipeline and baselines back to back), so runs of several sweeps of the same
command on the same machine can be pooled. Per run length this prints, over all runs: the ratio of
the medians, the median of the per-run ratios, and their mean with its standard error.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.bench.cases import CPU_RATIOS as RATIOS  # noqa: E402 - the bench's own list of ratios

CASES = ("ceiling", "pipeline", "pipeline_ready_crops", "single_loop", "dataloader")  # printing order


def runs_by_length(results: list[dict]) -> dict[int, list[dict]]:
    """{images per run: [run, ...]} over every file (each a bench --json result with a cpu case)."""
    out: dict[int, list[dict]] = {}
    for res in results:
        cpu = res["cases"]["cpu"]
        lengths = cpu.get("lengths") or {str(cpu["setup"]["images"]): cpu}
        for n, summary in lengths.items():
            out.setdefault(int(n), []).extend(summary["runs"])
    return out


def pooled(runs: list[dict]) -> dict:
    rate = {c: [r[c]["images_per_s"] for r in runs if r.get(c, {}).get("images_per_s")] for c in CASES}
    out: dict = {"runs": len(runs), "median_images_per_s": {c: round(statistics.median(v), 3) for c, v in rate.items() if v}}
    for a, b in RATIOS:
        both = [r for r in runs if r.get(a, {}).get("images_per_s") and r.get(b, {}).get("images_per_s")]
        if not both:  # (a case only some results have, e.g. 2b: ratios over the runs that have it)
            continue
        per_run = [r[a]["images_per_s"] / r[b]["images_per_s"] for r in both]
        se = statistics.stdev(per_run) / len(per_run) ** 0.5 if len(per_run) > 1 else float("nan")
        out[f"{a}/{b}"] = {
            "runs": len(both),
            "ratio_of_medians": round(statistics.median(r[a]["images_per_s"] for r in both)
                                      / statistics.median(r[b]["images_per_s"] for r in both), 3),
            "median_of_run_ratios": round(statistics.median(per_run), 3),
            "mean_of_run_ratios": round(statistics.fmean(per_run), 4), "standard_error": round(se, 4)}
    cores = [r["pipeline"].get("host_cpu_cores_steady") for r in runs if r["pipeline"].get("host_cpu_cores_steady")]
    if cores:
        out["host_cpu_cores_steady_median"] = round(statistics.median(cores), 3)
    return out


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    results = []
    for name in argv:
        try:
            results.append(json.loads(Path(name).read_text()))
        except (OSError, ValueError) as exc:
            print(f"error: cannot read bench results {name}: {exc}", file=sys.stderr)
            return 2
    for n, runs in sorted(runs_by_length(results).items()):
        p = pooled(runs)
        print(f"{n} images, {p['runs']} runs: median images/s {p['median_images_per_s']}, "
              f"host_cpu_cores_steady {p.get('host_cpu_cores_steady_median')}")
        for a, b in RATIOS:
            if f"{a}/{b}" in p:
                r = p[f"{a}/{b}"]
                print(f"  {a}/{b} ({r['runs']} runs): ratio of medians {r['ratio_of_medians']}, median of run ratios "
                      f"{r['median_of_run_ratios']}, mean {r['mean_of_run_ratios']} +- {r['standard_error']} (SE)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
