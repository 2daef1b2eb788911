"""A real two-node Ray cluster on 127.0.0.1 for the tests (Ray's own `ray.cluster_utils.Cluster`), and a way to
lose one of its nodes as a machine dies: its raylet and every worker process killed at once."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from datacomp_assets.core import settings

LOOPBACK_CLUSTER = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
OBJECT_STORE_BYTES = 80 * 2**20
# A lost node is declared dead after about 1.5 s instead of Ray's default 15-30 s.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                      "health_check_timeout_ms": 500}


def node_args(**extra) -> dict:
    return {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": OBJECT_STORE_BYTES, **extra}


@contextmanager
def local_cluster(nodes: int = 2, dashboard: bool = False):
    """A head and `nodes - 1` workers, one CPU each; with `dashboard`, the head serves Ray's job API (for
    dagster-ray's executor) at `cluster.jobs_address`. The nodes' workers find `dagster` and this project through
    this interpreter."""
    settings.apply_ray_defaults()
    # Ray's test cluster otherwise moves its nodes to the machine's outward address and then cannot reach its own
    # control server there (docs/measurements.md); `ray start` on one machine does not need it. Ray reads it once,
    # when first imported: tests/conftest.py sets it, and benchmarks/cluster.py.
    os.environ.setdefault(LOOPBACK_CLUSTER, "0")
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError(f"ray was imported before {LOOPBACK_CLUSTER}=0 was set; a cluster on 127.0.0.1 would "
                               "hang. Set it before anything imports ray (img2dataset does)")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    import ray
    from ray.cluster_utils import Cluster

    from datacomp_assets.world.web_server import free_port

    jobs_port = free_port()  # not Ray's 8265, which a cluster of the user's may hold
    head = node_args(include_dashboard=dashboard, dashboard_host="127.0.0.1", dashboard_port=jobs_port,
                     _system_config=FAST_HEALTH_CHECKS)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
    cluster.jobs_address = f"http://127.0.0.1:{jobs_port}"
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**node_args())
        cluster.wait_for_nodes()
        yield cluster
    finally:
        session = cluster.head_node.get_session_dir_path()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(session, ignore_errors=True)  # its logs, under /tmp/ray: a few MB a session


def kill_node(cluster, node) -> int:
    """Lose `node` as a machine dies: SIGKILL its raylet's worker processes, then the node. Returns how many worker
    processes were killed."""
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    workers = raylet.children(recursive=True)
    for worker in workers:
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)
    return len(workers)
