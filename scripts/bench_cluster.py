#!/usr/bin/env python3
"""Cluster benchmark (docs/cluster.md, "Measured"): Ray nodes x fake devices at the BM1684X
latency, on this one machine, every Ray process on 127.0.0.1.

    python3 scripts/bench_cluster.py [--nodes 3] [--devices 2] [--range-shards 16] [--plan-files 1000000]

Reports, as JSON (also written to --json FILE):
- steady: images/s of all nodes together while every range runs (from the first shard of the
  last range to start until the first range commits), against nodes x devices x 602 img/s;
- per range: task wall time, the run-range split (prepare = plan check + model identity,
  pipeline, commit), the pipeline's time to its first result (process start + model load);
- plan time for --plan-files empty files (the listing walk + plan record).
The fake devices sleep 53.12 ms per batch of 32 (fake.ready_crops: no decoding), so this
measures orchestration, not a device. The machine may be shared: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BATCH = 32
LATENCY_MS = 1.66 * BATCH  # pipeline/bench/__init__.py BM1684X_MS_PER_IMAGE_B32
PER_DEVICE = BATCH * 1000.0 / LATENCY_MS
SHARD = 4096


def sample_shards(out: Path, stop: threading.Event, samples: list) -> None:
    while not stop.is_set():
        n = sum(1 for _ in (out / "attempts").glob("r-*/*/embeddings/part-*.npy")) if (out / "attempts").exists() else 0
        starts = {p.parent.parent.parent.name for p in (out / "attempts").glob("r-*/*/embeddings/part-*.npy")} \
            if (out / "attempts").exists() else set()
        done = len(list((out / "ranges").glob("r-*.json"))) if (out / "ranges").exists() else 0
        samples.append((time.monotonic(), n, len(starts), done))
        stop.wait(0.25)


def bench_ray(nodes: int, devices: int, range_shards: int, work: Path) -> dict:
    import ray_helpers

    from pipeline.bench.corpus import empty_inputs
    from pipeline.cluster.ray_runner import run_on_ray
    from pipeline.config import from_dict

    n = nodes * range_shards * SHARD  # one range per node: one round
    inputs = empty_inputs(n, work / "in")
    out = work / "out"
    raw = {"input": {"paths": [str(inputs)]}, "output": {"dir": str(out), "shard_size": SHARD},
           "model": {"batch_size": BATCH},
           "infer": {"backend": "fake", "devices": [f"cpu:{i}" for i in range(devices)]},
           "fake": {"latency_ms_per_batch": LATENCY_MS, "ready_crops": True},
           "workers": {"decode": 1, "items_per_message": 32},
           "queues": {"infer": 2 * BATCH, "decode": 64},
           "run": {"progress": "none"},
           "cluster": {"range_shards": range_shards, "straggler_factor": 0.0}}
    cfg = from_dict(raw)
    samples: list = []
    stop = threading.Event()
    load_before = os.getloadavg()
    with ray_helpers.local_cluster(nodes=nodes, devices_per_node=devices):
        t = threading.Thread(target=sample_shards, args=(out, stop, samples), daemon=True)
        t.start()
        t0 = time.monotonic()
        code, msg = run_on_ray(cfg, log=lambda m: print(m, file=sys.stderr))
        wall = time.monotonic() - t0
        stop.set()
        t.join()
    assert code == 0, msg
    # steady window: every range has a shard on disk .. the first range committed
    t_all = next(s[0] for s in samples if s[2] == nodes)
    i_all = next(i for i, s in enumerate(samples) if s[2] == nodes)
    t_end, n_end = next(((s[0], s[1]) for s in samples if s[3] >= 1), (samples[-1][0], samples[-1][1]))
    shards_in_window = n_end - samples[i_all][1]
    steady = shards_in_window * SHARD / (t_end - t_all) if t_end > t_all else None
    ceiling = nodes * devices * PER_DEVICE
    report = json.loads((out / "report.json").read_text())
    ranges = []
    for rec_path in sorted((out / "ranges").glob("r-*.json")):
        rec = json.loads(rec_path.read_text())
        arep = json.loads((out / rec["dir"] / "report.json").read_text())
        drv = next((x for x in report["cluster"]["driver"]["ranges"] if x["range"] == rec["range"]), {})
        ranges.append({"range": rec["range"], "rows": rec["rows"], **rec.get("timings", {}),
                       "task_wall_s": drv.get("task_wall_s"), "driver_wall_s": drv.get("driver_wall_s"),
                       "commit_s": drv.get("commit_s"), "total_s": drv.get("total_s"),
                       "time_to_first_result_s": arep.get("time_to_first_result_s"),
                       "pipeline_images_per_s": arep.get("images_per_s")})
    for r in ranges:  # overhead = task wall time minus the images at the per-node steady rate
        per_node = steady / nodes if steady else None
        r["overhead_s"] = round(r["task_wall_s"] - r["rows"] / per_node, 2) if per_node and r["task_wall_s"] else None
    shutil.rmtree(inputs, ignore_errors=True)
    return {"nodes": nodes, "devices_per_node": devices, "images": n, "range_size": range_shards * SHARD,
            "latency_ms_per_batch": round(LATENCY_MS, 2), "batch": BATCH,
            "ceiling_images_per_s": round(ceiling, 1),
            "steady_images_per_s": round(steady, 1) if steady else None,
            "steady_ratio_to_ceiling": round(steady / ceiling, 3) if steady else None,
            "steady_window_s": round(t_end - t_all, 2),
            "end_to_end_images_per_s": round(n / wall, 1), "wall_s": round(wall, 2),
            "driver": {k: v for k, v in report["cluster"]["driver"].items() if k != "ranges"},
            "merge_s": report["cluster"]["merge_s"], "ranges": ranges,
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}


def bench_plan(n: int, work: Path) -> dict:
    from pipeline.bench.corpus import empty_inputs
    from pipeline.cluster.plan import make_plan
    from pipeline.config import from_dict

    t0 = time.monotonic()
    inputs = empty_inputs(n, work / "plan-in")
    make_s = time.monotonic() - t0
    cfg = from_dict({"input": {"paths": [str(inputs)]}, "output": {"dir": str(work / "plan-out")},
                     "infer": {"backend": "fake"}})
    t0 = time.monotonic()
    plan, _ = make_plan(cfg, 64, log=lambda m: None)
    plan_s = time.monotonic() - t0
    size = plan.listing.stat().st_size
    shutil.rmtree(inputs, ignore_errors=True)
    return {"files": n, "plan_s": round(plan_s, 2), "listing_bytes": size, "ranges": plan.n_ranges,
            "creating_the_files_s": round(make_s, 1), "load": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--range-shards", type=int, default=16)
    ap.add_argument("--plan-files", type=int, default=1_000_000)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args()
    import ray_helpers

    ray_helpers.set_loopback_env()
    res: dict = {"machine": {"cpus": os.cpu_count(), "note": "one shared 2-core machine; Ray nodes are processes"}}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        if not a.skip_ray:
            res["ray"] = bench_ray(a.nodes, a.devices, a.range_shards, Path(tmp) / "ray")
            print(json.dumps(res["ray"], indent=1), file=sys.stderr)
        if a.plan_files:
            res["plan"] = bench_plan(a.plan_files, Path(tmp))
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
