#!/usr/bin/env python3
"""OpenVINO's int8 model-only ceiling beside its fp32 and bf16 ones (openvino.precision = "int8").

    nice -n -10 python3 scripts/bench_openvino_int8.py --model models/clip-vit-b32-synthetic.onnx \\
        --images ../shared/bench/corpus-1k --repeats 5 --json scripts/bench/results/openvino/int8-ceiling-vitb32.json

Each case is `pipeline.bench.baselines.model_ceiling`, the same one `bench --openvino` uses: `--procs`
processes x `--threads` threads (default 2 x 1, as the bench's cpu cases) running the model on one
ready batch of `--batch` crops (the first photos of --images, reference preprocessing), over
`--n` images in all, after a warm-up. The int8 model is the one a run with openvino.precision =
"int8" loads (pipeline/backends/openvino.py `int8_model`: calibrated on `--calibration-count` photos of
`--calibration`, default --images, made once and cached; its making is not timed). The cases run
interleaved in every repeat (fp32, bf16, int8, then the next repeat), so the ratios compare cases that
saw the same background load; report ratios of medians, not absolute figures across runs. bf16 is
left out where this CPU has no native bf16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CORPUS = ROOT.parent / "shared" / "bench" / "corpus-1k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "clip-vit-b32-synthetic.onnx"))
    ap.add_argument("--images", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--calibration", type=Path, help="the calibration photos (default: --images)")
    ap.add_argument("--calibration-count", type=int, default=300)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=1000, help="images per case and repeat (default 1000)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from pipeline import config
    from pipeline.backends.openvino import cpu_flags, engine_identity, int8_model, native_bf16_flags
    from pipeline.backends.openvino_int8 import NATIVE_INT8_FLAGS, calibration_set
    from pipeline.bench.baselines import model_ceiling
    from pipeline.bench.corpus import jpeg_files, reference_batch
    from pipeline.bench.sampler import machine_info

    cfg = config.from_dict({"model": {"path": a.model}, "infer": {"backend": "openvino"},
                            "openvino": {"precision": "int8", "calibration": str(a.calibration or a.images),
                                         "calibration_count": a.calibration_count}})
    int8 = int8_model(cfg, lambda m: print(m, file=sys.stderr))
    if not isinstance(int8, str):
        sys.exit("error: the quantised model could not be cached (read-only ~/.cache?): the ceiling jobs load it from there")
    pixels = reference_batch(jpeg_files(a.images, a.batch))  # the bench's ready batch
    cases = {"ov_fp32_ceiling": (a.model, "fp32")}
    if native_bf16_flags():
        cases["ov_bf16_ceiling"] = (a.model, "bf16")
    cases["ov_int8_ceiling"] = (int8, "int8")
    machine = machine_info()  # before the runs: its load average is the machine's, not the benchmark's
    runs = []
    for rep in range(a.repeats):
        r = {}
        for name, (model, engine) in cases.items():
            r[name] = model_ceiling(model, a.procs, a.threads, pixels, a.n, engine=engine)
            print(f"repeat {rep + 1}/{a.repeats}: {name} {r[name]['images_per_s']:.1f} images/s", file=sys.stderr)
        r["load_average"] = [round(x, 2) for x in os.getloadavg()]
        runs.append(r)
    med = {k: statistics.median(r[k]["images_per_s"] for r in runs) for k in cases}
    ratios = {}
    for num, den in (("ov_int8_ceiling", "ov_bf16_ceiling"), ("ov_int8_ceiling", "ov_fp32_ceiling"),
                     ("ov_bf16_ceiling", "ov_fp32_ceiling")):
        if num in med and den in med:
            ratios[f"{num}/{den}"] = {"of_medians": round(med[num] / med[den], 3),
                                      "median_of_runs": round(statistics.median(r[num]["images_per_s"] / r[den]["images_per_s"]
                                                                                for r in runs), 3)}
    flags = cpu_flags()
    cal = calibration_set(cfg)
    res = {"what": "OpenVINO model-only ceilings (ready crops), interleaved per repeat",
           "model": a.model, "int8_model": int8, "calibration": cal.identity(), "engine": engine_identity("int8", cal),
           "procs": a.procs, "threads": a.threads, "batch": a.batch, "images_per_case": a.n, "repeats": a.repeats,
           "machine": machine, "native_bf16_flags": native_bf16_flags(),
           "native_int8_flags": [f for f in NATIVE_INT8_FLAGS if f in flags],
           "median_images_per_s": {k: round(v, 2) for k, v in med.items()}, "ratios": ratios, "runs": runs}
    for k, v in med.items():
        print(f"{k}: {v:.1f} images/s (median of {a.repeats})")
    for k, v in ratios.items():
        print(f"{k}: {v['of_medians']} (median of per-run ratios {v['median_of_runs']})")
    if a.json:
        from pipeline.bench import write_results

        write_results(a.json, res)


if __name__ == "__main__":
    main()
