#!/usr/bin/env python3
"""Peak memory of the input listing (and optionally a whole fake run) vs the number of files.

    python3 scripts/bench_memory.py                       # 1k, 100k, 1M files, 1000 per directory
    python3 scripts/bench_memory.py --counts 1000 100000 --flat   # all files in one directory
    python3 scripts/bench_memory.py --counts 1000 100000 --full   # also a full fake-backend run

Creates the trees (empty .jpg files) under --root (default: a temp dir, removed afterwards) and
measures each in a fresh process, so the numbers are the peak RSS (ru_maxrss) of that process
alone: the listing walk (stages.source.iter_inputs, consumed like the source worker does) and,
with --full, `clip-pipeline run` on the fake backend (every empty file fails as `empty`; the
supervisor's peak and the largest worker's peak are reported separately).
Not part of the test suite: a million files take a minute or two to create.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LIST_PROBE = r"""
import os, resource, sys, time
sys.path.insert(0, sys.argv[2])
from stages.source import iter_inputs
from pipeline.data import rundir
t0 = time.monotonic()
n = 0
with open(os.devnull, "wb") as sink:  # the source writes each path to listing.jsonl
    for p in iter_inputs((sys.argv[1],), ("jpg",)):
        sink.write(rundir.listing_line(p))
        n += 1
print(n, time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

BASELINE_PROBE = r"""
import resource, sys
sys.path.insert(0, sys.argv[1])
import stages.source, pipeline.output
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

FULL_PROBE = r"""
import resource, subprocess, sys, time
t0 = time.monotonic()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(r.returncode, time.monotonic() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(r.stdout[-300:] + r.stderr[-500:], file=sys.stderr)
"""


def make_tree(root: Path, n: int, per_dir: int) -> None:
    if (root / ".complete").exists():
        return
    made = 0
    d = 0
    while made < n:
        sub = root / f"d{d:05d}" if per_dir else root
        sub.mkdir(parents=True, exist_ok=True)
        k = min(per_dir or n, n - made)
        for i in range(k):
            fd = os.open(sub / f"img_{made + i:07d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644)
            os.close(fd)
        made += k
        d += 1
    (root / ".complete").write_text(str(n))


def run_probe(code: str, *args: str) -> str:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    ap.add_argument("--per-dir", type=int, default=1000, help="files per directory (default 1000)")
    ap.add_argument("--flat", action="store_true", help="put every file in one directory")
    ap.add_argument("--full", action="store_true", help="also measure a full fake-backend run")
    ap.add_argument("--root", help="where to create (and keep) the trees; default: a temp dir, removed")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args()
    per_dir = 0 if args.flat else args.per_dir
    base = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="clipp-mem-"))
    results = []
    try:
        baseline = int(run_probe(BASELINE_PROBE, str(ROOT)))
        print(f"interpreter + imports: {baseline / 1024:.1f} MiB peak RSS")
        for n in args.counts:
            tree = base / f"{'flat' if args.flat else 'tree'}-{n}"
            t0 = time.monotonic()
            make_tree(tree, n, per_dir)
            made_s = time.monotonic() - t0
            listed, secs, rss = run_probe(LIST_PROBE, str(tree), str(ROOT)).split()
            row = {"files": n, "layout": "flat" if args.flat else f"{args.per_dir}/dir", "create_s": round(made_s, 1),
                   "listed": int(listed), "list_s": round(float(secs), 2), "list_peak_rss_mib": round(int(rss) / 1024, 1)}
            print(f"{n:>9} files: listing {int(listed):>9} in {float(secs):6.2f}s, peak RSS {int(rss) / 1024:7.1f} MiB",
                  flush=True)
            if args.full:
                out = base / f"out-{n}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, "-m", "pipeline.cli", "run", "-i", str(tree), "-o", str(out), "-q",
                       "--set", 'infer.backend="fake"', "--set", "fake.dim=16", "--set", "workers.decode=1"]
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                r = subprocess.run([sys.executable, "-c", FULL_PROBE, *cmd], capture_output=True, text=True,
                                   env=env, cwd=ROOT, check=True)
                code, secs, child_rss = r.stdout.split()
                sup = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
                row.update({"run_exit": int(code), "run_s": round(float(secs), 1),
                            "run_peak_rss_largest_process_mib": round(int(child_rss) / 1024, 1),
                            "run_failed": sup.get("counts", {}).get("failed")})
                print(f"{'':>9}        full fake run: exit {code} in {float(secs):.1f}s, largest process peak "
                      f"RSS {int(child_rss) / 1024:.1f} MiB", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            results.append(row)
    finally:
        if not args.root:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline_rss_mib": round(baseline / 1024, 1), "results": results},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
