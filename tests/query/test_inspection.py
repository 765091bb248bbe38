"""Reading a run back (load_embeddings, iter_shards, inspect, report) and the progress line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke

from pipeline import config
from pipeline.data import rundir
from pipeline.output import ShardedArray, iter_shards, load_embeddings
from pipeline.query.inspection import summarize, verify
from pipeline.run.progress import StageSample, bottleneck_line, queue_fill, utilisation

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "images"


def fake_cfg(inputs, out, **sections):
    raw = {"input": {"paths": [str(p) for p in inputs]},
           "output": {"dir": str(out), "shard_size": 5},
           "infer": {"backend": "fake", "devices": ["cpu:0"], "batch_timeout_ms": 10},
           "run": {"progress": "none", "start_timeout_s": 60, "stall_timeout_s": 60}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return config.from_dict(raw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished fake-backend run: 12 sample images + 2 bad files, shard_size 5 (3 shards)."""
    from pipeline.run.supervisor import run

    base = tmp_path_factory.mktemp("ux")
    imgs = base / "imgs"
    shutil.copytree(SAMPLES, imgs)
    (imgs / "zz_empty.jpg").write_bytes(b"")
    (imgs / "zz_text.png").write_bytes(b"this is not an image")
    res = run(fake_cfg([imgs], base / "out"))
    assert res.exit_code == 3, res.message
    return base / "out"



def test_load_embeddings_is_lazy_and_matches_shards(run_dir):
    paths, emb = load_embeddings(run_dir)
    assert isinstance(emb, ShardedArray)
    shards = list(iter_shards(run_dir))
    assert [s.index for s in shards] == [0, 1, 2]
    assert all(isinstance(s.embeddings, np.memmap) for s in shards)
    full = np.concatenate([np.asarray(s.embeddings) for s in shards])
    assert emb.shape == full.shape == (12, 512) and emb.dtype == np.float32 and len(emb) == 12
    assert paths == [p for s in shards for p in s.paths]
    assert [Path(p).name for p in paths] == sorted(p.name for p in SAMPLES.iterdir())
    np.testing.assert_array_equal(np.asarray(emb), full)
    for key in (0, -1, 7, slice(3, 11), slice(None, None, 3), [11, 0, 5], np.arange(12) % 2 == 0):
        np.testing.assert_array_equal(emb[key], full[key])
    np.testing.assert_array_equal(emb[2:9, :4], full[2:9, :4])
    np.testing.assert_allclose(emb @ full[0], full @ full[0], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert sum(1 for _ in emb) == 12
    with pytest.raises(IndexError):
        emb[12]
    fails = [f for s in shards for f in s.failures]
    assert sorted(f["reason"] for f in fails) == ["empty", "not_an_image"]


def test_load_embeddings_on_a_non_run_names_the_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_embeddings(tmp_path)


def test_inspect_summary_and_verify(run_dir):
    s = summarize(run_dir)
    assert s["complete"] and s["counts"] == {"listed": 14, "total": 14, "embedded": 12, "failed": 2, "resolved": 14}
    assert s["shards"]["complete"] == s["shards"]["expected"] == 3
    assert s["failures_by_reason"] == {"empty": 1, "not_an_image": 1}
    assert s["synthetic_weights"] and s["dim"] == 512
    assert verify(run_dir) == []
    r = invoke("inspect", run_dir, "--verify")
    assert r.exit_code == 0, r.output
    assert "verify:   OK" in r.output and "empty 1, not_an_image 1" in r.output
    r = invoke("inspect", run_dir, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["counts"]["embedded"] == 12


@pytest.mark.parametrize("damage,expect", [
    ("nan", "NaN/inf"), ("norm", "not unit-norm"), ("paths", "do not match the input listing"),
    ("rows", "paths in part-00001.paths for"), ("npy", "cannot be read"),
])
def test_verify_finds_damage(run_dir, tmp_path, damage, expect):
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    d = out / rundir.EMB_DIR
    arr = np.load(d / "part-00001.npy")
    if damage == "nan":
        arr[1, 3] = np.nan
        np.save(d / "part-00001.npy", arr)
    elif damage == "norm":
        np.save(d / "part-00001.npy", arr * 2)
    elif damage == "paths":
        lines = (d / "part-00001.paths").read_bytes().splitlines()
        (d / "part-00001.paths").write_bytes(b"\n".join(lines[::-1]) + b"\n")
    elif damage == "rows":
        np.save(d / "part-00001.npy", arr[:-1])
    elif damage == "npy":
        (d / "part-00001.npy").write_bytes(b"garbage")
    problems = verify(out)
    assert any(expect in p and "part-00001" in p for p in problems), problems
    r = invoke("inspect", out, "--verify")
    assert r.exit_code == 1 and expect in r.output


def test_inspect_incomplete_run_exits_3(run_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    m = json.loads((out / "manifest.json").read_text())
    m["status"] = "interrupted"
    (out / "manifest.json").write_text(json.dumps(m))
    (out / rundir.EMB_DIR / "part-00002.npy").unlink()
    r = invoke("inspect", out)
    assert r.exit_code == 3
    assert "NOT complete" in r.output and "missing [2]" in r.output and "resumes" in r.output


def test_report_json_contents(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    for key in ("wall_s", "images_per_s", "per_stage", "timeline", "failures_by_reason", "devices",
                "versions", "synthetic_weights", "queue_occupancy"):
        assert key in rep, key
    assert rep["failures_by_reason"] == {"empty": 1, "not_an_image": 1}
    assert rep["synthetic_weights"] is True and rep["devices"] == ["cpu:0"]
    assert set(rep["per_stage"]) == {"decode", "infer", "sink"}
    # final stats are collected after the workers stop: every input passed decode and infer
    assert rep["per_stage"]["decode"]["items_in"] == 14
    assert rep["per_stage"]["infer"]["items_in"] == 12
    # into the devices: the credit window, (1 + queues.infer_batches) x batch_size per device
    assert rep["queue_occupancy"]["capacity"]["infer"] == (1 + 1) * json.loads(
        (run_dir / "manifest.json").read_text())["config"]["model"]["batch_size"]
    assert {k: v for k, v in rep["queue_occupancy"]["capacity"].items() if k != "infer"} == {"decode": 64, "sink": 16}
    last = rep["timeline"][-1]
    assert last["done"] == 14 and set(last["queues"]) == {"decode", "infer", "sink"}
    assert "numpy" in rep["versions"]


def test_report_html_and_png(run_dir, tmp_path):
    html_path, png_path = tmp_path / "r.html", tmp_path / "r.png"
    r = invoke("report", run_dir, "--html", html_path, "--png", png_path)
    assert r.exit_code == 0, r.output
    assert "bottleneck" in r.output and "decode" in r.output
    page = html_path.read_text()
    svgs = re.findall(r"<svg.*?</svg>", page, re.DOTALL)
    assert len(svgs) == 3  # throughput, utilisation, queue fill
    for svg in svgs:
        ET.fromstring(svg)  # well-formed
    assert "<script" not in page and "https://" not in page
    assert "SYNTHETIC" in page and "not_an_image 1" in page
    from PIL import Image

    with Image.open(png_path) as im:
        assert im.size[0] == 1000 and im.size[1] > 500


def test_report_without_run_or_report(tmp_path):
    r = invoke("report", tmp_path)
    assert r.exit_code == 2 and "holds no clip-pipeline run" in r.output
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "clip-pipeline/1"}))
    r = invoke("report", tmp_path)
    assert r.exit_code == 2 and "report.json does not exist" in r.output


def test_queue_fill_counts_in_transit_messages():
    sample = {"source": StageSample(items_out=100), "decode": StageSample(items_in=40, items_out=35, sink_out=2),
              "infer": StageSample(items_in=30, sink_out=3), "sink": StageSample(items_in=4)}
    assert queue_fill(sample, ["source", "decode", "infer", "sink"]) == {"decode": 60, "infer": 5, "sink": 1}
    # a stale upstream count never shows a negative fill
    assert queue_fill({"decode": StageSample(items_in=5)}, ["source", "decode"]) == {"decode": 0}


def test_bottleneck_line_wording():
    prev = {"decode": StageSample(workers=2), "infer": StageSample(workers=1)}
    cur = {"decode": StageSample(busy_s=1.96, workers=2), "infer": StageSample(busy_s=0.38, workers=1)}
    util = utilisation(prev, cur, 1.0)
    line = bottleneck_line(util, {"decode": 3, "infer": 0}, {"decode": 128, "infer": 128})
    assert line.startswith("decode-bound: infer 38% busy | busy decode 98% infer 38%")
    assert line.endswith("| queue decode 3/128 infer 0/128")
    assert bottleneck_line({"decode": 0.5, "infer": 0.97}).startswith("infer-bound: infer 97% busy")
    assert bottleneck_line({"decode": 0.1, "infer": 0.05}).startswith("input-bound: infer 5% busy")
    assert bottleneck_line({}) == "starting"


def test_progress_log_mode_and_quiet(tmp_path):
    """--progress=log prints plain lines; --quiet prints nothing on success (real CLI, fake backend)."""
    imgs = tmp_path / "imgs"
    shutil.copytree(SAMPLES, imgs)
    common = [sys.executable, "-m", "pipeline.cli", "run", "-i", str(imgs), "--set", 'infer.backend="fake"',
              "--set", "run.log_interval_s=0.1"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    p = subprocess.run(common + ["-o", str(tmp_path / "o1"), "--progress", "log"], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=False, timeout=120)
    assert p.returncode == 0, p.stderr
    assert re.search(r"\[clip-pipeline\] 12/12 images, [\d.]+ img/s, ETA 0s, 0 failed \| ", p.stderr), p.stderr
    assert "\r" not in p.stderr  # no bar when asked for log lines
    q = subprocess.run(common + ["-o", str(tmp_path / "o2"), "--quiet"], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=False, timeout=120)
    assert q.returncode == 0 and q.stdout == "" and q.stderr == "", (q.stdout, q.stderr)


def test_dry_run_lists_inputs_and_devices(tmp_path):
    r = invoke("run", "--dry-run", "-i", SAMPLES, "-o", tmp_path / "o", "--set", 'infer.backend="fake"',
               "-d", "cpu:0", "-d", "cpu:1")
    assert r.exit_code == 0, r.output
    assert "inputs: 12 files" in r.output and "devices: cpu:0, cpu:1" in r.output
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_devices_lists_every_backend(monkeypatch, tmp_path):
    # sophon.sail not importable (whatever earlier tests put on the path) and no real SAIL built
    # for the cmodel (whatever this machine has): sail must say why
    monkeypatch.setitem(sys.modules, "sophon", None)
    monkeypatch.setitem(sys.modules, "sophon.sail", None)
    monkeypatch.setenv("CLIP_PIPELINE_SAIL_CMODEL", str(tmp_path / "no-build"))
    r = invoke("devices")
    assert r.exit_code == 0, r.output
    names = [line.split()[0] for line in r.output.splitlines()]
    assert names == ["cpu", "openvino", "sail", "sim", "fake"]
    assert re.search(r"^cpu\s+available\s+devices: cpu:0", r.output, re.MULTILINE)
    lines = dict(zip(names, r.output.splitlines()))
    for line in lines.values():  # every line: name, state, devices, and (a reason)
        assert re.fullmatch(r"\w+\s+(available|unavailable)\s+devices: .+  \(.*\)", line), line
    assert re.fullmatch(r"sail\s+unavailable\s+devices: -  \(.+\)", lines["sail"]), lines["sail"]
    # with real SAIL built for the BM1684X cmodel (scripts/setup_sail_cmodel.sh), sail lists it
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "stamp").write_text("x")
    monkeypatch.setenv("CLIP_PIPELINE_SAIL_CMODEL", str(tmp_path / "build"))
    line = next(ln for ln in invoke("devices").output.splitlines() if ln.startswith("sail "))
    assert re.fullmatch(r"sail\s+available\s+devices: sail:0 \(BM1684X cmodel\)  \(.*sail.runtime = \"cmodel\".*\)", line), line
