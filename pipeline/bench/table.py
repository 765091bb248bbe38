"""The bench results as a text table."""

from __future__ import annotations

from pipeline.bench.openvino import TABLE_NAMES as OV_TABLE_NAMES


def table(res: dict) -> str:
    lines = []
    cpu_case = res["cases"].get("cpu")
    cpus = list(cpu_case["lengths"].values()) if cpu_case and "lengths" in cpu_case else [cpu_case] if cpu_case else []
    for cpu in cpus:
        m, ra = cpu["median_images_per_s"], cpu["ratios"]
        lines += [f"CPU ({cpu['setup']['images']} JPEGs, batch {cpu['setup']['batch']}, median of {len(cpu['runs'])} runs)",
                  f"  {'case':44s} {'images/s':>9s}"]
        names = {"ceiling": "1. model-only ceiling (same model/devices)", "pipeline": "2. clip-pipeline end to end",
                 "pipeline_ready_crops": "2b. clip-pipeline, decode -> ready crops",
                 "single_loop": "3. single-process loop (reference CPU path)", "dataloader": "4. DataLoader-style baseline",
                 "int8_ceiling": "   int8 model-only ceiling", "int8_pipeline": "   int8 clip-pipeline end to end",
                 **OV_TABLE_NAMES}
        for k, label in names.items():
            if k in m:
                lines.append(f"  {label:44s} {m[k]:9.2f}")
        lines.append("  ratios of medians: " + ", ".join(f"{k} {v:.3f}" for k, v in ra.items() if v is not None))
        lines.append("  medians of per-run ratios: " + ", ".join(
            f"{k} {v:.3f}" for k, v in cpu["ratios_median_of_runs"].items() if v is not None))
        lines.append(f"  host_cpu_cores_steady {cpu.get('host_cpu_cores_steady')}; drain tail {cpu.get('tail_s')} s; "
                     f"pipeline from its first result {cpu.get('pipeline_from_first_result_images_per_s')} images/s")
        if "int8_cosine_vs_fp32" in cpu_case:
            c = cpu_case["int8_cosine_vs_fp32"]
            lines.append(f"  int8 cosine vs fp32: mean {c['mean']:.6f}, min {c['min']:.6f} "
                         "(synthetic weights; trained weights quantise worse)")
        lines.append(f"  time to first embedding {cpu['time_to_first_embedding_s']} s; peak process-tree RSS "
                     f"{cpu['peak_tree_rss_mib']} MiB (PSS {cpu['peak_tree_pss_mib']} MiB)")
    fake = res["cases"].get("fake")
    if fake:
        s = fake["setup"]
        lines.append(f"Fake devices ({s['latency_ms_per_batch']} ms per batch of {s['batch']}, ready crops)")
        lines.append(f"  {'devices':>10s} {'images/s':>9s} {'ceiling':>8s} {'ratio':>6s} {'cpu s/1k':>8s} "
                     f"{'ttfe s':>7s} {'RSS MiB':>8s}")
        for nd, d in fake["devices"].items():
            lines.append(f"  {nd:>10s} {d['median_images_per_s'] or 0:9.1f} {d['ceiling_images_per_s']:8.1f} "
                         f"{d['ratio_to_ceiling'] or 0:6.3f} {d['host_cpu_s_per_1000'] or 0:8.2f} "
                         f"{d['time_to_first_embedding_s']:7.2f} {d['peak_tree_rss_mib']:8.1f}")
    disp = res["cases"].get("dispatch")
    if disp:
        lines.append("Dispatch (round_robin = before, credit = now; medians, interleaved runs)")
        lines.append(f"  {'case':30s} {'mode':>12s} {'tail s':>7s} {'images/s':>9s} {'/ceiling':>8s}")
        for name, c in disp["cases"].items():
            for mode in disp["setup"]["modes"]:
                d = c[mode]
                ratio = f"{d['ratio_to_ceiling']:8.3f}" if d["ratio_to_ceiling"] else f"{'-':>8s}"
                lines.append(f"  {name:30s} {mode:>12s} {d['median_tail_s']:7.2f} {d['median_images_per_s'] or 0:9.1f} {ratio}")
    mem = res["cases"].get("memory")
    if mem:
        lines.append("Memory (fake backend, 2 devices): inputs -> peak process-tree PSS / RSS MiB")
        for nn, d in mem["sizes"].items():
            lines.append(f"  {nn:>8s}: {d['peak_tree_pss_mib']:8.1f} / {d['peak_tree_rss_mib']:8.1f}")
    m = res["machine"]
    lines.append(f"Machine: {m['cpu_model']} ({m['usable_cpus']} usable CPUs); load average "
                 f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end")
    return "\n".join(lines)
