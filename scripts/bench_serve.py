#!/usr/bin/env python3
"""`clip-pipeline serve` over 1,000,000 rows: query latency (p50/p99) and 32 concurrent clients on loopback.

    nice -n -10 python3 scripts/bench_serve.py --json scripts/bench/results/serve-1m.json

What it does (every step through the project's own code; not part of the test suite):

1. a real run of the bundled samples with configs/cpu.toml (the synthetic ViT-B/32 image model:
   SYNTHETIC weights), whose manifest gives the big run its model, config and paired text tower;
2. --rows synthetic rows (a mixture of 1,000 Gaussian clusters on the unit sphere, float16) written
   with the run directory's own writer (`rundir.write_shard`, via scripts/bench_search.py's
   make_data), the manifest taken from step 1;
3. `clip-pipeline index --kind ivf-pq` over them;
4. `clip-pipeline serve` as a subprocess (as a user runs it), then from this process over HTTP
   keep-alive connections on loopback:
   * vector queries (`embedding_input`, data rows plus noise) with the ivf-pq index;
   * text queries end to end (tokenizer + the ViT-B/32 text tower on the cpu backend + ivf-pq);
   * the same vector queries with --nprobe 128 (--wide-nprobe): more lists visited, higher recall;
   * the same vector queries against a server with --no-index (the exact chunked scan); its results
     are the reference for the recall@k of the ivf-pq cases (same queries);
   * --clients concurrent clients for --seconds (half text, half vector queries, ivf-pq), stopping
     at the deadline or after --max-requests, whichever comes first; every non-200 is an error.
   Latencies are wall-clock per request, measured by the client (sequential, one connection).

The machine is shared with other work: quote the figures with that caveat.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPTS = ["a photo of a dog", "a red car parked on a street", "two people on a beach at sunset", "a bowl of fruit",
           "a city skyline at night", "a cat sleeping on a sofa", "mountains covered in snow", "a plate of pasta",
           "a child riding a bicycle", "an old wooden boat", "a field of sunflowers", "a black and white portrait"]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                       **kw)
    if r.returncode != 0:
        raise SystemExit(f"clip-pipeline {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def make_run(work: Path, rows: int, shard_size: int) -> Path:
    from bench_search import make_data

    from pipeline.data.rundir import atomic_write_json, read_manifest

    base = work / "base"
    if not (base / "manifest.json").exists():
        print("real run of the samples (configs/cpu.toml) for the model and config...", flush=True)
        cli("run", "--config", "configs/cpu.toml", "--output", str(base), "--progress", "none")
    out = work / "run1m"
    if (out / "manifest.json").exists() and (read_manifest(out) or {}).get("counts", {}).get("total") == rows:
        return out
    shutil.rmtree(out, ignore_errors=True)
    print(f"writing {rows:,} synthetic rows with rundir.write_shard...", flush=True)
    t0 = time.perf_counter()
    make_data(out, rows, 512, shard_size, seed=0)
    real = read_manifest(base)
    man = read_manifest(out)
    cfg = json.loads(json.dumps(real["config"]))
    cfg["output"].update(man["config"]["output"])  # float16, the shard size
    man.update(model=real["model"], config=cfg, synthetic_weights=True)
    atomic_write_json(out / "manifest.json", man)
    print(f"  {time.perf_counter() - t0:.0f}s", flush=True)
    return out


class Server:
    def __init__(self, out: Path, *extra: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(out), "--port", "0",
                                      "--threads", "8", *extra], stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.log = []
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"Serving on http://127\.0\.0\.1:(\d+)/", line)
            if m:
                self.port = int(m.group(1))
                break
        else:
            raise SystemExit("serve did not start:\n" + "".join(self.log))
        threading.Thread(target=lambda: [self.log.append(x) for x in self.proc.stderr], daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


class Client:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, body: dict) -> tuple[int, float, object]:
        data = json.dumps(body)
        t0 = time.perf_counter()
        self.conn.request("POST", "/knn-service", data, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        payload = resp.read()
        dt = time.perf_counter() - t0
        return resp.status, dt, json.loads(payload) if resp.status == 200 else payload[:300]


def percentiles(times: list[float]) -> dict:
    ms = np.array(times) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2), "max_ms": round(float(ms.max()), 2)}


def latency(port: int, bodies: list[dict], warmup: int = 3) -> tuple[dict, list[list[int]]]:
    """Sequential queries on one connection: (percentiles, the result ids of each query)."""
    c = Client(port)
    for b in bodies[:warmup]:
        c.post(b)
    times, ids = [], []
    for b in bodies:
        status, dt, doc = c.post(b)
        if status != 200:
            raise SystemExit(f"query failed ({status}): {doc}")
        times.append(dt)
        ids.append([r["id"] for r in doc])
    return percentiles(times), ids


def recall(found: list[list[int]], exact: list[list[int]]) -> float:
    """Mean fraction of the exact top-k found, over the queries both lists have."""
    return round(float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=False)])), 4)


def load(port: int, bodies: list[dict], clients: int, seconds: float, max_requests: int) -> dict:
    lock = threading.Lock()
    counts = {"ok": 0, "errors": 0, "sent": 0}
    errors: list[str] = []
    times: list[float] = []
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        c = Client(port)
        j = i
        while time.monotonic() < deadline:
            with lock:
                if counts["sent"] >= max_requests:
                    return
                counts["sent"] += 1
            try:
                status, dt, doc = c.post(bodies[j % len(bodies)])
            except (OSError, http.client.HTTPException) as exc:
                status, dt, doc = -1, 0.0, repr(exc)
                c = Client(port)
            with lock:
                if status == 200:
                    counts["ok"] += 1
                    times.append(dt)
                else:
                    counts["errors"] += 1
                    errors.append(f"{status}: {doc}"[:200])
            j += clients

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {"clients": clients, "seconds": round(wall, 2), "requests": counts["ok"] + counts["errors"],
            "ok": counts["ok"], "errors": counts["errors"], "error_samples": errors[:5],
            "queries_per_s": round(counts["ok"] / wall, 1), "latency": percentiles(times) if times else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=65536)
    ap.add_argument("--data", type=Path, default=None, help="work directory (kept; default: a temp dir, removed)")
    ap.add_argument("--queries", type=int, default=200, help="sequential queries per latency case")
    ap.add_argument("--exact-queries", type=int, default=50, help="exact-scan queries (also the recall reference)")
    ap.add_argument("--wide-nprobe", type=int, default=128, help="a second ivf-pq case with this nprobe")
    ap.add_argument("-k", type=int, default=10, help="num_images = num_result_ids per query")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    work = args.data or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"rows": args.rows, "k": args.k, "host": {
        "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "nice": os.nice(0),
        "machine": platform.machine(), "python": platform.python_version(),
        "note": "shared machine (other sessions running); figures are indicative"}}
    try:
        out = make_run(work, args.rows, args.shard_size)
        if not (out / "index" / "index.faiss").exists():
            print("building the ivf-pq index...", flush=True)
            t0 = time.perf_counter()
            cli("index", str(out), "--kind", "ivf-pq")
            print(f"  {time.perf_counter() - t0:.0f}s", flush=True)
        result["index"] = json.loads((out / "index" / "index.json").read_text())
        from bench_search import make_queries

        q = np.load(make_queries(out, max(args.queries, args.exact_queries), seed=7))
        vec = [{"embedding_input": v.tolist(), "num_images": args.k, "num_result_ids": args.k, "indice_name": out.name}
               for v in q]
        text = [{"text": f"{PROMPTS[i % len(PROMPTS)]} #{i}", "num_images": args.k, "num_result_ids": args.k,
                 "indice_name": out.name} for i in range(args.queries)]
        found = {}
        srv = Server(out)
        try:
            print(f"latency: vector queries, ivf-pq (nprobe {result['index']['nprobe']})...", flush=True)
            result["vector_ivfpq"], found["vector_ivfpq"] = latency(srv.port, vec[:args.queries])
            print(f"  {result['vector_ivfpq']}", flush=True)
            print("latency: text queries end to end, cpu text tower, ivf-pq...", flush=True)
            result["text_ivfpq"], _ = latency(srv.port, text)
            print(f"  {result['text_ivfpq']}", flush=True)
            print(f"load: {args.clients} clients for {args.seconds:g}s, half text half vector...", flush=True)
            mixed = [b for pair in zip(text, vec, strict=False) for b in pair]
            result["load_ivfpq"] = load(srv.port, mixed, args.clients, args.seconds, args.max_requests)
            print(f"  {result['load_ivfpq']}", flush=True)
        finally:
            srv.stop()
        result["server_log"] = [line.rstrip() for line in srv.log if not line.startswith("Serving")][:20]
        wide = Server(out, "--nprobe", str(args.wide_nprobe))
        try:
            print(f"latency: vector queries, ivf-pq (nprobe {args.wide_nprobe})...", flush=True)
            result["vector_ivfpq_wide"], found["vector_ivfpq_wide"] = latency(wide.port, vec[:args.queries])
            result["vector_ivfpq_wide"]["nprobe"] = args.wide_nprobe
            print(f"  {result['vector_ivfpq_wide']}", flush=True)
        finally:
            wide.stop()
        exact = Server(out, "--no-index")
        try:
            print("latency: vector queries, exact scan...", flush=True)
            result["vector_exact"], exact_ids = latency(exact.port, vec[:args.exact_queries], warmup=1)
            print(f"  {result['vector_exact']}", flush=True)
        finally:
            exact.stop()
        for key, ids in found.items():  # what the served results miss of the exact top-k, same queries
            result[key]["recall_at_k_vs_exact"] = recall(ids, exact_ids)
            result[key]["recall_queries"] = min(len(ids), len(exact_ids))
    finally:
        if args.data is None:
            shutil.rmtree(work, ignore_errors=True)
    targets = {"vector_ivfpq_p50_ms<=30": result["vector_ivfpq"]["p50_ms"] <= 30,
               "text_ivfpq_p50_ms<=100": result["text_ivfpq"]["p50_ms"] <= 100,
               "load_errors==0": result["load_ivfpq"]["errors"] == 0}
    result["targets"] = targets
    print(json.dumps(targets))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
