import os
from dataclasses import dataclass, replace
from pathlib import Path

import dagster as dg

from datacomp_assets.core.engine import Engine
from datacomp_assets.core.scales import ScaleConfig
from datacomp_assets.core.trainer import TrainJob, accumulation_steps


@dataclass(frozen=True)
class Placement:
    device: str        # "cuda" or "cpu"
    nproc: int         # training processes (one per GPU; CPU processes on gloo)
    precision: str     # open_clip --precision
    threads: int = 0   # CPU threads per process (0: the default)
    accum_freq: int = 1  # gradient accumulation steps per optimizer step (training on GPUs only)


class AcceleratorResource(dg.ConfigurableResource):
    """Which device trains and scores. `auto` picks CUDA when a GPU is visible, else the CPU in fp32
    (open_clip's amp is about 15x slower on a CPU). Training runs on every visible GPU (or `gpus`), one
    torchrun process each; with fewer GPUs than the reference, gradients accumulate to keep the global batch.
    A scale that requires a GPU (the paper's) is refused on a CPU unless `allow_cpu_training` is set."""

    device: str = "auto"        # auto | cuda | cpu
    gpus: int = 0               # 0: every visible GPU
    cpu_processes: int = 1      # >1 runs torchrun with the gloo backend on the CPU
    cpu_threads: int = 0        # torch threads per training process on the CPU; 0: torch's default (all cores)
    allow_cpu_training: bool = False  # train a scale that requires a GPU on the CPU anyway (a rehearsal, a test)
    # Trainings of one step (a strategy's seeds, the two scorers) run this many at once on the CPU, the cores
    # shared out between them: a miniature's small ops barely use a second core (one training takes 41 s on two
    # cores, 44 s on one), so three seeds together finish 1.24x sooner than in turn (docs/measurements.md). Each
    # takes about 2 GB at tiny. On GPUs they run in turn, each on every GPU.
    cpu_trainings_at_once: int = 3

    def placement(self, scale_precision: str, engine: Engine = Engine()) -> Placement:
        """The device, processes and precision here, or on each node of the engine's Ray cluster."""
        import torch

        if engine.on_ray:  # the cluster's nodes are what train, not the machine this step runs on
            visible, where = engine.gpus_per_node(), f"on the nodes of {engine.describe()}"
        else:
            visible, where = torch.cuda.device_count() if torch.cuda.is_available() else 0, "here"
        device = self.device
        if device == "auto":
            device = "cuda" if visible else "cpu"
        if device == "cuda":
            if not visible:
                raise RuntimeError(f"accelerator.device is 'cuda' but no GPU is visible {where}; set it to 'auto' "
                                   "or 'cpu'")
            return Placement("cuda", self.gpus or visible, scale_precision)
        if device != "cpu":
            raise ValueError(f"accelerator.device must be auto, cuda or cpu, not {device!r}")
        return Placement("cpu", self.cpu_processes, "fp32", self.cpu_threads)

    def training_placement(self, recipe: ScaleConfig, engine: Engine = Engine()) -> Placement:
        """Where `recipe` trains (on each of `nodes` nodes), or a ValueError at once if it cannot train there as the
        benchmark fixes it."""
        placement = self.placement(recipe.precision, engine)
        if placement.device == "cpu":
            if recipe.requires_gpu and not self.allow_cpu_training:
                raise ValueError(
                    f"scale {recipe.name!r} requires a GPU to train, and no GPU is visible to training "
                    f"(accelerator device {self.device!r}). Training its reference recipe ({recipe.model}, "
                    f"{recipe.samples_seen:,} samples seen, global batch {recipe.global_batch:,}) on a CPU would take "
                    "far too long. Run on a machine with a GPU, or, to train on the CPU anyway "
                    "(a rehearsal), opt in: set `allow_cpu_training: true` on the `accelerator` resource "
                    "(launchpad: resources: accelerator: config: allow_cpu_training: true).")
            # No accumulation on the CPU: reference_gpus describes the reference's per-GPU memory, and a CPU
            # process has no such limit (it shares the host's memory). CPU runs are miniatures (tiny) or
            # rehearsals a user opted into, where open_clip's accumulation would only add its extra forward pass
            # per micro-batch (about a third more compute) to the slowest device. Each process takes the global
            # batch divided by the processes, as the recipe's global batch and steps stay the same.
            return placement
        try:
            accum = accumulation_steps(recipe.global_batch, recipe.reference_gpus,
                                       placement.nproc * engine.training_nodes)
        except ValueError as err:
            raise ValueError(f"scale {recipe.name!r}: {err}") from None
        return replace(placement, accum_freq=accum)

    def in_waves(self, jobs: list[TrainJob]) -> list[list[TrainJob]]:
        """`jobs` in groups to run together, one group after another: on the CPU `cpu_trainings_at_once` at a time,
        each with an equal share of the cores (unless `cpu_threads` fixes it); on GPUs one at a time."""
        at_once = self.cpu_trainings_at_once if jobs and jobs[0].device == "cpu" else 1
        waves = [jobs[i:i + max(1, at_once)] for i in range(0, len(jobs), max(1, at_once))]
        cores = os.cpu_count() or 1
        return [[job if job.threads or len(wave) == 1 else replace(job, threads=max(1, cores // len(wave)))
                 for job in wave] for wave in waves]

    def train_job(self, recipe: ScaleConfig, train_data: str, logs_dir: Path, name: str,
                  seed: int | None = None, engine: Engine = Engine()) -> TrainJob:
        """A training run of `recipe` (a scale's fixed recipe) on the devices this resource chooses, on this
        machine or on each of the engine's `training_nodes` nodes of a Ray cluster."""
        placement = self.training_placement(recipe, engine)
        return TrainJob(recipe, train_data, logs_dir, name, device=placement.device, precision=placement.precision,
                        nproc=placement.nproc, nodes=engine.training_nodes, ray_address=engine.ray_address,
                        grad_checkpointing=placement.device == "cuda", threads=placement.threads, seed=seed,
                        accum_freq=placement.accum_freq)
