"""Real `ray start` processes (a head and two nodes, `--block`) on this machine, and
`clip-pipeline run --cluster ray --address` as the user types it. Slow, bounded in time, always
torn down (each `ray start --block` runs in its own process group, which is terminated).

Loopback only: `ray start` for a *worker* node refuses RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the
setting that keeps cluster_utils on 127.0.0.1), and without it Ray rewrites a literal 127.0.0.1 to
the interface address. So this test uses 127.0.0.2, another address of the loopback interface
(127.0.0.0/8 is on `lo`), which Ray does not rewrite: every connection stays on `lo`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cluster_helpers import RANGE_SHARDS, assert_same_as_reference, cli, corpus, reference, sets
from robust_helpers import env

pytestmark = pytest.mark.slow
pytest.importorskip("ray", reason="the optional extra is not installed: pip install -e '.[cluster]'")

IP = "127.0.0.2"
# the default (1), whatever tests/ray_helpers.py set in this process for cluster_utils: worker
# `ray start` refuses 0
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


def free_base() -> int:
    """A base port with 200 free ports above it on IP (checked by binding each service port)."""
    for base in range(41000, 60000, 997):
        try:
            for off in (0, 1, 2, 3, 4, 5, 6, 7):
                for node in range(3):
                    with socket.socket() as s:
                        s.bind((IP, base + 100 * node + off))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def ray_start(args: list[str], tmp: str, log: Path) -> subprocess.Popen:
    e = env(**RAY_ENV)
    fh = open(log, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(["ray", "start", "--block", "--disable-usage-stats", f"--node-ip-address={IP}",
                             "--object-store-memory=80000000", f"--temp-dir={tmp}", *args],
                            stdout=fh, stderr=subprocess.STDOUT, env=e, start_new_session=True)


def node_ports(base: int) -> list[str]:
    return [f"--node-manager-port={base}", f"--object-manager-port={base + 1}",
            f"--min-worker-port={base + 10}", f"--max-worker-port={base + 60}",
            f"--dashboard-agent-listen-port={base + 2}", f"--metrics-export-port={base + 3}",
            f"--runtime-env-agent-port={base + 4}", f"--dashboard-agent-grpc-port={base + 5}"]


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((IP, port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on {IP}:{port} after {timeout}s")


def wait_log(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.3)
    raise AssertionError(f"{log.name}: no {text!r} after {timeout}s:\n{log.read_text(errors='replace')[-2000:]}")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def test_real_ray_start_nodes_and_the_cli_driver(tmp_path):
    inp = corpus(tmp_path, n_good=23)  # 24 inputs: 3 ranges of 8
    ref = reference(inp, tmp_path / "ref")
    base = free_base()
    # one short temp dir per node (Ray's unix socket paths must fit 107 bytes; nodes sharing one
    # session directory collide on their socket names and one of them never registers)
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    gcs = base + 90
    procs: list[subprocess.Popen] = []
    try:
        procs.append(ray_start(["--head", f"--port={gcs}", "--num-cpus=0", "--include-dashboard=false",
                                *node_ports(base)], f"{tmp}/h", tmp_path / "head.log"))
        wait_port(gcs, 60)
        for i in (1, 2):
            procs.append(ray_start([f"--address={IP}:{gcs}", "--num-cpus=1", '--resources={"clip_slot": 1}',
                                    *node_ports(base + 100 * i)], f"{tmp}/n{i}", tmp_path / f"node{i}.log"))
        for i in (1, 2):  # `ray start --block` prints this once the node is registered
            wait_log(tmp_path / f"node{i}.log", "Ray runtime started", 90)
        out = tmp_path / "out"
        r = cli("run", "--cluster", "ray", "--address", f"{IP}:{gcs}", "-i", str(inp), "-o", str(out),
                "--progress", "none", *sets(**{"cluster.range_shards": RANGE_SHARDS}), timeout=240,
                env_extra=RAY_ENV)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "3 ranges" in r.stdout
        assert_same_as_reference(out, ref)
        ss = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True, check=False).stdout
        ours = [ln for ln in ss.splitlines() if any(f":{p}" in ln for p in range(base, base + 300))]
        conns = [ln.split() for ln in ours if ln.split()[0] != "LISTEN"]  # listening on * is not traffic
        assert ours and conns
        loop = ("127.0.0.2:", "[::ffff:127.0.0.2]:", "127.0.0.1:", "[::ffff:127.0.0.1]:")
        assert all(c[3].startswith(loop) and c[4].startswith(loop) for c in conns), conns
    finally:
        stop(procs)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    assert all(p.poll() is not None for p in procs)
