#!/usr/bin/env python3
"""Two processes on one output directory (issue #27 item 1), at scale, timed.

    python3 scripts/check_output_lock.py [--n 20000] [--work DIR]

Makes N small JPEGs (once, kept in WORK/in), starts `clip-pipeline run` on the fake backend into
WORK/out, starts a second identical run 0.6 s later (and then a --restart), and times how long
each second process takes to exit (expected: exit 2 naming the holder, well under 2 s). When the
first run is done, its output is moved aside and a clean run writes WORK/out again; every file is
compared byte for byte (report.json, the lock file and the manifest's created/updated aside).
Prints one JSON line; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--work", default="/tmp/clip-pipeline-lock-check")
    args = ap.parse_args()
    from imagegen import encode, photo
    from robust_helpers import output_tree as tree

    work = Path(args.work)
    inp, out = work / "in", work / "out"
    if len(list(inp.glob("*.jpg"))) != args.n:
        shutil.rmtree(inp, ignore_errors=True)
        inp.mkdir(parents=True)
        for i in range(args.n):
            (inp / f"img_{i:06d}.jpg").write_bytes(encode(photo(32, 32, i)))
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / "first", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "-i", str(inp), "-o", str(out), "--progress", "none",
           "--set", 'infer.backend="fake"', "--set", "fake.dim=64", "--set", "output.shard_size=256"]
    t0 = time.monotonic()
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.6)  # the gap; on a loaded machine the first may not hold the lock yet:
    lock = out / ".lock"  # then wait until it does (measured), so that "second" means second
    while first.poll() is None and f"pid {first.pid} " not in (lock.read_text() if lock.exists() else ""):
        time.sleep(0.01)
    lock_after_s = time.monotonic() - t0
    refusals = []
    for extra in ([], ["--restart"]):
        t1 = time.monotonic()
        r = subprocess.run(cmd + extra, cwd=ROOT, env=env, capture_output=True, text=True)
        refusals.append({"args": extra, "exit": r.returncode, "seconds": round(time.monotonic() - t1, 3),
                         "names_holder": f"pid {first.pid} on host" in r.stderr, "message": r.stderr.strip()[:300]})
    _o, err = first.communicate()
    first_s = time.monotonic() - t0
    if first.returncode != 0:
        print(json.dumps({"first_exit": first.returncode, "first_stderr": err[-2000:], "refusals": refusals}))
        return 1
    first_tree = tree(out)
    out.rename(work / "first")
    t2 = time.monotonic()
    clean = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    identical = clean.returncode == first.returncode and tree(out) == first_tree
    res = {"inputs": args.n, "first_exit": first.returncode, "first_s": round(first_s, 1),
           "first_held_lock_after_s": round(lock_after_s, 2),
           "clean_exit": clean.returncode, "clean_s": round(time.monotonic() - t2, 1), "refusals": refusals,
           "files_compared": len(first_tree), "byte_identical_to_clean_run": identical}
    print(json.dumps(res))
    ok = (first.returncode == 0 and identical
          and all(r["exit"] == 2 and r["names_holder"] and r["seconds"] < 2 for r in refusals))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
