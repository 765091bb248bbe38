"""`run --cluster ray` on Ray's own multi-node test cluster (ray.cluster_utils.Cluster): a head
and 3 nodes on this machine, each with clip_slot=1 and two fake devices, every process on
127.0.0.1 (tests/ray_helpers.py). Slow: Ray start-up alone is ~10 s; always torn down."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from cluster_helpers import RANGE_SHARDS, assert_same_as_reference, corpus, reference, sets, start
from robust_helpers import wait_for

pytestmark = pytest.mark.slow

ray_helpers = pytest.importorskip("ray_helpers")
ray_helpers.set_loopback_env()
pytest.importorskip("ray", reason="the optional extra is not installed: pip install -e '.[cluster]'")


def cfg_for(inp: Path, out: Path, **extra: object):
    from pipeline.config import load

    args = sets(**{"cluster.range_shards": RANGE_SHARDS, **extra})
    return load(None, [a for a in args if a != "--set"], input_paths=[str(inp)], output_dir=str(out))


@pytest.fixture(scope="module")
def rc():
    with ray_helpers.local_cluster(nodes=3, devices_per_node=2) as (cluster, nodes):
        yield cluster, nodes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("ray")
    inp = corpus(base, n_good=39)  # 40 inputs: 5 ranges of 8
    return inp, reference(inp, base / "ref")


def run_driver(cfg, logs: list[str]):
    from pipeline.cluster.ray_runner import run_on_ray

    return run_on_ray(cfg, log=logs.append)


def records(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "ranges").glob("r-*.json"))}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped) is dead too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_ray_run_equals_one_host_and_a_rerun_is_a_no_op(rc, data, tmp_path):
    inp, ref = data
    out = tmp_path / "out"
    logs: list[str] = []
    code, msg = run_driver(cfg_for(inp, out), logs)
    assert code == 3, (msg, logs)
    assert_same_as_reference(out, ref)
    recs = records(out)
    assert len(recs) == 5 and all(r["engine_node"] for r in recs.values())
    assert ray_helpers.non_loopback_connections() == []
    # rerun after success: nothing submitted, the commits untouched
    logs.clear()
    code, msg = run_driver(cfg_for(inp, out), logs)
    assert code == 3 and "0 run now" in msg
    assert records(out) == recs
    report = json.loads((out / "report.json").read_text())
    assert report["cluster"]["driver"]["submitted"] == 0 and report["cluster"]["driver"]["skipped_committed"] == 5


def test_node_removed_mid_range_redoes_the_range_elsewhere(rc, data, tmp_path):
    cluster, nodes = rc
    inp, ref = data
    out = tmp_path / "out"
    cfg = cfg_for(inp, out, **{"fake.latency_ms_per_batch": 700, "model.batch_size": 2})
    logs: list[str] = []
    result: list = []
    t = threading.Thread(target=lambda: result.append(run_driver(cfg, logs)), daemon=True)
    t.start()

    def running_attempt():  # an attempt with a shard on disk, another still to come, and no commit yet
        for info in (out / "attempts").glob("r-*/*.attempt.json"):
            a = json.loads(info.read_text())
            adir = info.with_name(info.name.removesuffix(".attempt.json"))
            # not all of its shards: one with every shard written may commit before the node is gone
            # (a race the test lost once the workers' exit got faster)
            if 0 < len(list((adir / "embeddings").glob("part-*.npy"))) < RANGE_SHARDS \
                    and not (out / "ranges" / f"r-{a['range']:05d}.json").exists():
                return a
        return None
    victim_attempt = wait_for(running_attempt, 120, "a range attempt with one shard written", interval=0.1)
    victim = next(n for n in nodes if n.node_id == victim_attempt["engine_node"])
    workers_file = out / "attempts" / f"r-{victim_attempt['range']:05d}" / victim_attempt["attempt"] / ".workers.json"
    pids = {victim_attempt["pid"], *json.loads(workers_file.read_text()).values()} if workers_file.exists() \
        else {victim_attempt["pid"]}
    cluster.remove_node(victim, allow_graceful=False)
    nodes.remove(victim)
    try:
        t.join(240)
        assert not t.is_alive(), logs
        code, msg = result[0]
        assert code == 3, (msg, logs)
        assert_same_as_reference(out, ref)  # every input exactly once, byte-identical
        rec = records(out)[f"r-{victim_attempt['range']:05d}.json"]
        assert rec["engine_node"] != victim.node_id and rec["attempt"] != victim_attempt["attempt"]
        # the dead node's pipeline processes died with it (parent-death signal, process group)
        wait_for(lambda: not any(alive(p) for p in pids), 30, f"the removed node's pipeline processes {pids} to exit")
    finally:
        nodes.append(cluster.add_node(**ray_helpers.NODE_ARGS, resources={"clip_slot": 1, "fake_device": 2}))


def test_driver_killed_mid_run_then_rerun_keeps_committed_ranges(rc, data, tmp_path):
    import signal

    cluster, _ = rc
    inp, ref = data
    out = tmp_path / "out"
    args = ["run", "--cluster", "ray", "--address", cluster.address, "-i", str(inp), "-o", str(out), "--progress", "none",
            *sets(**{"cluster.range_shards": RANGE_SHARDS, "fake.latency_ms_per_batch": 400, "model.batch_size": 2})]
    driver = start(*args, env_extra=ray_helpers.LOOPBACK_ENV)
    try:
        wait_for(lambda: len(list((out / "ranges").glob("r-*.json"))) >= 1 if (out / "ranges").exists() else False,
                 150, "a first committed range")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(10)
    first = records(out)
    assert 1 <= len(first) < 5, "the driver should have been killed mid-run"
    time.sleep(1)
    logs: list[str] = []
    code, msg = run_driver(cfg_for(inp, out, **{"fake.latency_ms_per_batch": 400, "model.batch_size": 2}), logs)
    assert code == 3, (msg, logs)
    after = records(out)
    for name, rec in first.items():
        assert after[name] == rec  # not redone
    report = json.loads((out / "report.json").read_text())["cluster"]["driver"]
    assert report["skipped_committed"] >= len(first)
    assert_same_as_reference(out, ref)


def add_node_with_host_config(cluster, tmp_path: Path, toml: str):
    hc = tmp_path / "host.toml"
    hc.write_text(toml)
    return cluster.add_node(**ray_helpers.NODE_ARGS, resources={"clip_slot": 1, "fake_device": 2},
                            env_vars={"CLIP_PIPELINE_HOST_CONFIG": str(hc)})


def test_host_without_the_model_fails_its_ranges_and_the_rest_go_on(rc, tiny_model, data, tmp_path):
    cluster, nodes = rc
    inp, _ = data
    bad = add_node_with_host_config(cluster, tmp_path, f'[model]\npath = "{tmp_path}/missing/tiny.onnx"\n')
    out = tmp_path / "out"
    try:
        cfg = cfg_for(inp, out, **{"infer.backend": "cpu", "model.path": str(tiny_model), "cluster.max_attempts": 4})
        logs: list[str] = []
        code, msg = run_driver(cfg, logs)
        assert code == 3, (msg, logs)
        from pipeline.output import load_embeddings

        paths, emb = load_embeddings(out)
        listing = [json.loads(ln) for ln in (out / "listing.jsonl").read_text().splitlines()]
        assert sorted(paths) == sorted(p for p in listing if not p.endswith("zz_bad.jpg"))
        assert all(r["engine_node"] != bad.node_id for r in records(out).values())
        # 4 slots, 5 ranges: the first 4 go one per node, so the bad host got one and failed it
        failed_here = [m for m in logs if bad.node_id[:8] in m]
        assert failed_here and all("missing/tiny.onnx" in m and "does not exist" in m and "on host" in m
                                   for m in failed_here), logs
    finally:
        cluster.remove_node(bad)


def test_straggler_gets_a_duplicate_and_the_first_commit_wins(rc, data, tmp_path):
    cluster, _ = rc
    inp, ref = data
    slow = add_node_with_host_config(cluster, tmp_path, "[fake]\nlatency_ms_per_batch = 15000.0\n")
    out = tmp_path / "out"
    try:
        cfg = cfg_for(inp, out, **{"cluster.straggler_factor": 1.5, "cluster.straggler_min_s": 1.0,
                                   "fake.latency_ms_per_batch": 50})
        logs: list[str] = []
        code, msg = run_driver(cfg, logs)
        assert code == 3, (msg, logs)
        assert_same_as_reference(out, ref)
        report = json.loads((out / "report.json").read_text())["cluster"]["driver"]
        # 4 slots, 5 ranges: the slow node got one of the first four; its duplicate won
        assert report["duplicates"] >= 1, logs
        assert all(r["engine_node"] != slow.node_id for r in records(out).values()), logs
    finally:
        cluster.remove_node(slow)


def test_hung_range_is_cut_by_the_per_range_timeout(rc, data, tmp_path):
    cluster, _ = rc
    inp, ref = data
    hung = add_node_with_host_config(cluster, tmp_path, "[fake]\nhang_on_batch = 1\n")
    out = tmp_path / "out"
    try:
        cfg = cfg_for(inp, out, **{"cluster.range_timeout_s": 20.0, "cluster.straggler_factor": 0.0})
        logs: list[str] = []
        code, msg = run_driver(cfg, logs)
        assert code == 3, (msg, logs)
        assert_same_as_reference(out, ref)
        report = json.loads((out / "report.json").read_text())["cluster"]["driver"]
        assert report["timeouts"] >= 1, logs  # the hung node got one of the first four ranges
        assert all(r["engine_node"] != hung.node_id for r in records(out).values()), logs
    finally:
        cluster.remove_node(hung)
