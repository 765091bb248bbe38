"""The openvino backend beside the cpu case (`bench --openvino`, issue #28): OpenVINO's fp32 and bf16
model-only ceilings (the same processes x threads), the pipeline on the openvino backend at each,
bf16 again with ready crops (its case 2b: decode vs orchestration) and the hand-written loop
(case 3) on OpenVINO bf16. Its ratios join the cpu case's summary (`OV_RATIOS`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.baselines import loop_result, model_ceiling, single_loop_job, spawn
from pipeline.bench.runs import run_pipeline

# bf16 pipeline vs the fp32 pipeline, the hand-written onnxruntime loop and its own ceiling; its 2b;
# bf16 pipeline vs the hand-written bf16 loop; fp32 on OpenVINO vs its ceiling; the engines' ceilings
OV_RATIOS = (("ov_bf16_pipeline", "pipeline"), ("ov_bf16_pipeline", "single_loop"),
             ("ov_bf16_pipeline", "ov_bf16_ceiling"), ("ov_bf16_pipeline_ready_crops", "ov_bf16_ceiling"),
             ("ov_bf16_pipeline", "ov_bf16_single_loop"), ("ov_fp32_pipeline", "ov_fp32_ceiling"),
             ("ov_fp32_ceiling", "ceiling"), ("ov_bf16_ceiling", "ceiling"))

TABLE_NAMES = {"ov_fp32_ceiling": "   OpenVINO fp32 model-only ceiling", "ov_fp32_pipeline": "   clip-pipeline, openvino fp32",
               "ov_bf16_ceiling": "   OpenVINO bf16 model-only ceiling", "ov_bf16_pipeline": "   clip-pipeline, openvino bf16",
               "ov_bf16_pipeline_ready_crops": "   ... bf16, decode -> ready crops",
               "ov_bf16_single_loop": "   single-process loop, OpenVINO bf16"}


def openvino_rep(p: dict, n: int, pixels: np.ndarray, files: list[Path], pipe_raw: Callable[..., dict], label: str,
                 say: Callable[[str], None]) -> dict:
    """One repeat of the openvino cases at n images, right after the cpu cases of the same repeat.
    `pipe_raw(model, ready_crops=False, precision=None)`: the cpu case's run config, on the openvino
    backend at `precision` when one is given."""
    procs, threads, batch = p["cpu_procs"], p["cpu_threads"], p["batch"]
    model = p["pipeline_model"] or p["model"]
    cores = len(os.sched_getaffinity(0))
    r: dict = {}
    for prec in ("fp32", "bf16"):
        say(f"{label}: OpenVINO {prec} model-only ceiling ({procs} x {threads} threads)")
        r[f"ov_{prec}_ceiling"] = model_ceiling(model, procs, threads, pixels, n, engine=prec)
        say(f"{label}: clip-pipeline end to end, openvino {prec}")
        r[f"ov_{prec}_pipeline"] = run_pipeline(pipe_raw(model, precision=prec))
    say(f"{label}: clip-pipeline, openvino bf16, decode replaced by ready crops")
    r["ov_bf16_pipeline_ready_crops"] = run_pipeline(pipe_raw(model, ready_crops=True, precision="bf16"))
    say(f"{label}: single-process loop, OpenVINO bf16")
    r["ov_bf16_single_loop"] = loop_result(spawn(single_loop_job, p["model"], cores, [str(f) for f in files],
                                                 batch, "bf16"))
    return r


def openvino_setup() -> dict[str, Any]:
    """The engine, its version and resolved precision, and this CPU's bf16 flags, for the summary."""
    from pipeline.backends.openvino import engine_identity, native_bf16_flags

    return {"engine": engine_identity("bf16"), "native_bf16_flags": native_bf16_flags()}
