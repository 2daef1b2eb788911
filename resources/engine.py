import dagster as dg

from datacomp_assets.core.engine import Engine


class EngineResource(dg.ConfigurableResource):
    """Where the heavy steps run: this machine (the default, `ray_address` empty), or the Ray cluster at
    `ray_address` (`<head>:6379`, `ray://<head>:10001`, or `auto` on a node of it). On a cluster the download is
    img2dataset's Ray distributor, per-file metadata work is one Ray task per file, and each training spans
    `training_nodes` nodes (torchrun on each, c10d rendezvous), and the steps that load a model (image scores,
    recaptioning, evaluation) run as Ray tasks of `gpus_per_task` GPUs. Nothing else changes between the two."""

    ray_address: str = ""
    training_nodes: int = 1
    task_retries: int = 3   # Ray's retries of a task whose worker or node was lost
    # GPUs each model-loading Ray task (image_scores, recaptioned_source, eval_results) requests where the cluster
    # has GPUs; a fraction (0.5) runs that many tasks on one GPU. Without GPUs, each requests one CPU.
    gpus_per_task: float = 1.0

    def engine(self) -> Engine:
        # Outside a run (the command line's checks before it starts) the address may still be an EnvVar.
        address = self.ray_address.get_value() if isinstance(self.ray_address, dg.EnvVar) else self.ray_address
        if self.training_nodes < 1 or (self.training_nodes > 1 and not address):
            raise ValueError(f"engine.training_nodes is {self.training_nodes}: it must be 1 on this machine, and at "
                             "least 1 on a Ray cluster (set engine.ray_address)")
        return Engine((address or "").strip(), self.task_retries, self.training_nodes)

    def task_gpus(self, device: str) -> float:
        """GPUs a model-loading task requests: none when the step's device is the CPU (set so, or no GPU)."""
        return self.gpus_per_task if device == "cuda" else 0.0
