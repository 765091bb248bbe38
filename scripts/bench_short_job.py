#!/usr/bin/env python3
"""A short job timed as a user times it: the whole process, start-up and model load included.

    nice -n -10 python3 scripts/bench_short_job.py --images ../shared/bench/corpus-1k -n 192 \\
        --repeats 5 --json scripts/bench/results/openvino/short-job-192.json

Each case is one fresh process per run, timed from before its start to its exit (what `time`
shows), every case once per repeat, interleaved, medians reported:

  pipeline_fp32     clip-pipeline run --config configs/cpu.toml (onnxruntime fp32, the default)
  loop_fp32         a hand-written loop a user would write instead: onnxruntime with every core,
                    batches of --batch files decoded and preprocessed with PIL (CLIP's transform),
                    inferred, embeddings saved as one .npy
  pipeline_bf16     the same run with --set infer.backend=openvino --set openvino.precision=bf16
  loop_bf16         the hand-written loop on OpenVINO bf16 (every core)
  pipeline_bf16_cache   (optional, --cases) pipeline_bf16 with OpenVINO's model cache (openvino.cache_dir)

Both sides write their embeddings to disk and both read the same --n photos (symlinks to the
corpus in listing order). The loop is the fair baseline for a short job: nothing to spawn.

Bytecode: the checkout's modules (and --baseline-tree's) are compiled to __pycache__ first, as an
installed package has them (pip compiles at install; a first run writes them). Without it, as in a
workspace with PYTHONDONTWRITEBYTECODE=1, every process compiles each project module it imports
at every start (~65 ms of a core per worker process), which the loop, importing one module, barely
pays. `--no-compile` times that case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_CORPUS = ROOT.parent / "shared" / "bench" / "corpus-1k"

LOOP = r'''
import os, sys, numpy as np
from pipeline.data.images import DecodeOptions, decode_file, normalize, reference_crop
model, engine, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
files = sorted(os.path.join(sys.argv[5], f) for f in os.listdir(sys.argv[5]))
threads = len(os.sched_getaffinity(0))
if engine == "ort":
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    run = lambda x: sess.run(None, {name: x})[0]
else:
    import openvino as ov
    req = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": engine, "INFERENCE_NUM_THREADS": threads}
                                  ).create_infer_request()
    run = lambda x: np.array(req.infer({0: x})[0])
opts = DecodeOptions()
embs = []
for i in range(0, len(files), batch):
    x = normalize(np.stack([reference_crop(decode_file(os.fsencode(f), opts)) for f in files[i:i + batch]]))
    embs.append(run(x))
e = np.concatenate(embs)
np.save(out, e / np.linalg.norm(e, axis=1, keepdims=True))
'''


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("-n", type=int, default=192)
    ap.add_argument("--model", default=str(ROOT / "models" / "clip-vit-b32-synthetic.onnx"))
    ap.add_argument("--batch", type=int, default=16, help="the loop's batch (configs/cpu.toml's model.batch_size)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default="pipeline_fp32,loop_fp32,pipeline_bf16,loop_bf16")
    ap.add_argument("--baseline-tree", type=Path,
                    help="another checkout (e.g. before a change): adds case pipeline_fp32_baseline, the same "
                         "pipeline_fp32 command run from that tree")
    ap.add_argument("--no-compile", action="store_true",
                    help="leave the trees' bytecode as it is (see the module's docstring)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not a.no_compile:
        for tree in [ROOT] + ([a.baseline_tree] if a.baseline_tree else []):
            subprocess.run([sys.executable, "-m", "compileall", "-q", "pipeline", "stages"], cwd=tree, check=True,
                           stdout=subprocess.DEVNULL)
    from pipeline.bench.corpus import jpeg_files, link_inputs
    from pipeline.bench.sampler import machine_info

    work = Path(tempfile.mkdtemp(prefix="clipp-short-"))
    inputs = link_inputs(jpeg_files(a.images, a.n), work / "in")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    run = [sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/cpu.toml", "-i", str(inputs),
           "--set", f'model.path="{a.model}"', "--restart", "-q"]
    cmds = {
        "pipeline_fp32": run + ["-o", str(work / "p32")],
        "loop_fp32": [sys.executable, "-c", LOOP, a.model, "ort", str(a.batch), str(work / "l32.npy"), str(inputs)],
        "pipeline_bf16": run + ["-o", str(work / "pbf"), "--set", "infer.backend=openvino",
                                "--set", "openvino.precision=bf16"],
        "loop_bf16": [sys.executable, "-c", LOOP, a.model, "bf16", str(a.batch), str(work / "lbf.npy"), str(inputs)],
        "pipeline_bf16_cache": run + ["-o", str(work / "pbc"), "--set", "infer.backend=openvino",
                                      "--set", "openvino.precision=bf16", "--set", f'openvino.cache_dir="{work / "ovc"}"'],
    }
    envs = {c: env for c in cmds}
    if a.baseline_tree:
        cmds["pipeline_fp32_baseline"] = run + ["-o", str(work / "p32b")]
        envs["pipeline_fp32_baseline"] = dict(os.environ, PYTHONPATH=str(a.baseline_tree.resolve()))
    cases = [c for c in a.cases.split(",") if c] + (["pipeline_fp32_baseline"] if a.baseline_tree else [])
    times: dict[str, list[float]] = {c: [] for c in cases}
    load0 = list(os.getloadavg())
    timed(cmds[cases[0]], envs[cases[0]])  # warm the page cache (model file, photos, Python) for every case alike
    for r in range(a.repeats):
        for c in cases:
            times[c].append(round(timed(cmds[c], envs[c]), 3))
        print(f"repeat {r + 1}/{a.repeats}: " + ", ".join(f"{c} {times[c][-1]:.2f} s" for c in cases), file=sys.stderr)
    med = {c: round(statistics.median(v), 3) for c, v in times.items()}
    ratios = {}
    for prec in ("fp32", "bf16"):
        p, lp = f"pipeline_{prec}", f"loop_{prec}"
        if p in times and lp in times:  # > 1: the pipeline finished first
            ratios[f"{lp}/{p}"] = round(statistics.median(x / y for x, y in zip(times[lp], times[p])), 3)
    if a.baseline_tree and "pipeline_fp32" in times:  # > 1: this tree's pipeline finished first
        ratios["pipeline_fp32_baseline/pipeline_fp32"] = round(statistics.median(
            x / y for x, y in zip(times["pipeline_fp32_baseline"], times["pipeline_fp32"])), 3)
    res = {"schema": "clip-pipeline-bench-short-job/1", "baseline_tree": str(a.baseline_tree or ""),
           "machine": machine_info(), "images": a.n, "batch": a.batch,
           "bytecode": "as found" if a.no_compile else "compiled first (python -m compileall pipeline stages)",
           "model": a.model, "loadavg_start": load0, "loadavg_end": list(os.getloadavg()),
           "median_wall_s": med, "loop_time_over_pipeline_time_median_of_runs": ratios, "wall_s": times,
           "commands": {c: " ".join(cmds[c][:3] + ["..."]) if c.startswith("loop") else " ".join(cmds[c]) for c in cases}}
    print(json.dumps({"median_wall_s": med, "loop/pipeline (time)": ratios}, indent=1))
    if a.json:
        from pipeline.bench import write_results

        write_results(a.json, res)


if __name__ == "__main__":
    main()
