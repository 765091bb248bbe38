"""Dying workers and failing devices: kill -9 of each stage mid-run, poison inputs, bad devices.

Each test runs the real CLI with the fake backend (latency per batch keeps it running long enough
to kill something mid-run), then checks the exact accounting: every listed input is embedded or
failed exactly once, with the expected reasons, and the shards are byte-identical to an
uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from robust_helpers import (
    accounting,
    assert_exact,
    good_corpus,
    run_cli,
    shards_done,
    start_cli,
    wait_for,
    workers,
)

N_GOOD = 40
# Small queues so that upstream workers really hold in-flight items when one is killed.
SMALL_QUEUES = {"queues.decode": 2, "queues.preprocess": 2, "queues.infer": 2, "queues.sink": 2}


def make_inputs(d: Path) -> tuple[set[str], dict[str, str]]:
    good = {str(p) for p in good_corpus(d, N_GOOD)}
    (d / "zz_empty.jpg").write_bytes(b"")
    (d / "zz_text.jpg").write_bytes(b"not an image\n")
    return good, {str(d / "zz_empty.jpg"): "empty", str(d / "zz_text.jpg"): "not_an_image"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults") / "in"
    good, bad = make_inputs(d)
    ref = d.parent / "ref"
    r = run_cli(d, ref, **SMALL_QUEUES)
    assert r.returncode == 3, r.stderr
    assert "Completed with 2 failures" in r.stdout
    assert_exact(ref, good, bad)
    return d, good, bad, ref


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "embeddings").iterdir())}


def same_output(a: Path, b: Path) -> None:
    assert shard_bytes(a) == shard_bytes(b)
    for name in ("failures.jsonl", "listing.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("role,sets", [
    ("decode", {"workers.decode": 2}),
    ("preprocess", {"workers.fuse_decode_preprocess": False}),
    ("infer", {}),
    ("sink", {}),
    pytest.param("source", {}, marks=pytest.mark.slow),
])
def test_kill_9_one_worker_mid_run(corpus, tmp_path, role, sets):
    d, good, bad, ref = corpus
    out = tmp_path / "out"
    proc = start_cli(d, out, **{**SMALL_QUEUES, "fake.latency_ms_per_batch": 60, **sets})
    try:
        wait_for(lambda: shards_done(out) >= 1, 60, "the first shard")
        name, pid = next((n, p) for n, p in workers(out).items() if n.startswith(role + "-"))
        os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, stderr
    assert f"{name} died" in stderr
    assert not (out / ".workers.json").exists()  # removed at the end of the run
    assert_exact(out, good, bad)
    same_output(out, ref)
    assert shards_done(out) == shards_done(ref)


def test_input_that_kills_its_worker_twice_fails_as_crashed_worker(corpus, tmp_path):
    d, good, bad, _ = corpus
    poison = sorted(good)[5]
    out = tmp_path / "out"
    r = run_cli(d, out, env_extra={"CLIP_PIPELINE_TEST_CRASH_ON": os.path.basename(poison)}, **SMALL_QUEUES)
    assert r.returncode == 3, r.stderr
    assert "Completed with 3 failures" in r.stdout
    assert_exact(out, good - {poison}, {**bad, poison: "crashed_worker"})
    _, failed = accounting(out)
    assert failed[poison] == "crashed_worker"
    assert r.stderr.count("decode-0 died") == 2


@pytest.mark.parametrize("fault, says", [
    ({"fake.fail_on_batch": 2}, "injected failure on batch 2"),  # a DeviceError: retried on a fresh worker
    ({"fake.exit_on_batch": 3}, "infer-0(cpu:0) died"),  # the device process exits hard
    ({"fake.hang_on_batch": 2, "run.stall_timeout_s": 1.0}, "run.stall_timeout_s"),  # hangs: killed when stalled
], ids=["device_error", "hard_exit", "hung_device"])
def test_device_fault_is_recovered_with_exact_output(corpus, tmp_path, fault, says):
    d, good, bad, ref = corpus
    out = tmp_path / "out"
    r = run_cli(d, out, **SMALL_QUEUES, **fault)
    assert r.returncode == 3, r.stderr
    assert says in r.stderr
    assert_exact(out, good, bad)
    same_output(out, ref)


def test_permanently_failing_device_is_taken_out(corpus, tmp_path):
    d, good, bad, ref = corpus
    out = tmp_path / "out"
    # the run must outlast two restarts of cpu:1 (each a process start): on a loaded machine
    # starts are slower, so the healthy device's batches are made slower by the load per core
    latency = int(400 * min(5.0, max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))))
    r = run_cli(d, out, "-d", "cpu:0", "-d", "cpu:1", **SMALL_QUEUES,
                **{"fake.fail_devices": ["cpu:1"], "run.max_restarts": 1,
                   "fake.latency_ms_per_batch": latency})
    assert r.returncode == 3, r.stderr
    assert "device cpu:1 failed 2 times; taking it out of the run (1 device(s) left)" in r.stderr
    assert_exact(out, good, bad)
    same_output(out, ref)
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["removed_devices"] == ["cpu:1"]


def test_no_device_left_stops_with_a_clear_error(corpus, tmp_path):
    d, _, _, _ = corpus
    out = tmp_path / "out"
    r = run_cli(d, out, "-d", "cpu:0", "-d", "cpu:1", **SMALL_QUEUES,
                **{"fake.fail_devices": ["cpu:0", "cpu:1"], "run.max_restarts": 1})
    assert r.returncode == 4, r.stderr
    assert "every device failed" in r.stderr
    assert "fake.fail_devices" in r.stderr  # the device's own error is named
    assert "run the same command again to resume" in r.stderr
    # no device ever embedded anything: a shard can only be complete if all its inputs failed at decode
    from pipeline.output import iter_shards

    assert all(s.embeddings.shape[0] == 0 for s in iter_shards(out))


@pytest.mark.slow
def test_source_killed_now_and_then_does_not_abort_the_run(tmp_path):
    """source-0 never sent "ready", so its deaths counted "in a row" for the whole run: 4 kills
    spread over a run aborted it. It now gets ready like every worker."""
    good_corpus(tmp_path / "in", 400)
    out = tmp_path / "out"
    p = start_cli(tmp_path / "in", out, **{"fake.latency_ms_per_batch": 300, "queues.decode": 4,
                                           "workers.items_per_message": 1})
    pid = wait_for(lambda: workers(out).get("source-0"), 60, "source-0")
    for _ in range(5):  # one more than run.max_restarts = 3 allows in a row
        os.kill(pid, signal.SIGKILL)

        def respawned(old=pid):
            assert p.poll() is None, p.communicate()[1]
            now = workers(out).get("source-0")
            return now if now not in (None, old) else None

        pid = wait_for(respawned, 30, "a new source-0")
        time.sleep(3)  # the kills came 2.5 s apart: time for the new source to get ready
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr
    embedded, failed = accounting(out)
    assert len(embedded) == 400 and not failed
