"""Sockets' private directories (pipeline/wire/transport.py): owned, and removed once their owner is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from robust_helpers import good_corpus, run_cli, start_cli, wait_for, workers


def test_stale_socket_directories_of_dead_runs_are_removed(tmp_path):
    """kill -9 leaves /tmp/clipp-XXXX behind; the next run removes those whose owner is dead (pid
    and start time), never a live one's or one without an owner record."""
    from pipeline.wire import transport

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    made = []
    for owner in (f"{dead.pid} 1", f"{os.getpid()} {transport.process_start(os.getpid())}",
                  f"{os.getpid()} 1", None):  # dead; alive; pid reused by another process; no record
        d = transport.tempfile.mkdtemp(prefix="clipp-", dir="/tmp")
        if owner is not None:
            with open(os.path.join(d, transport.OWNER), "w") as fh:
                fh.write(owner + "\n")
        made.append(d)
    try:
        removed = transport.remove_stale_roots()
        assert made[0] in removed and made[2] in removed
        assert os.path.isdir(made[1]) and os.path.isdir(made[3])
        ep = transport.Endpoints.create()  # every run records its owner
        assert open(os.path.join(ep.root, transport.OWNER)).read().split()[0] == str(os.getpid())
        ep.cleanup()
    finally:
        for d in made:
            transport.shutil.rmtree(d, ignore_errors=True)


def test_killed_run_leaves_no_socket_directory_behind_the_next(tmp_path):
    good_corpus(tmp_path / "in", 40)
    p = start_cli(tmp_path / "in", tmp_path / "out", **{"fake.latency_ms_per_batch": 200})
    wait_for(lambda: workers(tmp_path / "out").get("infer-0(cpu:0)"), 60, "the workers")
    roots = {d for d in os.listdir("/tmp") if d.startswith("clipp-")
             if _owner(f"/tmp/{d}") == p.pid}
    assert roots, "the run's socket directory records its owner"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = run_cli(tmp_path / "in", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert not any(os.path.exists(f"/tmp/{d}") for d in roots)


def _owner(root: str) -> int | None:
    try:
        return int(open(os.path.join(root, "owner")).read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
