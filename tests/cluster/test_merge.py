"""The engine-free cluster path (Slurm job arrays, or by hand): plan, run-range for every index
out of order, merge; idempotent reruns, concurrent attempts, refused mismatches, broken commits."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cluster_helpers import RANGE_SHARDS, SHARD, assert_same_as_reference, cli, corpus, reference, sets, start
from conftest import cli_env

from pipeline.cluster import commit as cm
from pipeline.cluster.merge import array_spec
from pipeline.cluster.plan import Plan


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    inp = corpus(base)
    return inp, reference(inp, base / "ref")


def plan(inp: Path, out: Path, *extra: str) -> None:
    r = cli("plan", "-i", str(inp), "-o", str(out), "--range-shards", str(RANGE_SHARDS), *sets(), *extra)
    assert r.returncode == 0, r.stderr
    assert "4 range(s) of 8" in r.stdout  # 31 inputs


def run_range(out: Path, r: int, *extra: str):
    return cli("run-range", "-o", str(out), "--range", str(r), "--progress", "none", *extra)


def test_plan_ids_and_names_are_fixed_by_the_plan():
    p = Plan(Path("/x"), {"run_id": "r", "inputs": 31, "shard_size": 4, "range_size": 8, "ranges": 4,
                          "range_shards": 2, "fingerprint": {}})
    assert [p.ids(r) for r in range(4)] == [(0, 8), (8, 16), (16, 24), (24, 31)]
    assert p.shards(3) == [6, 7] and p.n_shards == 8
    with pytest.raises(ValueError, match="range 4 does not exist"):
        p.ids(4)
    assert array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and array_spec([]) == ""


def test_every_range_by_hand_out_of_order_then_merge_equals_one_host(data, tmp_path):
    inp, ref = data
    out = tmp_path / "out"
    plan(inp, out)
    for r in (3, 1):
        res = run_range(out, r)
        assert res.returncode == 0 and "committed" in res.stdout, res.stderr
    st = cli("status", str(out), "--missing")
    assert st.stdout.strip() == "0,2"
    res = cli("merge", str(out))
    assert res.returncode == 4 and "0,2" in res.stderr and not (out / "manifest.json").exists()
    for r in (2, 0):
        res = run_range(out, r, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout.splitlines()[-1])["status"] == "committed"
    assert cli("status", str(out), "--missing").stdout.strip() == ""
    res = cli("merge", str(out))
    assert res.returncode == 3, res.stderr  # merged; the one bad input failed, as on one host
    assert_same_as_reference(out, ref)
    report = json.loads((out / "report.json").read_text())
    assert [r["range"] for r in report["cluster"]["ranges"]] == [0, 1, 2, 3] and report["wall_s"] >= 1
    assert report["counts"] == {"embedded": 30, "failed": 1, "listed": 31}

    # a rerun after success is a no-op: nothing redone, the commit untouched, merge idempotent
    before = {p: p.read_bytes() for p in (out / "ranges").iterdir()}
    attempts = sorted(p.name for p in (out / "attempts" / "r-00001").iterdir())
    res = run_range(out, 1)
    assert res.returncode == 0 and "already committed" in res.stdout
    assert sorted(p.name for p in (out / "attempts" / "r-00001").iterdir()) == attempts
    assert before == {p: p.read_bytes() for p in (out / "ranges").iterdir()}
    assert cli("merge", str(out)).returncode == 3
    assert_same_as_reference(out, ref)
    # the merged directory is an ordinary run: the same config on one host finds it complete
    res = cli("run", "-i", str(inp), "-o", str(out), "--progress", "none", *sets())
    assert res.returncode == 3, res.stderr
    assert_same_as_reference(out, ref)


def test_merge_carries_metadata_hashes_and_the_clip_retrieval_layout(tmp_path):
    """output.layout = "clip-retrieval" + output.content_hash: every shard's .parquet and .hashes
    companion is committed (size + sha256), published by merge, and the img_emb/ + metadata/
    folders are made as a single-host run makes them, byte for byte."""
    pytest.importorskip("pyarrow")
    extra = {"output.layout": "clip-retrieval", "output.content_hash": True}
    inp = corpus(tmp_path)
    ref = reference(inp, tmp_path / "ref", **extra)
    assert (ref / "img_emb").is_dir() and any((ref / "embeddings").glob("*.hashes"))
    out = tmp_path / "out"
    r = cli("plan", "-i", str(inp), "-o", str(out), "--range-shards", str(RANGE_SHARDS), *sets(**extra))
    assert r.returncode == 0, r.stderr
    for r in (2, 0, 3, 1):
        assert run_range(out, r).returncode == 0
    rec = json.loads(cm.record_path(out, 0).read_text())
    assert set(rec["shards"]["0"]["sha256"]) >= {".parquet", ".hashes", ".npy"}
    res = cli("merge", str(out))
    assert res.returncode == 3, res.stderr
    assert_same_as_reference(out, ref)
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == sorted(p.name for p in (ref / "img_emb").iterdir())


@pytest.mark.slow
def test_two_concurrent_attempts_commit_once(data, tmp_path):
    inp, ref = data
    out = tmp_path / "out"
    plan(inp, out)
    procs = [start("run-range", "-o", str(out), "--range", "1", "--json") for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    status = sorted(json.loads(o.splitlines()[-1])["status"] for o, _ in outs)
    # both ran the pipeline (or one saw the other's commit first): exactly one commit either way
    assert status in (["committed", "lost"], ["committed", "done"])
    rec = json.loads((out / "ranges" / "r-00001.json").read_text())
    left = [p.name for p in (out / "attempts" / "r-00001").iterdir() if p.is_dir()]
    assert left == [rec["attempt"]]  # the loser deleted its own attempt
    assert not [p for p in (out / "ranges").iterdir() if p.name.startswith(".")]
    for r in (0, 2, 3):
        assert run_range(out, r).returncode == 0
    assert cli("merge", str(out)).returncode == 3
    assert_same_as_reference(out, ref)


def test_commit_if_absent_has_one_winner_among_racing_threads(tmp_path):
    n = 8
    barrier = threading.Barrier(n)
    won: list[bool] = [False] * n

    def attempt(i: int) -> None:
        barrier.wait()
        won[i] = cm.commit(tmp_path, 5, {"attempt": f"a{i}", "value": i})
    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(won) == 1
    rec = json.loads(cm.record_path(tmp_path, 5).read_text())
    assert rec["value"] == won.index(True)
    assert [p.name for p in (tmp_path / "ranges").iterdir()] == ["r-00005.json"]  # no temp files left


def test_different_model_or_listing_over_the_same_output_is_refused(data, tmp_path):
    inp, _ = data
    out = tmp_path / "out"
    plan(inp, out)
    plan(inp, out)  # same inputs and model: the plan is reused
    r = cli("plan", "-i", str(inp), "-o", str(out), "--range-shards", str(RANGE_SHARDS), *sets(**{"fake.dim": 8}))
    assert r.returncode == 2 and "different model_sha256" in r.stderr
    r = run_range(out, 0, "--set", "fake.dim=8")
    assert r.returncode == 2 and "on host" in r.stderr and "model_sha256" in r.stderr
    r = cli("plan", "-i", str(inp), "-o", str(out), "--range-shards", "3", *sets())
    assert r.returncode == 2 and "range_shards" in r.stderr
    inp2 = tmp_path / "in2"
    import shutil

    shutil.copytree(inp, inp2)
    r = cli("plan", "-i", str(inp2), "-o", str(out), "--range-shards", str(RANGE_SHARDS), *sets())
    assert r.returncode == 2 and "inputs" in r.stderr  # another input path: a different run
    single = tmp_path / "single"
    assert cli("run", "-i", str(inp), "-o", str(single), "--progress", "none", *sets()).returncode == 3
    r = cli("plan", "-i", str(inp), "-o", str(single), "--range-shards", str(RANGE_SHARDS), *sets())
    assert r.returncode == 2 and "single-host run" in r.stderr
    assert not list(Path(out / "ranges").glob("*")) if (out / "ranges").exists() else True


def test_inputs_changed_since_the_plan_are_refused(tmp_path):
    inp = corpus(tmp_path, n_good=6)
    out = tmp_path / "out"
    r = cli("plan", "-i", str(inp), "-o", str(out), *sets())
    assert r.returncode == 0, r.stderr
    (inp / "a" / "zz_new.jpg").write_bytes((inp / "a" / "img_0000.jpg").read_bytes())
    r = cli("plan", "-i", str(inp), "-o", str(out), *sets())
    assert r.returncode == 2 and "inputs changed since the plan" in r.stderr


@pytest.mark.slow
def test_broken_commit_is_caught_by_merge_and_redone_by_run_range(data, tmp_path):
    inp, ref = data
    out = tmp_path / "out"
    plan(inp, out)
    for r in range(4):
        assert run_range(out, r).returncode == 0
    rec = json.loads((out / "ranges" / "r-00002.json").read_text())
    npy = out / rec["dir"] / "embeddings" / f"part-{2 * RANGE_SHARDS:05d}.npy"
    data_ = bytearray(npy.read_bytes())
    data_[-1] ^= 0xFF  # same size, different content: only the checksum sees it
    npy.write_bytes(bytes(data_))
    r = cli("merge", str(out))
    assert r.returncode == 4 and "range 2" in r.stderr and "sha256" in r.stderr
    assert not (out / "manifest.json").exists()
    # files lost under a commit: run-range sets the record aside and redoes the range
    npy.unlink()
    r = run_range(out, 2)
    assert r.returncode == 0 and "committed" in r.stdout, r.stderr
    assert json.loads((out / "ranges" / "r-00002.json").read_text())["attempt"] != rec["attempt"]
    assert cli("merge", str(out)).returncode == 3
    assert_same_as_reference(out, ref)
    assert sorted(p.name for p in (out / "attempts" / "r-00002").iterdir() if p.is_dir()) == \
        [json.loads((out / "ranges" / "r-00002.json").read_text())["attempt"]]  # merge removed the dead attempt


@pytest.mark.slow
def test_the_same_attempt_name_resumes_its_shards(data, tmp_path):
    inp, _ = data
    out = tmp_path / "out"
    plan(inp, out)
    assert run_range(out, 0, "--attempt", "slurm-7-0").returncode == 0
    adir = out / "attempts" / "r-00000" / "slurm-7-0"
    (out / "ranges" / "r-00000.json").unlink()
    for suffix in (".npy", ".paths", ".failures.jsonl"):
        (adir / "embeddings" / f"part-00001{suffix}").unlink()
    r = run_range(out, 0, "--attempt", "slurm-7-0")
    assert r.returncode == 0, r.stderr
    report = json.loads((adir / "report.json").read_text())
    assert report["resumed_from"] == SHARD  # shard 0 kept, shard 1 redone


def test_run_range_needs_a_plan_and_a_valid_index(data, tmp_path):
    inp, _ = data
    r = run_range(tmp_path / "none", 0)
    assert r.returncode == 2 and "clip-pipeline plan" in r.stderr
    out = tmp_path / "out"
    plan(inp, out)
    r = run_range(out, 4)
    assert r.returncode == 2 and "0..3" in r.stderr


@pytest.mark.slow
def test_run_range_takes_the_index_from_slurm(data, tmp_path):
    inp, _ = data
    out = tmp_path / "out"
    plan(inp, out)
    r = cli("run-range", "-o", str(out), env_extra={"SLURM_ARRAY_TASK_ID": "3"})
    assert r.returncode == 0 and "range 3 committed" in r.stdout


def test_cluster_ray_without_ray_installed_names_the_extra(data, tmp_path):
    import subprocess
    import sys

    from robust_helpers import ROOT, env

    inp, _ = data
    code = ("import sys; sys.modules['ray'] = None; from pipeline.cli import main; "
            f"sys.argv = ['clip-pipeline', 'run', '--cluster', 'ray', '-i', {str(inp)!r}, '-o', {str(tmp_path / 'o')!r}]"
            f" + {sets()!r}; main()")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "clip-pipeline[cluster]" in lines[0], r.stderr


def test_merge_never_deletes_a_running_attempts_directory(tmp_path):
    """merge's clean-up of attempt directories no commit refers to spared nothing: a duplicate
    attempt still running lost its files. A directory whose run holds the lock is kept."""
    from types import SimpleNamespace

    from pipeline.cluster import commit as cm
    from pipeline.cluster.merge import remove_stale_attempts

    root = tmp_path / cm.ATTEMPTS_DIR / "r00000"
    running, dead = root / "a-running", root / "a-dead"
    for d in (running, dead):
        d.mkdir(parents=True)
        (root / f"{d.name}.attempt.json").write_text("{}")
    code = ("import sys, time; from pipeline.data import rundir\n"
            "with rundir.output_lock(sys.argv[1], 'run-range'):\n  print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(running)], env=cli_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert remove_stale_attempts(SimpleNamespace(out=tmp_path), {}) == 1
        assert running.is_dir() and (root / "a-running.attempt.json").exists()
        assert not dead.exists() and not (root / "a-dead.attempt.json").exists()
    finally:
        holder.kill()
        holder.wait()
