from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from datacomp_assets.core.scales import ScaleConfig
from datacomp_assets.core.trainer import TrainJob


@dataclass(frozen=True)
class Placement:
    device: str        # "cuda" or "cpu"
    nproc: int         # training processes (one per GPU; CPU processes on gloo)
    precision: str     # open_clip --precision
    threads: int = 0   # CPU threads per process (0: the default)


class AcceleratorResource(dg.ConfigurableResource):
    """Which device trains and scores. `auto` picks CUDA when a GPU is visible, else the CPU in fp32
    (open_clip's amp is about 15x slower on a CPU)."""

    device: str = "auto"        # auto | cuda | cpu
    gpus: int = 0               # 0: every visible GPU
    cpu_processes: int = 1      # >1 runs torchrun with the gloo backend on the CPU
    cpu_threads: int = 0        # torch threads per training process on the CPU; 0: torch's default (all cores)

    def placement(self, scale_precision: str) -> Placement:
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("accelerator.device is 'cuda' but no GPU is visible; set it to 'auto' or 'cpu'")
            visible = torch.cuda.device_count()
            return Placement("cuda", self.gpus or visible, scale_precision)
        if device != "cpu":
            raise ValueError(f"accelerator.device must be auto, cuda or cpu, not {device!r}")
        return Placement("cpu", self.cpu_processes, "fp32", self.cpu_threads)

    def train_job(self, recipe: ScaleConfig, train_data: str, logs_dir: Path, name: str,
                  seed: int | None = None) -> TrainJob:
        """A training run of `recipe` (a scale's fixed recipe) on the devices this resource chooses."""
        placement = self.placement(recipe.precision)
        return TrainJob(recipe, train_data, logs_dir, name, device=placement.device, precision=placement.precision,
                        nproc=placement.nproc, grad_checkpointing=placement.device == "cuda",
                        threads=placement.threads, seed=seed)
