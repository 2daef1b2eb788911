"""Run open_clip's own trainer (`open_clip_train.main`) with the benchmark's fixed recipe.

The trainer runs in a child process (`python -m datacomp_assets.training.open_clip_entry`, or torchrun
for several processes) so that a crash, a kill or CUDA state never touches the orchestrator. Its log
lines are streamed back and parsed for loss and throughput.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from partitions.scales import ScaleConfig

LOG_LINE = re.compile(
    r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<seen>\d+)/(?P<per_epoch>\d+).*?"
    r"(?P<sps>[\d.]+)/s, .*?LR: (?P<lr>[\d.e-]+).*?Contrastive_loss: (?P<loss>[\d.]+) \((?P<avg>[\d.]+)\)"
)


@dataclass(frozen=True)
class TrainJob:
    """One training run: a scale's fixed recipe applied to one set of training shards."""

    scale: ScaleConfig
    train_data: str            # webdataset brace pattern, e.g. ".../{00000000..00000003}.tar"
    logs_dir: Path
    name: str
    device: str = "cpu"
    precision: str = "fp32"
    nproc: int = 1              # processes (GPUs, or CPU processes on gloo)
    workers: int = 1
    seed: int | None = None     # defaults to the scale's seed
    grad_checkpointing: bool = False
    threads: int = 0            # CPU threads per process (OMP_NUM_THREADS); 0: torch's default

    def argv(self) -> list[str]:
        s = self.scale
        per_checkpoint = s.samples_seen // s.checkpoints
        args = [
            "--train-data", self.train_data, "--dataset-type", "webdataset", "--dataset-resampled",
            "--train-num-samples", str(per_checkpoint), "--epochs", str(s.checkpoints),
            "--batch-size", str(s.global_batch // self.nproc), "--model", s.model,
            "--lr", str(s.lr), "--wd", str(s.weight_decay), "--beta1", str(s.beta1), "--beta2", str(s.beta2),
            "--eps", str(s.eps), "--warmup", str(s.warmup), "--lr-scheduler", "cosine",
            "--seed", str(s.seed if self.seed is None else self.seed), "--workers", str(self.workers),
            "--device", self.device, "--precision", self.precision,
            "--local-loss", "--gather-with-grad", "--save-frequency", "1", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--report-to", "none", "--log-every-n-steps", "5",
            "--logs", str(self.logs_dir), "--name", self.name, "--resume", "latest",
        ]
        if self.grad_checkpointing:
            args.append("--grad-checkpointing")
        if self.nproc > 1 and self.device == "cpu":
            args += ["--dist-backend", "gloo"]
        return args

    def command(self) -> list[str]:
        module = ["-m", "datacomp_assets.training.open_clip_entry"]
        if self.nproc > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.nproc}", *module, *self.argv()]
        return [sys.executable, *module, *self.argv()]

    @property
    def checkpoint_dir(self) -> Path:
        return self.logs_dir / self.name / "checkpoints"

    @property
    def final_checkpoint(self) -> Path:
        return self.checkpoint_dir / f"epoch_{self.scale.checkpoints}.pt"


@dataclass
class TrainResult:
    checkpoint: Path
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (global step-ish sample count, loss)
    samples_per_second: list[float] = field(default_factory=list)
    resumed_from_epoch: int = 0

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None

    @property
    def median_samples_per_second(self) -> float | None:
        # The first logged batches include start-up; the median is the honest steady rate.
        if not self.samples_per_second:
            return None
        values = sorted(self.samples_per_second)
        return values[len(values) // 2]


def completed_epochs(job: TrainJob) -> int:
    return max((int(p.stem.split("_")[1]) for p in job.checkpoint_dir.glob("epoch_[0-9]*.pt")), default=0)


def train(job: TrainJob, log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) the job to its fixed samples seen; return the final checkpoint and its curve."""
    start_epoch = completed_epochs(job)
    if start_epoch >= job.scale.checkpoints:
        return TrainResult(job.final_checkpoint, 0.0, resumed_from_epoch=start_epoch)
    job.logs_dir.mkdir(parents=True, exist_ok=True)
    log(f"training {job.name}: {' '.join(job.command())}")
    if start_epoch:
        log(f"resuming from checkpoint epoch_{start_epoch}.pt")
    result = TrainResult(job.final_checkpoint, 0.0, resumed_from_epoch=start_epoch)
    per_epoch = job.scale.samples_seen // job.scale.checkpoints
    t0 = time.perf_counter()
    tail: list[str] = []
    with subprocess.Popen(job.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=_child_env(job.threads)) as proc:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            m = LOG_LINE.search(line)
            if m:
                seen = int(m["epoch"]) * per_epoch + int(m["seen"])
                result.losses.append((seen, float(m["loss"])))
                result.samples_per_second.append(float(m["sps"]))
                log(f"samples {seen}/{job.scale.samples_seen} loss {float(m['loss']):.4f} "
                    f"{float(m['sps']):.0f} samples/s")
    result.seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not job.final_checkpoint.exists():
        raise RuntimeError(
            f"open_clip training of {job.name} failed (exit code {proc.returncode}); last output:\n"
            + "\n".join(tail) + "\nRe-materialize to resume from the latest checkpoint."
        )
    return result


def _child_env(threads: int = 0) -> dict:
    import os

    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # The child imports this project; make sure it can, even when run from another directory.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
