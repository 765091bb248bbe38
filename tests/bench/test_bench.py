"""The bench command and the performance levers' message semantics (nothing here is timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.backends.fake import fake_embed
from pipeline.bench.sampler import steady_cpu_rate, tree_pids
from pipeline.worker.loop import worker_environment

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "images"


def test_bench_command_emits_wellformed_json(tmp_path, tiny_model):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pipeline.cli", "bench", "--case", "cpu", "--case", "fake", "--case", "memory",
           "--images", str(SAMPLES), "--model", str(tiny_model), "--cpu-images", "8", "--batch", "4",
           "--repeats", "1", "--fake-devices", "1", "--fake-seconds", "0.1", "--memory-sizes", "40",
           "--json", str(out), "-q"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model-only ceiling" in proc.stdout and "Fake devices" in proc.stdout
    res = json.loads(out.read_text())
    assert res["schema"] == "clip-pipeline-bench/1"
    m = res["machine"]
    assert m["usable_cpus"] >= 1 and len(m["loadavg_start"]) == 3 and len(m["loadavg_end"]) == 3
    assert "onnxruntime" in m["versions"]
    cpu = res["cases"]["cpu"]
    for case in ("ceiling", "pipeline", "pipeline_ready_crops", "single_loop", "dataloader"):
        assert cpu["median_images_per_s"][case] > 0, case
    ratios = {"pipeline/ceiling", "pipeline/single_loop", "pipeline/dataloader", "pipeline_ready_crops/ceiling"}
    assert set(cpu["ratios"]) >= ratios
    assert all(v > 0 for v in cpu["ratios"].values())
    assert set(cpu["ratios_median_of_runs"]) == ratios
    run = cpu["runs"][0]["pipeline"]
    assert run["images"] == 8 and run["time_to_first_embedding_s"] > 0 and run["peak_tree_rss_mib"] > 0
    assert cpu["runs"][0]["pipeline_ready_crops"]["images"] == 8
    fake = res["cases"]["fake"]["devices"]["1"]
    assert fake["ceiling_images_per_s"] == pytest.approx(602.4, abs=0.1)
    assert fake["median_images_per_s"] > 0 and fake["ratio_to_ceiling"] > 0
    assert "host_cpu_s_per_1000" in fake and fake["runs"][0]["host_cpu_s"] > 0
    mem = res["cases"]["memory"]["sizes"]["40"]
    assert mem["images"] == 40 and mem["peak_tree_pss_mib"] > 0


def test_bench_rejects_missing_model(tmp_path):
    cmd = [sys.executable, "-m", "pipeline.cli", "bench", "--case", "cpu", "--model", str(tmp_path / "nope.onnx")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "nope.onnx does not exist" in proc.stderr and "build-model" in proc.stderr


def test_steady_cpu_rate_uses_samples_inside_the_window():
    samples = [(0.0, 0.0), (1.0, 0.5), (2.0, 1.5), (3.0, 2.5), (9.0, 100.0)]
    assert steady_cpu_rate(samples, 1.0, 3.0) == pytest.approx(1.0)
    assert steady_cpu_rate(samples, 1.0, 1.2) is None  # too short to say


def test_tree_pids_includes_this_process_and_its_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pids = tree_pids()
        assert pids[0] == os.getpid() and child.pid in pids
    finally:
        child.kill()
        child.wait()


def test_tree_memory_reads_smaps_only_every_pss_interval(monkeypatch):
    """smaps_rollup costs the measured run ~10% of a core at 4 Hz on ViT-B/32 (issue #20): the
    sampler must read it once per pss_interval_s, and RSS/CPU (cheap reads) on every sample."""
    from pipeline.bench import sampler as bench

    smaps_reads = []
    real = bench._mem_kib
    monkeypatch.setattr(bench, "_mem_kib", lambda pid: smaps_reads.append(pid) or real(pid))
    clock = iter([0.0, 0.25, 0.5, 4.9, 5.0, 5.25, 10.1])
    monkeypatch.setattr(bench.time, "monotonic", lambda: next(clock))
    mem = bench.TreeMemory(pss_interval_s=5.0)
    for _ in range(7):
        mem.sample()
    pids_per_sample = len(tree_pids())
    assert len(smaps_reads) == 3 * pids_per_sample  # at 0.0, 5.0 and 10.1
    assert len(mem.cpu) == 7 and mem.peak_rss > 0 and 0 < mem.peak_pss <= mem.peak_rss * 1.01
    assert mem.stop()["pss_interval_s"] == 5.0

    # while the tree grows by > 5% (model loads at start-up) PSS is read sooner, at most at 2 Hz
    smaps_reads.clear()
    rss = iter([100_000, 100_000, 200_000, 400_000, 400_000])
    monkeypatch.setattr(bench, "_rss_kib", lambda pid: next(rss))
    monkeypatch.setattr(bench, "tree_pids", lambda: [os.getpid()])
    clock = iter([0.0, 0.25, 0.5, 0.75, 1.0])
    grow = bench.TreeMemory(pss_interval_s=5.0)
    for _ in range(5):
        grow.sample()
    assert len(smaps_reads) == 3  # at 0.0 (first), 0.5 and 1.0 (grown); not 0.25 (same) or 0.75 (too soon)
    assert grow.peak_rss == 400_000


def test_worker_environment_is_scoped():
    before = dict(os.environ)
    with worker_environment():
        for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            assert os.environ[k] == before.get(k, "1")
    assert dict(os.environ) == before


def test_worker_environment_sets_and_restores_the_backends_variables(monkeypatch):
    """Backend.worker_env (e.g. a GPU backend's CUDA_VISIBLE_DEVICES) overrides the inherited value
    while a worker starts; the parent's value comes back."""
    from pipeline.backends.base import Backend

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("CLIPP_TEST_ONLY_VAR", raising=False)
    before = dict(os.environ)
    with worker_environment({"CUDA_VISIBLE_DEVICES": "1", "CLIPP_TEST_ONLY_VAR": "x"}):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1" and os.environ["CLIPP_TEST_ONLY_VAR"] == "x"
    assert dict(os.environ) == before
    assert Backend.worker_env(None, "cpu:0") == {}  # the default adds nothing


def test_fake_embed_rows_do_not_depend_on_the_batch():
    px = np.random.default_rng(0).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    full = fake_embed(px)
    assert np.array_equal(full[2:4], fake_embed(px[2:4]))
    assert not np.allclose(full[0], full[1])  # content matters
    assert fake_embed(px[:, :24, :24].copy()).shape == (5, 512)  # tiny crops work too


@pytest.mark.parametrize("what", ["no_corpus", "corpus", "model", "empty"])
def test_bench_usage_errors_are_one_line_exit_2(tmp_path, what):
    """The corpus comes from --images only (no default path): without it, or with a missing or
    empty directory, the cpu case says so in one line (no traceback), exit 2."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    corpus = tmp_path / "corpus"
    if what not in ("corpus", "no_corpus"):
        corpus.mkdir()
    if what == "model":
        (corpus / "a.jpg").write_bytes(b"x")
        model = tmp_path / "missing.onnx"
    images = [] if what == "no_corpus" else ["--images", str(corpus)]
    r = CliRunner().invoke(cli, ["bench", "--case", "cpu", "--model", str(model), *images, "-q"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output
    expect = {"no_corpus": "the cpu case needs a directory of JPEGs", "corpus": f"bench corpus {corpus} does not exist",
              "model": f"model {model} does not exist", "empty": f"no JPEGs in {corpus}"}[what]
    assert expect in r.output and ("--images" in r.output or what == "model")


def test_dispatch_summary_and_table():
    """bench --case dispatch: medians per mode (tail, throughput, ratio to the ceiling) and its table rows."""
    from pipeline.bench.cases import _dispatch_summary
    from pipeline.bench.table import table

    def run(tail, ips, split):
        return {"images_per_s": ips, "wall_s": 10.0, "dispatch": {"tail_s": tail, "images_per_device": split}}

    runs = {"round_robin": [run(2.0, 60.0, {"a": 9}), run(4.0, 70.0, {"a": 9}), run(3.0, 50.0, {"a": 9})],
            "credit": [run(0.1, 90.0, {"a": 9}), run(0.3, 95.0, {"a": 9}), run(0.2, 99.0, {"a": 9})]}
    s = _dispatch_summary(runs, ceiling=100.0)
    assert s["round_robin"]["median_tail_s"] == 3.0 and s["credit"]["median_tail_s"] == 0.2
    assert s["credit"]["ratio_to_ceiling"] == 0.95 and s["round_robin"]["ratio_to_ceiling"] == 0.6
    res = {"cases": {"dispatch": {"setup": {"modes": ["round_robin", "credit"]},
                                  "cases": {"fake_uneven": {"images": 9, **s}}}},
           "machine": {"cpu_model": "x", "usable_cpus": 2, "loadavg_start": [1.0], "loadavg_end": [1.0]}}
    text = table(res)
    assert "fake_uneven" in text and "0.950" in text and "0.600" in text


def test_cpu_length_sweep_summaries_and_table():
    """bench --case cpu --cpu-lengths: one summary per run length (medians of the interleaved runs,
    ratios, host_cpu_cores_steady, drain tail), and a table block per length."""
    from pipeline.bench.cases import _cpu_summary
    from pipeline.bench.table import table

    p = {"batch": 16, "cpu_procs": 2, "cpu_threads": 1, "pipeline_model": None, "model": "m.onnx", "mode": "fast",
         "int8_model": None, "decode_workers": 1, "items_per_message": 16}

    def rep(ceil, pipe, loop, cores, tail):
        return {"ceiling": {"images_per_s": ceil}, "single_loop": {"images_per_s": loop},
                "dataloader": {"images_per_s": loop}, "load_before": [0.0], "load_after": [0.0],
                "pipeline": {"images_per_s": pipe, "images_per_s_from_first_result": pipe - 1,
                             "host_cpu_cores_steady": cores, "time_to_first_embedding_s": 3.0,
                             "peak_tree_rss_mib": 1.0, "peak_tree_pss_mib": 1.0, "dispatch": {"tail_s": tail}}}

    s64 = _cpu_summary(p, 64, [rep(40, 30, 35, 1.8, 0.5), rep(42, 33, 36, 1.9, 0.1), rep(44, 36, 37, 1.7, 0.3)])
    s1k = _cpu_summary(p, 1000, [rep(44, 43, 39, 1.95, 0.2)] * 3)
    assert s64["median_images_per_s"]["pipeline"] == 33 and s64["ratios"]["pipeline/ceiling"] == round(33 / 42, 3)
    assert s64["host_cpu_cores_steady"] == 1.8 and s64["tail_s"] == 0.3
    assert s64["ratios_median_of_runs"]["pipeline/single_loop"] == round(33 / 36, 3)
    res = {"cases": {"cpu": {"setup": {}, "lengths": {"64": s64, "1000": s1k}}},
           "machine": {"cpu_model": "x", "usable_cpus": 2, "loadavg_start": [1.0], "loadavg_end": [1.0]}}
    text = table(res)
    assert "CPU (64 JPEGs" in text and "CPU (1000 JPEGs" in text and "host_cpu_cores_steady 1.95" in text


def test_pool_cpu_sweeps_pools_runs_of_several_files(tmp_path):
    """scripts/pool_cpu_sweeps.py: runs of two sweep files pooled per length (ratios of the pooled
    medians, median/mean/SE of per-run ratios); a one-length result pools under its size."""
    def run(ceiling, pipeline):
        return {"ceiling": {"images_per_s": ceiling}, "pipeline": {"images_per_s": pipeline, "host_cpu_cores_steady": 2.0},
                "single_loop": {"images_per_s": 40.0}, "dataloader": {"images_per_s": 40.0}}

    sweep = {"cases": {"cpu": {"setup": {"images": [1000]}, "lengths": {"1000": {"runs": [run(50.0, 45.0), run(40.0, 40.0)]}}}}}
    sweep["cases"]["cpu"]["lengths"]["1000"]["runs"][0]["pipeline_ready_crops"] = {"images_per_s": 48.0}
    single = {"cases": {"cpu": {"setup": {"images": 1000}, "runs": [run(45.0, 45.0)]}}}
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    files[0].write_text(json.dumps(sweep))
    files[1].write_text(json.dumps(single))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "pool_cpu_sweeps.py"), *map(str, files)],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("1000 images, 3 runs: median images/s {'ceiling': 45.0, 'pipeline': 45.0")
    # per-run ratios 0.9, 1.0, 1.0: median 1.0, mean 0.9667, SE 0.0333
    assert "pipeline/ceiling (3 runs): ratio of medians 1.0, median of run ratios 1.0, mean 0.9667 +- 0.0333 (SE)" in out
    # case 2b in one run only: its ratios over that run, not its median over the ceiling of all three
    assert "pipeline_ready_crops/ceiling (1 runs): ratio of medians 0.96, median of run ratios 0.96" in out
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "pool_cpu_sweeps.py"), str(tmp_path / "none.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot read bench results" in bad.stderr and "none.json" in bad.stderr
