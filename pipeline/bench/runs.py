"""One real pipeline run in-process, measured: the steady window, devices' timelines, CPU and memory."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from pipeline.bench.sampler import TreeMemory, cpu_seconds, steady_cpu_rate


def run_pipeline(raw: dict, pss_interval_s: float = 5.0) -> dict:
    """One real `clip-pipeline run` in-process (the supervisor here, workers spawned); the tree's
    PSS is sampled every `pss_interval_s` (see TreeMemory: it costs the run CPU)."""
    from pipeline import config as cfgmod
    from pipeline.run.progress import Progress
    from pipeline.run.supervisor import Supervisor

    marks: list[tuple[float, int]] = []  # (time, inputs) of every `resolved` (Supervisor's on_resolved hook)
    cfg = cfgmod.from_dict(raw, source="<bench>")
    sup = Supervisor(cfg, restart=True, progress=Progress("none", 60), log=lambda m: None,
                     on_resolved=lambda t, n: marks.append((t, n)))
    mem = TreeMemory(pss_interval_s=pss_interval_s)
    cpu0 = cpu_seconds()
    mem.start()
    t0 = time.monotonic()
    result = sup.run()
    t1 = time.monotonic()
    memory = mem.stop()
    cpu_s = cpu_seconds() - cpu0
    if result.exit_code != 0:
        raise RuntimeError(f"bench pipeline run failed (exit {result.exit_code}): {result.message}")
    n = result.counts["embedded"] + result.counts["failed"]
    # The steady window opens once every device has delivered its first (warm-up) batch, as the
    # ceilings and baselines exclude theirs: at the first result resolved after every device that
    # took work sent its first (the devices' own clocks: CLOCK_MONOTONIC is system-wide). Without
    # those stamps: the k-th result (results come per batch or per tail piece).
    k = max(1, min(len(sup.devices), len(marks) - 1))
    firsts = [d["first_result_s"] for d in device_timelines(sup, 0.0, t1).values() if d["first_result_s"]]
    if firsts:
        later = [i for i, m in enumerate(marks) if m[0] >= max(firsts)]
        k = max(1, min(later[0] + 1 if later else len(marks) - 1, len(marks) - 1))
    t_first, n_first = marks[k - 1][0], sum(m[1] for m in marks[:k])
    t_last = marks[-1][0]
    steady = (n - n_first) / (t_last - t_first) if t_last > t_first else None
    cpu_rate = steady_cpu_rate(mem.cpu, t_first, t_last)
    # from the very first result (includes the second device's slow first batch: start-up skew)
    n0 = marks[0][1]
    from_first = (n - n0) / (t_last - marks[0][0]) if t_last > marks[0][0] else None
    return {"images": n, "wall_s": round(t1 - t0, 3), "images_per_s_wall": round(n / (t1 - t0), 3),
            "images_per_s": round(steady, 3) if steady else None,
            "images_per_s_from_first_result": round(from_first, 3) if from_first else None,
            "steady_window_s": [round(t_first - t0, 3), round(t_last - t0, 3)],
            "resolved_timeline": [[round(t - t0, 3), k] for t, k in marks],
            "devices": device_timelines(sup, t0, t_last),
            "time_to_first_embedding_s": round(t_first - t0, 3),
            "host_cpu_s": round(cpu_s, 3), "host_cpu_s_per_1000_incl_startup": round(1000 * cpu_s / n, 3),
            "host_cpu_cores_steady": round(cpu_rate, 3) if cpu_rate else None,
            "host_cpu_s_per_1000": round(1000 * cpu_rate / steady, 3) if cpu_rate and steady else None, **memory,
            "dispatch": sup.dispatch_summary()}


def device_timelines(sup: Any, t0: float, t_end: float) -> dict[str, dict]:
    """Per inference process (from its last stats): images taken, seconds its device was busy,
    its first and last result (seconds from the run's start; CLOCK_MONOTONIC is system-wide), and
    how long it sat idle at the end while another device still worked (its share of the tail)."""
    out: dict[str, dict] = {}
    for w in sup.workers.values():
        if w.role != "infer":
            continue
        st = sup.telemetry.stats.get(w.name, {})
        first, last = st.get("first_result_t"), st.get("last_result_t")
        out[str(w.device)] = {
            "images": int(st.get("in", 0)), "busy_s": round(float(st.get("busy_s", 0.0)), 3),
            "first_result_s": round(first - t0, 3) if first else None,
            "last_result_s": round(last - t0, 3) if last else None,
            "idle_at_end_s": round(max(0.0, t_end - last), 3) if last else None}
    return out


def pipeline_raw(inputs: Path, out: Path, **sections: dict) -> dict:
    raw: dict = {"input": {"paths": [str(inputs)]}, "output": {"dir": str(out), "on_existing": "restart"},
                 "run": {"progress": "none"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None
