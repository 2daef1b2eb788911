"""Run open_clip's own trainer (`open_clip_train.main`) with the benchmark's fixed recipe.

The trainer runs in a child process (`python -m datacomp_assets.core.open_clip_entry`, torchrun for several
processes, or on a Ray cluster `python -m datacomp_assets.core.ray_training`, torchrun on each node) so that a
crash, a kill or CUDA state never touches the orchestrator. Its log lines are streamed back and parsed for loss
and throughput; only rank 0's progress counts.

A run killed at any point resumes from its latest readable checkpoint ("epoch") to the same samples seen:
a checkpoint cut short by the kill is set aside, the child dies with its parent, and a lock held by every
process of the run stops a second run from writing into the same directory while an orphan lives on.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from datacomp_assets.core import settings
from datacomp_assets.core.layout import run_checkpoint, run_checkpoint_dir
from datacomp_assets.core.processes import restore_default_signals
from datacomp_assets.core.scales import ScaleConfig

LOG_LINE = re.compile(
    r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<seen>\d+)/(?P<per_epoch>\d+).*?"
    r"(?P<sps>[\d.]+)/s, .*?LR: (?P<lr>[\d.e-]+).*?Contrastive_loss: (?P<loss>[\d.]+) \((?P<avg>[\d.]+)\)"
)

LOCK_WAIT_SECONDS = 30.0  # how long a new run waits for the processes of a killed one to go
OTHER_RANK = re.compile(r"\[rank[1-9]\d*\]:")


@dataclass(frozen=True)
class TrainJob:
    """One training run: a scale's fixed recipe applied to one set of training shards."""

    scale: ScaleConfig
    train_data: str            # webdataset brace pattern, e.g. ".../{00000000..00000003}.tar"
    logs_dir: Path
    name: str
    device: str = "cpu"
    precision: str = "fp32"
    nproc: int = 1              # processes per node (GPUs, or CPU processes on gloo)
    nodes: int = 1              # nodes of the Ray cluster the run spans (with ray_address)
    ray_address: str = ""       # a Ray cluster to train on; empty: this machine
    workers: int = 1
    seed: int | None = None     # defaults to the scale's seed
    grad_checkpointing: bool = False
    threads: int = 0            # CPU threads per process (OMP_NUM_THREADS); 0: torch's default
    accum_freq: int = 1         # micro-batches per optimizer step (open_clip's --accum-freq), see accumulation_steps

    def __post_init__(self):
        if self.nodes > 1 and not self.ray_address:
            raise ValueError("a training across several nodes needs a Ray cluster (ray_address)")
        split = self.world_size * self.accum_freq
        if self.world_size < 1 or self.accum_freq < 1 or self.scale.global_batch % split:
            raise ValueError(f"the global batch {self.scale.global_batch} of scale {self.scale.name} does not split "
                             f"evenly over {self.world_size} processes x {self.accum_freq} accumulation steps")

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc

    @property
    def micro_batch(self) -> int:
        """Each process's batch per forward pass (open_clip's --batch-size)."""
        return self.scale.global_batch // (self.world_size * self.accum_freq)

    def argv(self) -> list[str]:
        s = self.scale
        # Whole global batches, so that open_clip's steps per "epoch" do not depend on how the batch is split:
        # it counts micro-batches (batch size x processes) and takes their floor division by --accum-freq.
        per_checkpoint = self.steps_per_checkpoint * s.global_batch
        args = [
            "--train-data", self.train_data, "--dataset-type", "webdataset", "--dataset-resampled",
            "--train-num-samples", str(per_checkpoint), "--epochs", str(s.epochs),
            "--batch-size", str(self.micro_batch), "--model", s.model,
            "--lr", str(s.lr), "--wd", str(s.weight_decay), "--beta1", str(s.beta1), "--beta2", str(s.beta2),
            "--eps", str(s.eps), "--warmup", str(s.warmup), "--lr-scheduler", "cosine",
            "--seed", str(s.seed if self.seed is None else self.seed), "--workers", str(self.workers),
            "--device", self.device, "--precision", self.precision,
            "--local-loss", "--gather-with-grad", "--save-frequency", "1", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--report-to", "none", "--log-every-n-steps", "5",
            "--logs", str(self.logs_dir), "--name", self.name, "--resume", "latest",
        ]
        if self.accum_freq > 1:
            # open_clip caches every micro-batch's features, then recomputes each with gradients against all the
            # others: the contrastive loss and its gradient are the global batch's, as without accumulation.
            args += ["--accum-freq", str(self.accum_freq)]
        if self.grad_checkpointing:
            args.append("--grad-checkpointing")
        if self.world_size > 1 and self.device == "cpu":
            args += ["--dist-backend", "gloo"]
        return args

    def command(self) -> list[str]:
        module = ["-m", "datacomp_assets.core.open_clip_entry"]
        if self.ray_address:
            return [sys.executable, "-m", "datacomp_assets.core.ray_training", "--address", self.ray_address,
                    "--nodes", str(self.nodes), "--nproc", str(self.nproc), "--device", self.device,
                    "--threads", str(self.threads), "--name", self.name, "--argv-file", str(self.argv_file),
                    "--log-file", str(self.log_file)]
        if self.nproc > 1:
            # open_clip's flags go through a file, out of torchrun's parser's reach.
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.nproc}", *module, "--argv-file", str(self.argv_file)]
        return [sys.executable, *module, *self.argv()]

    @property
    def argv_file(self) -> Path:
        return self.logs_dir / f"{self.name}.argv.json"

    @property
    def steps_per_checkpoint(self) -> int:
        """Optimizer steps (global batches) per open_clip "epoch": the scale's budget per checkpoint rounded up to
        whole global batches, then to a multiple of the data loader workers, as open_clip rounds it."""
        s, workers = self.scale, max(1, self.workers)
        return math.ceil(math.ceil(s.samples_seen // s.epochs / s.global_batch) / workers) * workers

    @property
    def samples_seen(self) -> int:
        """What open_clip really trains on: whole global batches, whatever the processes and accumulation."""
        return self.scale.epochs * self.steps_per_checkpoint * self.scale.global_batch

    @property
    def final_checkpoint(self) -> Path:
        return run_checkpoint(self.logs_dir, self.name, self.scale.epochs)

    @property
    def checkpoint_dir(self) -> Path:
        return run_checkpoint_dir(self.logs_dir, self.name)

    @property
    def log_file(self) -> Path:
        return self.logs_dir / self.name / "out.log"


def accumulation_steps(global_batch: int, reference_gpus: int, nproc: int) -> int:
    """Gradient accumulation steps that keep the recipe's global batch on `nproc` GPUs: the fewest such that the
    global batch splits evenly over nproc x steps micro-batches, each no larger than the reference's per-GPU
    batch (global_batch / reference_gpus), so that a GPU that held the reference's share holds this one.
    A global batch that no such split divides is refused rather than silently changed."""
    if min(global_batch, reference_gpus, nproc) < 1:
        raise ValueError(f"global batch ({global_batch}), reference GPUs ({reference_gpus}) and processes ({nproc}) "
                         "must be positive")
    for steps in range(-(-reference_gpus // nproc), global_batch // nproc + 1):
        if global_batch % (nproc * steps) == 0:
            return steps
    raise ValueError(
        f"the global batch {global_batch} cannot be split evenly over {nproc} GPU processes: no number of "
        f"accumulation steps k with {nproc} x k >= {reference_gpus} (the reference's GPUs) divides it. "
        f"Train on a number of GPUs that divides {global_batch} (the accelerator resource's `gpus`)")


@dataclass
class TrainResult:
    checkpoint: Path
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (samples seen, loss), the whole run
    samples_per_second: list[float] = field(default_factory=list)  # this attempt's log lines
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

    def summary(self, scale: ScaleConfig) -> dict:
        """What a user looks at after one training run: where, how fast, and how the loss went."""
        from datacomp_assets.core.lineage import file_sha256

        summary = {"checkpoint_path": str(self.checkpoint), "checkpoint_sha256": file_sha256(self.checkpoint),
                   "samples_seen": scale.samples_seen, "train_seconds": round(self.seconds, 1),
                   "resumed_from_epoch": self.resumed_from_epoch, "model": scale.model}
        if self.final_loss is not None:
            summary["final_loss"] = self.final_loss
        if self.median_samples_per_second is not None:
            summary["samples_per_second"] = self.median_samples_per_second
        return summary


def completed_epochs(job: TrainJob) -> int:
    return max((int(p.stem.split("_")[1]) for p in job.checkpoint_dir.glob("epoch_[0-9]*.pt")), default=0)


def discard_unreadable_checkpoints(job: TrainJob, log: Callable[[str], None] = print) -> list[Path]:
    """Set aside (`*.pt.unreadable`) checkpoints that do not load, newest first, so open_clip's
    `--resume latest` falls back to the last good one instead of crashing on a file a kill cut short."""
    import torch

    set_aside = []
    for path in sorted(job.checkpoint_dir.glob("epoch_*.pt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            break  # the newest readable checkpoint: older ones are not needed to resume
        except Exception as error:  # a truncated zip, a partial pickle ...
            path.rename(path.with_name(path.name + ".unreadable"))
            log(f"set aside unreadable checkpoint {path.name} ({type(error).__name__}); resuming before it")
            set_aside.append(path)
    return set_aside


def train(job: TrainJob, log: Callable[[str], None] = print,
          progress: Callable[[int, str], None] | None = None) -> TrainResult:
    """Run (or resume) the job to its fixed samples seen; return the final checkpoint and its curve. Each of
    open_clip's progress lines goes to `progress(samples seen, note)` if given, else to `log`."""
    return train_together([job], log, [progress])[0]


def train_together(jobs: list[TrainJob], log: Callable[[str], None] = print,
                   progress: list[Callable[[int, str], None] | None] | None = None) -> list[TrainResult]:
    """Run (or resume) several jobs at once, each in its own process, their output read here as it comes (the
    callbacks run on the calling thread). A job already complete is not started again. If one fails, the others
    finish first (their checkpoints are kept), then the first failure is raised."""
    progress = progress or [None] * len(jobs)
    with ExitStack() as held:
        runs = [_start(job, log, report, held) for job, report in zip(jobs, progress)]
        _stream([r for r in runs if isinstance(r, _Running)])
    return [r.finish() if isinstance(r, _Running) else r for r in runs]


def train_in_waves(waves: list[list[TrainJob]], log: Callable[[str], None] = print,
                   progress: Callable[[int, str], None] | None = None) -> list[TrainResult]:
    """Train each wave's jobs together (train_together), one wave after another; results in the jobs' order.
    `progress(samples seen by all jobs so far, note)` follows them all as one task."""
    seen: dict[str, int] = {}

    def reporter(job: TrainJob) -> Callable[[int, str], None] | None:
        def report(samples: int, note: str) -> None:
            seen[job.name] = samples
            progress(sum(seen.values()), f"{job.name} {note}")
        return report if progress else None

    results = []
    for wave in waves:
        results += train_together(wave, log, [reporter(job) for job in wave])
        seen.update({job.name: job.samples_seen for job in wave})
    return results


@dataclass
class _Running:
    """A trainer process whose output is being read."""

    job: TrainJob
    proc: subprocess.Popen
    result: TrainResult
    log: Callable[[str], None]
    progress: Callable[[int, str], None] | None
    started: float = field(default_factory=time.perf_counter)
    tail: list[str] = field(default_factory=list)
    pending: bytes = b""

    def take(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            self.tail = (self.tail + [line.rstrip()])[-40:]
            point = parse_log_line(line)
            if point:
                seen, loss, rate = point
                self.result.samples_per_second.append(rate)
                note = f"loss {loss:.4f}, {rate:.0f} samples/s"
                if self.progress:
                    self.progress(seen, note)
                else:
                    self.log(f"samples {seen}/{self.job.samples_seen} {note}")

    def finish(self) -> TrainResult:
        self.result.seconds = time.perf_counter() - self.started
        code = self.proc.returncode
        if code != 0 or not self.job.final_checkpoint.exists():
            raise RuntimeError(
                f"open_clip training of {self.job.name} failed (exit code {code}); last output:\n"
                + "\n".join(self.tail) + "\nRe-materialize to resume from the latest checkpoint.")
        self.result.losses = read_curve(self.job.log_file)
        return self.result


def _start(job: TrainJob, log: Callable[[str], None], progress, held: ExitStack) -> _Running | TrainResult:
    """Take the job's lock (held until `held` closes) and start its trainer, or return its result if complete."""
    job.logs_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = held.enter_context(_exclusive(job.logs_dir / f"{job.name}.lock", LOCK_WAIT_SECONDS))
    discard_unreadable_checkpoints(job, log)
    start_epoch = completed_epochs(job)
    if start_epoch >= job.scale.epochs:
        return TrainResult(job.final_checkpoint, 0.0, losses=read_curve(job.log_file), resumed_from_epoch=start_epoch)
    launched = job.nproc > 1 or bool(job.ray_address)  # by torchrun, whose parser must not see open_clip's flags
    if launched:
        job.argv_file.write_text(json.dumps(job.argv()))
    log(f"training {job.name}: {' '.join(job.command())} {' '.join(job.argv()) if launched else ''}")
    if start_epoch:
        log(f"resuming {job.name} from checkpoint epoch_{start_epoch}.pt")
    proc = held.enter_context(subprocess.Popen(
        job.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_child_env(job.threads),
        start_new_session=True, pass_fds=(lock_fd,), preexec_fn=_prepare_trainer))
    return _Running(job, proc, TrainResult(job.final_checkpoint, 0.0, resumed_from_epoch=start_epoch), log, progress)


def _stream(runs: list[_Running]) -> None:
    """Read every trainer's output until all have exited. A cancelled or failed step (an exception here) must
    not leave a trainer running: all are killed."""
    try:
        with selectors.DefaultSelector() as selector:
            for run in runs:
                selector.register(run.proc.stdout, selectors.EVENT_READ, run)
            while selector.get_map():
                for key, _ in selector.select():
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        key.data.take(data)
                    else:  # end of output: the trainer has exited, or is about to
                        selector.unregister(key.fileobj)
                        key.data.take(b"\n")
                        key.data.proc.wait()
    except BaseException:
        for run in runs:
            if run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
        raise


def parse_log_line(line: str) -> tuple[int, float, float] | None:
    """(samples seen, loss, samples/s) from one of open_clip's training log lines; only rank 0's count (open_clip
    logs progress on rank 0 alone; torchrun prefixes other ranks' lines with `[rankN]:`)."""
    m = LOG_LINE.search(line)
    if not m or OTHER_RANK.match(line):
        return None
    return int(m["epoch"]) * int(m["per_epoch"]) + int(m["seen"]), float(m["loss"]), float(m["sps"])


def read_curve(log_file: Path) -> list[tuple[int, float]]:
    """The whole run's (samples seen, loss) from open_clip's out.log, across resumes: where a killed
    attempt logged a point that the resumed one logged again, the later wins."""
    if not log_file.exists():
        return []
    points = {}
    for line in log_file.read_text(errors="replace").splitlines():
        point = parse_log_line(line)
        if point:
            points[point[0]] = point[1]
    return sorted(points.items())


@contextmanager
def _exclusive(lock_path: Path, wait_seconds: float) -> Iterator[int]:
    """Hold an exclusive lock on lock_path; its descriptor is inherited by the trainer's processes, so
    the lock lives as long as any of them does, even an orphan of a killed orchestrator. The processes
    of a run just killed take a few seconds to go (data loader workers notice their parent's death
    on a timer), so the lock is awaited that long before giving up."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                raise RuntimeError(
                    f"another training process is still writing {lock_path.parent} (it holds {lock_path}); "
                    "wait for it to finish or kill it (`fuser -k` on the lock file), then materialize again"
                ) from None
        os.set_inheritable(fd, True)
        yield fd
    finally:
        os.close(fd)


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to kill it when the orchestrator dies (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _prepare_trainer() -> None:
    """In the trainer's process, before exec: it dies with the orchestrator, and starts with the default SIGINT and
    SIGTERM even when a backgrounded run ignores both (core.processes), so that it can be stopped."""
    die_with_parent()
    restore_default_signals()


def _child_env(threads: int = 0) -> dict:
    env = settings.child_environment(**({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    # The child imports this project; make sure it can, even when run from another directory.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
