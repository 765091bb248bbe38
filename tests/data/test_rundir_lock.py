"""One process per output directory (pipeline/data/rundir.py output_lock): a second one is refused at once,
naming the holder, and the lock dies with its holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, cli, cli_env
from robust_helpers import accounting, good_corpus, output_tree, run_cli, start_cli, wait_for, workers


def _refused_beside(p, inp, out, **sets) -> None:
    for extra in ((), ("--restart",), ("--update",)):
        t0 = time.monotonic()
        r = run_cli(inp, out, *extra, timeout=60, **sets)
        assert r.returncode == 2, (extra, r.stderr)
        assert f"pid {p.pid} on host" in r.stderr and "is in use" in r.stderr and "Traceback" not in r.stderr
        assert time.monotonic() - t0 < 30  # at once (generous: a loaded CI machine); scripts/check_output_lock.py times it


def test_second_process_on_one_output_is_refused_at_once(tmp_path):
    """Two runs 0.6 s apart on one OUT interleaved their listings and shards; a --restart beside a
    run deleted its files. Now the second process (run, --restart, --update) exits 2 at once naming
    the holder; inspect reads meanwhile and says who holds it; the first finishes intact."""
    good = good_corpus(tmp_path / "in", 200)
    out = tmp_path / "out"
    slow = {"fake.latency_ms_per_batch": 300}
    p = start_cli(tmp_path / "in", out, **slow)
    wait_for(lambda: workers(out).get("source-0"), 60, "the first run's workers")
    _refused_beside(p, tmp_path / "in", out, **slow)
    r = subprocess.run(cli("inspect", str(out)), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and f"in use:   clip-pipeline run, pid {p.pid} on host" in r.stdout, r.stdout + r.stderr
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    embedded, failed = accounting(out)
    assert set(embedded) == {str(x) for x in good} and not failed


@pytest.mark.slow
def test_refused_process_leaves_a_clean_runs_bytes_and_kill_frees_the_lock(tmp_path):
    good_corpus(tmp_path / "in", 200)
    out = tmp_path / "out"
    slow = {"fake.latency_ms_per_batch": 300}
    p = start_cli(tmp_path / "in", out, **slow)
    wait_for(lambda: workers(out).get("source-0"), 60, "the first run's workers")
    _refused_beside(p, tmp_path / "in", out, **slow)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    first = output_tree(out)
    out.rename(tmp_path / "first")
    assert run_cli(tmp_path / "in", out, **slow).returncode == 0
    assert output_tree(out) == first

    # the lock dies with its holder: kill -9, then the same command resumes to the same bytes
    p = start_cli(tmp_path / "in", out, "--restart", **slow)
    wait_for(lambda: workers(out).get("source-0"), 60, "the third run's workers")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = run_cli(tmp_path / "in", out, **slow)
    assert r.returncode == 0, r.stderr
    assert output_tree(out) == first


def test_lock_is_reentrant_in_one_process_and_exclusive_across(tmp_path):
    from pipeline.data import rundir

    with rundir.output_lock(tmp_path / "o"):
        with rundir.output_lock(tmp_path / "o"):
            pass
        code = ("import sys; from pipeline.data import rundir\n"
                "try:\n  with rundir.output_lock(sys.argv[1]): pass\n"
                "except rundir.ConfigError as e: print(e); sys.exit(2)\n")
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], env=cli_env(), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and f"pid {os.getpid()} on host" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], env=cli_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
