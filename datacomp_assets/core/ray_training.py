"""One open_clip training across the nodes of a Ray cluster: torchrun on each node, one Ray task per node, meeting
at a c10d rendezvous on the first node.

`python -m datacomp_assets.core.ray_training --address A --nodes N --nproc P --device D --name RUN --argv-file F`
is the trainer's child process on a cluster (`trainer.TrainJob.command`). A placement group reserves N distinct
nodes with P CPUs (and P GPUs on CUDA) each, so GPUs are requested per training, not per machine. Rank 0 writes
open_clip's log and checkpoints into the shared logs folder; this process follows that log and prints its new lines,
so the trainer reads rank 0's progress as it does on one machine (Ray's forwarding of task output is best effort
and may drop the last lines). The recipe, the flags and the checkpoints are the same. A node that fails ends the run: its line names the node, the other nodes are stopped, and the exit code is
not 0. Materializing again resumes from the latest checkpoint (`--resume latest`), as on one machine.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

from datacomp_assets.core import settings

PLACEMENT_TIMEOUT_S = 120  # how long to wait for the cluster to offer the nodes
# What the trainer's environment sets that torchrun on the nodes needs too (Ray workers have the node's own).
FORWARDED_VARIABLES = ("OMP_NUM_THREADS", "PYTHONPATH", settings.HF_HUB_OFFLINE.name,
                       settings.NO_ALBUMENTATIONS_UPDATE.name)


def node_bundle(nproc: int, device: str) -> dict[str, float]:
    return {"CPU": nproc, **({"GPU": nproc} if device == "cuda" else {})}


def torchrun_command(nodes: int, nproc: int, endpoint: str, run_id: str, is_host: bool, argv_file: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
            f"--rdzv-conf=is_host={int(is_host)}", "-m", "datacomp_assets.core.open_clip_entry",
            "--argv-file", argv_file]


def _free_endpoint() -> str:
    """Runs on the first node: its address and a free port there, for the rendezvous."""
    import ray

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"


def _torchrun_on_node(command: list[str], env: dict[str, str]) -> tuple[str, str, int, list[str]]:
    """Runs as a Ray task: torchrun, its output kept in the node's Ray logs; returns (node id, node address, exit
    code, last lines)."""
    import ray

    from datacomp_assets.core.trainer import die_with_parent

    tail: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=settings.child_environment(**env), preexec_fn=die_with_parent) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail = (tail + [line.rstrip()])[-40:]
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), proc.returncode, tail


class LogFollower:
    """The lines appended to a file since this was made, each time it is called (the file may not exist yet)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.pending = path, path.stat().st_size if path.exists() else 0, b""

    def __call__(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            data = log.read()
        self.offset += len(data)
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            print(line.decode(errors="replace"), flush=True)


def train_on_cluster(address: str, nodes: int, nproc: int, device: str, run_id: str, argv_file: str,
                     log_file: str, threads: int = 0) -> int:
    """Run the training; return 0, or the exit code of the first node that failed (after a line naming it)."""
    settings.apply_ray_defaults()
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from datacomp_assets.core.engine import ray_error_message

    ray.init(address=address, logging_level="warning", configure_logging=False, log_to_driver=False)
    follow = LogFollower(Path(log_file))
    bundle = node_bundle(nproc, device)
    group = placement_group([bundle] * nodes, strategy="STRICT_SPREAD")
    if not group.wait(PLACEMENT_TIMEOUT_S):
        alive = [n for n in ray.nodes() if n["Alive"]]
        print(f"training {run_id}: the cluster did not offer {nodes} distinct nodes with {bundle} each within "
              f"{PLACEMENT_TIMEOUT_S} s; it has {len(alive)} nodes: "
              + "; ".join(f"{n['NodeManagerAddress']} {n['Resources']}" for n in alive)
              + ". Lower the engine's training_nodes, or add nodes.", flush=True)
        return 2
    on = [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i) for i in range(nodes)]
    endpoint = ray.get(ray.remote(_free_endpoint).options(num_cpus=0, scheduling_strategy=on[0]).remote())
    env = settings.environment_of(FORWARDED_VARIABLES)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    task = ray.remote(_torchrun_on_node)
    refs = [task.options(num_cpus=nproc, num_gpus=bundle.get("GPU", 0), max_retries=0, scheduling_strategy=on[rank])
            .remote(torchrun_command(nodes, nproc, endpoint, run_id, rank == 0, argv_file), env)
            for rank in range(nodes)]
    print(f"training {run_id}: {nodes} nodes x {nproc} processes ({device}), rendezvous at {endpoint}", flush=True)
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    pending = list(refs)
    try:
        while pending:
            ready_now, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            follow()
            if not ready_now:
                continue
            ready = ready_now[0]
            try:
                node_id, node_ip, code, tail = ray.get(ready)
            except ray.exceptions.RayError as err:
                print(f"training {run_id}: node {rank_of[ready]} of {nodes} was lost: "
                      f"{ray_error_message(err, 0)}", flush=True)
                return 1
            if code != 0:  # its last lines, then the line that names it (the trainer keeps the end of the output)
                print("\n".join(tail[-20:]), flush=True)
                print(f"training {run_id}: torchrun on node {rank_of[ready]} of {nodes} (node {node_id[:12]}, "
                      f"{node_ip}) exited with code {code}; its last lines are above", flush=True)
                return code
        return 0
    finally:
        follow()  # what rank 0 wrote last
        for ref in pending:
            ray.cancel(ref, force=True)
        remove_placement_group(group)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--name", required=True)
    parser.add_argument("--argv-file", required=True)
    parser.add_argument("--log-file", required=True, help="open_clip's out.log, which rank 0 writes")
    args = parser.parse_args(argv)
    sys.exit(train_on_cluster(args.address, args.nodes, args.nproc, args.device, args.name,
                              str(Path(args.argv_file).resolve()), args.log_file, args.threads))


if __name__ == "__main__":
    main()
