"""Ray on one machine, on the loopback interface only (docs/cluster.md, "Testing on one machine").

Ray announces the machine's interface address by default and resolves a literal 127.0.0.1 or
"localhost" to it (ray._private.services.resolve_ip_for_localhost). With
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment *before ray is imported*, Ray's own
get_node_ip_address() returns 127.0.0.1, so the driver, the head, every node and every worker
(children inherit the environment) stay on 127.0.0.1; node_ip_address="127.0.0.1" is passed to
every node as well. Usage statistics are off (no traffic leaves the machine).
"""

from __future__ import annotations

import contextlib
import os

LOOPBACK = "127.0.0.1"
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # get_node_ip_address() -> 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_USAGE_STATS": "1",
    "RAY_DEDUP_LOGS": "0",
}
NODE_ARGS = {"node_ip_address": LOOPBACK, "num_cpus": 1, "object_store_memory": 80 << 20}


def set_loopback_env() -> None:
    """Call before the first `import ray` of the process."""
    import sys

    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise RuntimeError("ray was imported before the loopback settings were applied")
    os.environ.update(LOOPBACK_ENV)


@contextlib.contextmanager
def local_cluster(nodes: int = 3, devices_per_node: int = 2):
    """A head without clip_slot and `nodes` worker nodes with clip_slot=1, the driver connected;
    always torn down."""
    set_loopback_env()
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "num_cpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(**NODE_ARGS, resources={"clip_slot": 1, "fake_device": devices_per_node})
                   for _ in range(nodes)]
        ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False)
        yield cluster, workers
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        cluster.shutdown()


def non_loopback_connections(pids: set[int] | None = None) -> list[str]:
    """TCP connections or listeners of this machine's Ray processes not on 127.0.0.1."""
    import subprocess

    out = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True, check=False).stdout
    bad = []
    for line in out.splitlines():
        if not any(x in line for x in ("raylet", "gcs_server", "ray::", "python")):
            continue
        cols = line.split()
        if len(cols) < 5:
            continue
        local, peer = cols[3], cols[4]
        ok = all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "*:", "0.0.0.0:*", "[::]:*")) or a in ("*", "*:*")
                 for a in (local, peer))
        if not ok and ("ray" in line or "gcs" in line):
            bad.append(line)
    return bad
