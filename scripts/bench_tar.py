#!/usr/bin/env python3
"""Tar-shard input throughput against a directory of the same images (issue #18).

    python3 scripts/bench_tar.py [--images DIR] [--per-tar 250] [--reps 2] [--json FILE]

Writes the images (default: ../shared/bench/corpus-1k) as webdataset shards (KEY.jpg + KEY.txt,
--per-tar samples each) into a temp dir, then runs `clip-pipeline run` on the fake backend (no
inference time: decode + crop is the work, which is what the input format changes) over the
directory and over the tars, alternating, --reps times each, in fresh output directories. Reports
images/s (embedded / the run's own wall time from report.json) per run and the median ratio.
Not part of the test suite (wall-clock numbers); on a shared machine, say so with the numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_tars(images: list[Path], dst: Path, per_tar: int) -> None:
    dst.mkdir(parents=True)
    for t in range(0, len(images), per_tar):
        with tarfile.open(dst / f"{t // per_tar:05d}.tar", "w") as tf:
            for i, img in enumerate(images[t:t + per_tar], t):
                for name, data in ((f"{i:09d}.jpg", img.read_bytes()), (f"{i:09d}.txt", img.name.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def run(inp: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--input", str(inp), "--output", str(out),
           "--set", "infer.backend=\"fake\"", "--set", f"workers.decode={args.decode}",
           "--set", f"preprocess.mode=\"{args.mode}\"", "--progress", "none", "--quiet"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode not in (0, 3):
        raise SystemExit(f"run failed ({proc.returncode}): {proc.stderr.strip()}")
    rep = json.loads((out / "report.json").read_text())
    n = rep["counts"]["embedded"]
    return {"embedded": n, "failed": rep["counts"]["failed"], "run_wall_s": rep["wall_s"], "cmd_wall_s": round(wall, 3),
            "images_per_s": round(n / rep["wall_s"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if p.is_dir()), ROOT.parent / "shared")
    ap.add_argument("--images", default=str(default / "bench" / "corpus-1k"))
    ap.add_argument("--per-tar", type=int, default=250)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--decode", type=int, default=1, help="workers.decode")
    ap.add_argument("--mode", default="fast", choices=("fast", "reference"), help="preprocess.mode")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not images:
        raise SystemExit(f"error: no JPEGs in {args.images} (--images DIR)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-tar-"))
    try:
        d = tmp / "dir"
        d.mkdir()
        for i, p in enumerate(images):  # the same bytes under the same order as the tars
            shutil.copyfile(p, d / f"{i:09d}.jpg")
        make_tars(images, tmp / "tars", args.per_tar)
        results: dict[str, list[dict]] = {"directory": [], "tar": []}
        for rep in range(args.reps):
            order = ("directory", "tar") if rep % 2 == 0 else ("tar", "directory")
            for kind in order:
                r = run(d if kind == "directory" else tmp / "tars", tmp / f"out-{kind}-{rep}", args)
                results[kind].append(r)
                print(f"rep {rep} {kind:9s}: {r['images_per_s']:8.1f} images/s ({r['embedded']} in {r['run_wall_s']}s)",
                      flush=True)
        med = {k: statistics.median(r["images_per_s"] for r in v) for k, v in results.items()}
        summary = {"images": len(images), "per_tar": args.per_tar, "decode_workers": args.decode,
                   "preprocess_mode": args.mode, "backend": "fake (latency 0)",
                   "median_images_per_s": med, "tar_over_directory": round(med["tar"] / med["directory"], 3),
                   "runs": results}
        print(f"median: directory {med['directory']:.1f} images/s, tar {med['tar']:.1f} images/s, "
              f"tar/directory = {summary['tar_over_directory']:.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
