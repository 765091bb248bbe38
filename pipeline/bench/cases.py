"""The bench cases (cpu, fake, dispatch, memory) and their summaries."""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.bench.baselines import cosine_job, dataloader_job, loop_result, model_ceiling, single_loop_job, spawn
from pipeline.bench.corpus import empty_inputs, jpeg_files, link_inputs, reference_batch
from pipeline.bench.openvino import OV_RATIOS, openvino_rep, openvino_setup
from pipeline.bench.runs import median, pipeline_raw, ratio, run_pipeline

BM1684X_MS_PER_IMAGE_B32 = 1.66  # bmrt_test compute, 32-batch fp16 bmodel (docs/performance.md, "Baselines")


def case_cpu(p: dict, work: Path, say: Callable[[str], None]) -> dict:
    """The four designs (and the int8 pair) at each run length of --cpu-lengths, interleaved:
    repeat r runs every length once, and within a length the cases back to back, so every ratio
    is taken between runs that saw the same load. One length: the summary as before; several:
    one summary per length under "lengths" (start-up, steady state and tail each show)."""
    lengths = p.get("cpu_lengths") or [p["cpu_images"]]
    batch, reps = p["batch"], p["repeats"]
    pixels = reference_batch(jpeg_files(p["images"], batch))
    runs: dict[int, list[dict]] = {n: [] for n in lengths}
    for rep in range(reps):
        for n in lengths:
            runs[n].append(_cpu_rep(p, work, n, pixels, f"cpu rep {rep + 1}/{reps}, {n} images", say))
    out = {n: _cpu_summary(p, n, runs[n]) for n in lengths}
    extra: dict = {}
    pipe_model = p["pipeline_model"] or p["model"]
    if pipe_model != p["model"]:
        mean, low = spawn(cosine_job, p["model"], pipe_model, pixels)
        extra["pipeline_model_cosine_vs_baseline_model"] = {"mean": mean, "min": low}
    if p["int8_model"]:
        mean, low = spawn(cosine_job, p["model"], p["int8_model"], pixels)
        extra["int8_cosine_vs_fp32"] = {
            "mean": round(mean, 6), "min": round(low, 6), "images": len(pixels),
            "note": "on synthetic random weights; trained CLIP weights usually quantise worse: measure on yours"}
    if len(lengths) == 1:
        return {**out[lengths[0]], **extra}
    return {"setup": {**out[lengths[0]]["setup"], "images": list(lengths)}, "repeats": reps,
            "lengths": {str(n): out[n] for n in lengths}, **extra}


def _cpu_rep(p: dict, work: Path, n: int, pixels: np.ndarray, label: str, say: Callable[[str], None]) -> dict:
    batch, procs, threads = p["batch"], p["cpu_procs"], p["cpu_threads"]
    cores = len(os.sched_getaffinity(0))
    files = jpeg_files(p["images"], n)
    inputs = work / f"cpu-inputs-{n}"
    if not inputs.exists():
        link_inputs(files, inputs)
    pipe_model = p["pipeline_model"] or p["model"]
    devices = [f"cpu:{i}" for i in range(procs)]

    def pipe_raw(model: str, ready_crops: bool = False, precision: str | None = None) -> dict:
        """The cpu backend's run; with a precision, the same run on the openvino backend."""
        return pipeline_raw(inputs, work / "cpu-out", model={"path": model, "batch_size": batch},
                            preprocess={"mode": p["mode"]},
                            infer={"backend": "openvino" if precision else "cpu", "devices": devices, "threads": threads},
                            workers={"decode": p["decode_workers"], "items_per_message": p["items_per_message"]},
                            queues={"infer": 2 * batch, "decode": 2 * p["items_per_message"]},
                            fake={"ready_crops": ready_crops}, openvino={"precision": precision or "fp32"})

    r: dict = {"load_before": list(os.getloadavg())}
    say(f"{label}: model-only ceiling ({procs} x {threads} threads)")
    r["ceiling"] = model_ceiling(pipe_model, procs, threads, pixels, n)
    say(f"{label}: clip-pipeline end to end")
    r["pipeline"] = run_pipeline(pipe_raw(pipe_model))
    say(f"{label}: clip-pipeline, decode replaced by ready crops")
    r["pipeline_ready_crops"] = run_pipeline(pipe_raw(pipe_model, ready_crops=True))
    say(f"{label}: single-process loop")
    r["single_loop"] = loop_result(spawn(single_loop_job, p["model"], cores, [str(f) for f in files], batch, "ort"))
    if p.get("dataloader", True):
        say(f"{label}: DataLoader-style baseline")
        r["dataloader"] = loop_result(spawn(dataloader_job, p["model"], cores, [str(f) for f in files], batch, cores))
    if p.get("openvino"):
        r.update(openvino_rep(p, n, pixels, files, pipe_raw, label, say))
    if p["int8_model"]:
        say(f"{label}: int8 ceiling and end to end")
        r["int8_ceiling"] = model_ceiling(p["int8_model"], procs, threads, pixels, 2 * n)
        r["int8_pipeline"] = run_pipeline(pipe_raw(p["int8_model"]))
    r["load_after"] = list(os.getloadavg())
    return r


# The cpu case's ratios (run key / run key), per run and of the medians; scripts/pool_cpu_sweeps.py
# pools the same ones. A pair counts only where a run has both (2b and the openvino cases are in
# newer results only, OV_RATIOS; the DataLoader baseline can be left out).
CPU_RATIOS = (("pipeline", "ceiling"), ("pipeline", "single_loop"), ("pipeline", "dataloader"),
              ("pipeline_ready_crops", "ceiling"))


def _cpu_summary(p: dict, n: int, runs: list[dict]) -> dict:
    batch, procs, threads = p["batch"], p["cpu_procs"], p["cpu_threads"]
    cores = len(os.sched_getaffinity(0))
    pipe_model = p["pipeline_model"] or p["model"]
    med = {k: median([r[k] for r in runs], "images_per_s") for k in runs[0] if isinstance(runs[0][k], dict)}
    pairs = [(a, b) for a, b in CPU_RATIOS + OV_RATIOS if a in runs[0] and b in runs[0]]
    per_run = [{f"{a}/{b}": ratio(r[a]["images_per_s"], r[b]["images_per_s"]) for a, b in pairs} for r in runs]
    pipes = [r["pipeline"] for r in runs]
    out: dict = {
        "setup": {"images": n, "batch": batch, "preprocess_mode": p["mode"], "pipeline_model": pipe_model,
                  "baseline_model": p["model"], "int8_model": p["int8_model"],
                  "devices": [f"cpu:{i}" for i in range(procs)],
                  "threads_per_device": threads, "decode_workers": p["decode_workers"],
                  "items_per_message": p["items_per_message"], "baseline_threads": cores,
                  "dataloader_workers": cores},
        **({"openvino": openvino_setup()} if p.get("openvino") else {}),
        "runs": runs,
        "median_images_per_s": med,
        "ratios": {f"{a}/{b}": ratio(med[a], med[b]) for a, b in pairs},
        "ratios_median_of_runs": {k: median([{"v": r[k]} for r in per_run], "v") for k in per_run[0]},
        "per_run_ratios": per_run,
        "pipeline_from_first_result_images_per_s": median(pipes, "images_per_s_from_first_result"),
        "host_cpu_cores_steady": median(pipes, "host_cpu_cores_steady"),
        "tail_s": round(statistics.median(r["dispatch"]["tail_s"] for r in pipes), 3),
        "time_to_first_embedding_s": median(pipes, "time_to_first_embedding_s"),
        "peak_tree_rss_mib": median(pipes, "peak_tree_rss_mib"),
        "peak_tree_pss_mib": median(pipes, "peak_tree_pss_mib"),
    }
    if p["int8_model"]:
        out["ratios"]["int8_pipeline/ceiling"] = ratio(med["int8_pipeline"], med["int8_ceiling"])
        out["ratios"]["int8_pipeline/single_loop"] = ratio(med["int8_pipeline"], med["single_loop"])
    return out


def case_fake(p: dict, work: Path, say: Callable[[str], None]) -> dict:
    batch = 32
    latency_ms = BM1684X_MS_PER_IMAGE_B32 * batch
    per_device = batch * 1000.0 / latency_ms
    out: dict = {"setup": {"batch": batch, "latency_ms_per_batch": round(latency_ms, 2),
                           "ceiling_per_device_images_per_s": round(per_device, 1),
                           "decode_workers": p["fake_decode_workers"], "items_per_message": p["fake_items_per_message"],
                           "input": "fake.ready_crops (decode/preprocess replaced by a ready uint8 crop)"},
                 "devices": {}}
    for ndev in p["fake_devices"]:
        n = int(p["fake_seconds"] * per_device * ndev)
        n = max(n, 4 * batch * ndev)
        inputs = empty_inputs(n, work / f"fake-inputs-{n}")
        raw = pipeline_raw(inputs, work / "fake-out", model={"batch_size": batch},
                           infer={"backend": "fake", "devices": [f"cpu:{i}" for i in range(ndev)]},
                           fake={"latency_ms_per_batch": latency_ms, "ready_crops": True},
                           workers={"decode": p["fake_decode_workers"], "items_per_message": p["fake_items_per_message"]},
                           output={"shard_size": 4096})
        # infer.overlap: the config default, one setting, or both interleaved run by run
        variants = {"default": [None], "on": [True], "off": [False], "both": [False, True]}[p.get("fake_overlap", "default")]
        by_variant: dict = {v: [] for v in variants}
        for rep in range(p["repeats"]):
            for v in variants:
                raw_v = raw if v is None else {**raw, "infer": {**raw["infer"], "overlap": v}}
                label = "" if v is None else f" overlap={'on' if v else 'off'}"
                say(f"fake {ndev} device(s){label} rep {rep + 1}/{p['repeats']}: {n} images")
                r = run_pipeline(raw_v)
                r["load_before"] = list(os.getloadavg())
                by_variant[v].append(r)
        shutil.rmtree(inputs, ignore_errors=True)
        ceiling = per_device * ndev
        for v, runs in by_variant.items():
            key = str(ndev) if v is None else f"{ndev} {'overlap' if v else 'serial'}"
            out["devices"][key] = _fake_summary(n, ceiling, runs)
    return out


def _fake_summary(n: int, ceiling: float, runs: list) -> dict:
    med = median(runs, "images_per_s")
    return {
        "images": n, "ceiling_images_per_s": round(ceiling, 1), "runs": runs,
        "median_images_per_s": med, "ratio_to_ceiling": ratio(med, ceiling),
        "host_cpu_s_per_1000": median(runs, "host_cpu_s_per_1000"),
        "time_to_first_embedding_s": median(runs, "time_to_first_embedding_s"),
        "peak_tree_rss_mib": median(runs, "peak_tree_rss_mib"),
    }


def _dispatch_summary(runs: dict[str, list[dict]], ceiling: float | None = None) -> dict:
    out = {}
    for mode, rs in runs.items():
        tails = [r["dispatch"]["tail_s"] for r in rs]
        med = median(rs, "images_per_s")
        out[mode] = {"median_tail_s": round(statistics.median(tails), 3), "tails_s": tails,
                     "median_images_per_s": med, "median_wall_s": median(rs, "wall_s"),
                     "ratio_to_ceiling": ratio(med, ceiling) if ceiling else None,
                     "images_per_device": [r["dispatch"]["images_per_device"] for r in rs]}
    return out


def case_dispatch(p: dict, work: Path, say: Callable[[str], None]) -> dict:
    """Where the work goes (issue #12): queues.dispatch credit vs the earlier round_robin,
    interleaved run by run. The tail is from the first device's last result to the last result
    (a device idle while another still works); throughput is the steady window of run_pipeline."""
    modes = ("round_robin", "credit")
    out: dict = {"setup": {"modes": list(modes), "repeats": p["repeats"]}, "cases": {}}

    def interleave(name: str, raw: dict, n: int, ceiling: float | None = None) -> None:
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for rep in range(p["repeats"]):
            for m in modes:
                say(f"dispatch {name} rep {rep + 1}/{p['repeats']}: {m}, {n} images")
                r = run_pipeline({**raw, "queues": {**raw.get("queues", {}), "dispatch": m}})
                r["load_before"] = list(os.getloadavg())
                runs[m].append(r)
        out["cases"][name] = {"images": n, "ceiling_images_per_s": ceiling, **_dispatch_summary(runs, ceiling)}

    if os.path.exists(p["model"]) and p["images"] is not None and Path(p["images"]).is_dir():
        n, batch = p["cpu_images"], p["batch"]
        inputs = link_inputs(jpeg_files(p["images"], n), work / "dispatch-cpu-inputs")
        interleave("cpu_2_devices", pipeline_raw(
            inputs, work / "dispatch-out", model={"path": p["model"], "batch_size": batch},
            preprocess={"mode": p["mode"]}, infer={"backend": "cpu", "devices": ["cpu:0", "cpu:1"], "threads": 1},
            workers={"decode": p["decode_workers"], "items_per_message": p["items_per_message"]}), n)
    else:
        say(f"dispatch: no model {p['model']} or corpus {p['images']}: the 2-CPU-device case is skipped")
    batch = 32
    latency_ms = BM1684X_MS_PER_IMAGE_B32 * batch
    per_device = batch * 1000.0 / latency_ms
    ndev = 8
    out["setup"].update({"fake_batch": batch, "fake_latency_ms_per_batch": round(latency_ms, 2), "fake_devices": ndev,
                         "fake_decode_workers": p["fake_decode_workers"],
                         "fake_items_per_message": p["fake_items_per_message"], "slow_factor": 3.0})
    for name, slow in (("fake_8_devices", ()), ("fake_8_devices_one_3x_slower", ("cpu:7",))):
        ceiling = per_device * (ndev - len(slow) + len(slow) / 3.0)
        n = max(int(p["fake_seconds"] * ceiling), 4 * batch * ndev)
        inputs = empty_inputs(n, work / f"dispatch-fake-inputs-{n}")
        raw = pipeline_raw(inputs, work / "dispatch-out", model={"batch_size": batch},
                           infer={"backend": "fake", "devices": [f"cpu:{i}" for i in range(ndev)]},
                           fake={"latency_ms_per_batch": latency_ms, "ready_crops": True,
                                 "slow_devices": list(slow), "slow_factor": 3.0},
                           workers={"decode": p["fake_decode_workers"], "items_per_message": p["fake_items_per_message"]},
                           output={"shard_size": 4096})
        interleave(name, raw, n, round(ceiling, 1))
        shutil.rmtree(inputs, ignore_errors=True)
    return out


def case_memory(p: dict, work: Path, say: Callable[[str], None]) -> dict:
    sizes = {}
    for n in p["memory_sizes"]:
        say(f"memory: {n} inputs (fake backend, 2 devices, ready crops)")
        inputs = empty_inputs(n, work / f"mem-inputs-{n}")
        raw = pipeline_raw(inputs, work / "mem-out", model={"batch_size": 32},
                           infer={"backend": "fake", "devices": ["cpu:0", "cpu:1"]},
                           fake={"ready_crops": True}, workers={"items_per_message": 32})
        r = run_pipeline(raw, pss_interval_s=0.25)  # PSS is this case's figure: sample it at 4 Hz
        shutil.rmtree(inputs, ignore_errors=True)
        sizes[str(n)] = {k: r[k] for k in ("images", "wall_s", "images_per_s", "peak_tree_rss_mib",
                                           "peak_tree_pss_mib", "peak_processes")}
    peaks = [v["peak_tree_pss_mib"] for v in sizes.values()]
    return {"sizes": sizes, "pss_growth_mib_smallest_to_largest": round(peaks[-1] - peaks[0], 1) if peaks else None}
