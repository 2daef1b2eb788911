"""Training and evaluation throughput at the tiny scale: our training path against a bare open_clip run.

    .venv/bin/python benchmarks/training.py [--repeats 3] [--samples-seen 20000] [--pool 5000] [--threads 0]
                                            [--steps train,eval] [--out data/benchmarks/training]

Writes (once, cached under --out) `--pool` synthetic samples as webdataset training shards, laid out as the
`checkpoint` asset's resharding lays them out (jpg resized like img2dataset's output at the tiny scale's
image size, txt, json), then, in the same run:

1. training: `trainer.train(TrainJob(...))`, the `checkpoint` asset's path (open_clip's trainer in a child
   process, `python -m datacomp_assets.core.open_clip_entry`, its output streamed back and parsed),
   against a bare `open_clip_train.main.main(argv)` in a child process of its own, with the same argv
   (`TrainJob.argv()`), the same environment and our model configs registered the same way. The two
   alternate (ours, bare, then bare, ours, ...) `--repeats` times, each in a fresh log dir. The recipe is the
   tiny scale's (datacomp-tiny, batch 256, fp32 on the CPU, one data worker), with `--samples-seen`.
   Both runs' open_clip logs (`out.log`) are parsed with the same regex (`trainer.LOG_LINE`):
   - steady samples/s: the median of the per-batch rates open_clip logs, the first line of each epoch
     (data loader start-up) left out;
   - end-to-end samples/s: samples seen / wall seconds of the whole run (interpreter start, imports,
     model creation, checkpoint saving included);
   - loop samples/s: samples seen / seconds inside open_clip's training loop (from its `Batch (t)` means),
     which, unlike the median, counts every batch; wall - loop seconds is the time outside the loop;
   - CPU seconds of the whole run (this process's and its children's), the least sensitive to other load.
   The overhead ratio is bare samples/s / ours samples/s (1.05: ours 5% slower; target: at most 1.05), of
   the medians over repeats, and (`paired_...`) the median of each repeat's ratio between neighbouring runs.
2. evaluation: `zeroshot.evaluate_checkpoint` on the tiny suite (`suite.build_suite`, every task in
   `suite.TASKS`) with the checkpoint of the first training run of ours, in images per second (test images
   of all tasks / seconds, model loading, decoding, prompts and metrics included), against the bare rate of
   `model.encode_image` alone over the same images, already decoded and preprocessed, at the same batch size.

Prints progress lines, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from datacomp_assets.core.scales import SCALES  # noqa: E402
from datacomp_assets.core.shards import brace_pattern, write_webdataset  # noqa: E402
from datacomp_assets.core.trainer import LOG_LINE, TrainJob, _child_env, train  # noqa: E402
from datacomp_assets.world.web import WebConfig, encode_jpeg, render, sample  # noqa: E402

TINY = SCALES["tiny"]
BATCH_TIME = re.compile(r"Batch \(t\): (?P<avg>[\d.]+),")
# The bare run: open_clip's own entry point, after registering our model configs (open_clip only knows its
# own architectures). argv follows `-c CODE`, so sys.argv[1:] is open_clip's argv.
BARE_ENTRY = ("import sys\n"
              "from datacomp_assets.core.models import register_model_configs\n"
              "register_model_configs()\n"
              "from open_clip_train.main import main\n"
              "main(sys.argv[1:])\n")


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- training shards

def _training_sample(index: int, config: WebConfig) -> tuple[str, dict[str, bytes]]:
    """One synthetic pair as the pool's shards hold it: the image resized as img2dataset does at the tiny
    scale (keep_ratio_largest, only if bigger, jpg quality 95), its caption and its uid."""
    s = sample(index, config)
    image = render(s)
    image.thumbnail((TINY.image_size, TINY.image_size))
    return f"{index:09d}", {"jpg": encode_jpeg(image, 95), "txt": s.text.encode(),
                            "json": json.dumps({"uid": s.uid, "caption": s.text}).encode()}


def ensure_shards(directory: Path, pool: int) -> dict:
    """`pool` samples in at least 4 shards of at most the scale's shard size (as `reshard` writes them);
    shards already written for the same pool size are kept."""
    per_shard = max(1, min(TINY.shard_size, -(-pool // 4)))
    count = -(-pool // per_shard)
    info_file = directory / "info.json"
    info = {"pool": pool, "shards": count, "per_shard": per_shard}
    if info_file.exists() and json.loads(info_file.read_text()).get("pool") == pool:
        return {**json.loads(info_file.read_text()), "pattern": brace_pattern(directory, count), "generated": False}
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    config, start = WebConfig(), time.perf_counter()
    for shard in range(count):
        indices = range(shard * per_shard, min(pool, (shard + 1) * per_shard))
        write_webdataset(directory / f"{shard:08d}.tar", (_training_sample(i, config) for i in indices))
        log(f"  shards: wrote {shard + 1}/{count}")
    info["seconds"] = round(time.perf_counter() - start, 1)
    info["bytes"] = sum(p.stat().st_size for p in directory.glob("*.tar"))
    info_file.write_text(json.dumps(info) + "\n")
    return {**info, "pattern": brace_pattern(directory, count), "generated": True}


# ---------------------------------------------------------------- one training run

def parse_open_clip_log(path: Path, batch: int) -> dict:
    """Figures from open_clip's `out.log`, the same for both runs: per-batch rates and losses (LOG_LINE),
    samples seen, and the time inside the training loop. open_clip resets its meters after each log line, so
    a line's `Batch (t)` is the mean time of the batches since the previous line (data waits included)."""
    epochs: dict[int, list[dict]] = {}
    for line in path.read_text().splitlines():
        m = LOG_LINE.search(line)
        if m:
            t = BATCH_TIME.search(line)
            epochs.setdefault(int(m["epoch"]), []).append(
                {"seen": int(m["seen"]), "sps": float(m["sps"]), "loss": float(m["loss"]),
                 "batch_avg": float(t["avg"]) if t else float("nan")})
    if not epochs:
        raise RuntimeError(f"no training log lines in {path}")
    # Each epoch's first line times the data loader's start-up; runs too short to log more keep it.
    steady = ([row["sps"] for rows in epochs.values() for row in rows[1:]]
              or [row["sps"] for rows in epochs.values() for row in rows])
    last = [rows[-1] for rows in epochs.values()]
    loop = sum(row["batch_avg"] * (row["seen"] - previous) / batch
               for rows in epochs.values() for row, previous in zip(rows, [0] + [r["seen"] for r in rows]))
    return {
        "log_lines": sum(len(rows) for rows in epochs.values()),
        "samples_seen": sum(row["seen"] for row in last),
        "steady_samples_per_second": round(statistics.median(steady), 1),
        "loop_seconds": round(loop, 2),
        "final_loss": last[-1]["loss"],
    }


def _clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds): user + system time of this process and of its finished children (a
    child's own children count once it has waited for them, as open_clip's data loader workers are)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _finish(job: TrainJob, start: tuple[float, float], keep_checkpoint: bool) -> dict:
    end = _clock()
    wall = end[0] - start[0]
    figures = parse_open_clip_log(job.log_file, job.scale.global_batch)
    if figures["samples_seen"] != job.samples_seen:
        raise RuntimeError(f"{job.log_file}: {figures['samples_seen']} samples logged, {job.samples_seen} expected")
    figures["wall_seconds"] = round(wall, 2)
    # CPU seconds depend much less than wall seconds on what else runs on a shared machine.
    figures["cpu_seconds"] = round(end[1] - start[1], 2)
    figures["end_to_end_samples_per_second"] = round(figures["samples_seen"] / wall, 1)
    figures["loop_samples_per_second"] = round(figures["samples_seen"] / figures["loop_seconds"], 1)
    figures["outside_loop_seconds"] = round(wall - figures["loop_seconds"], 2)
    if not keep_checkpoint:  # checkpoints hold the optimizer state: tens of MB per epoch per run
        shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    return figures


def run_ours(job: TrainJob, keep_checkpoint: bool) -> dict:
    """The `checkpoint` asset's path: trainer.train, which streams and parses the child's output."""
    messages: list[str] = []
    start = _clock()
    result = train(job, log=messages.append)
    figures = _finish(job, start, keep_checkpoint)
    figures["trainer_median_samples_per_second"] = result.median_samples_per_second  # what the asset reports
    return figures


def run_bare(job: TrainJob) -> dict:
    """open_clip_train.main.main(argv) in a child process, its output to a file, nothing parsed on the way."""
    job.logs_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", BARE_ENTRY, *job.argv()]
    start = _clock()
    with open(job.logs_dir / "stdout.txt", "w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=_child_env(job.threads))
    if proc.returncode != 0 or not job.final_checkpoint.exists():
        tail = (job.logs_dir / "stdout.txt").read_text().splitlines()[-30:]
        raise RuntimeError(f"bare open_clip run failed (exit code {proc.returncode}):\n" + "\n".join(tail))
    return _finish(job, start, keep_checkpoint=False)


def _summary(runs: list[dict]) -> dict:
    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 2)

    return {"steady_samples_per_second": median("steady_samples_per_second"),
            "end_to_end_samples_per_second": median("end_to_end_samples_per_second"),
            "loop_samples_per_second": median("loop_samples_per_second"),
            "wall_seconds": median("wall_seconds"), "cpu_seconds": median("cpu_seconds"),
            "outside_loop_seconds": median("outside_loop_seconds"),
            "runs": runs}


def bench_training(shards: str, runs_dir: Path, samples_seen: int, repeats: int, threads: int) -> dict:
    scale = replace(TINY, samples_seen=samples_seen)
    shutil.rmtree(runs_dir, ignore_errors=True)
    # Untimed: the first child to import torch and open_clip reads them from disk, the others from the page
    # cache; without this the first run measured (ours) would pay for it.
    subprocess.run([sys.executable, "-c", "import open_clip_train.main"], check=True, env=_child_env(threads),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours, bare = [], []
    for r in range(repeats):
        # Alternating, and which side goes first swaps each repeat (ours, bare, bare, ours, ...), so that a
        # load that drifts during the run (the machine may be shared) favours neither side.
        pair = (("ours", ours), ("bare", bare))
        for name, runs in pair if r % 2 == 0 else pair[::-1]:
            job = TrainJob(scale, shards, runs_dir / f"{r}_{name}", "train", device="cpu", precision="fp32",
                           threads=threads)
            figures = run_ours(job, keep_checkpoint=r == 0) if name == "ours" else run_bare(job)
            runs.append(figures)
            log(f"  {name} #{r + 1}: {figures['wall_seconds']} s wall, {figures['samples_seen']} samples, "
                f"steady {figures['steady_samples_per_second']}/s, "
                f"end-to-end {figures['end_to_end_samples_per_second']}/s, "
                f"loop {figures['loop_samples_per_second']}/s, {figures['outside_loop_seconds']} s outside the loop, "
                f"{figures['cpu_seconds']} CPU s, "
                f"loss {figures['final_loss']}")
    report = {"ours": _summary(ours), "bare": _summary(bare)}
    for kind in ("steady", "end_to_end", "loop"):
        key = f"{kind}_samples_per_second"
        report[f"overhead_ratio_{kind}"] = round(report["bare"][key] / report["ours"][key], 3)
        # The same ratio within each repeat's pair of neighbouring runs, then the median over repeats: less
        # sensitive than the ratio of medians to a load that changes between repeats.
        paired = [b[key] / o[key] for o, b in zip(ours, bare)]
        report[f"paired_overhead_ratio_{kind}"] = round(statistics.median(paired), 3)
    report["paired_cpu_seconds_ratio"] = round(statistics.median(o["cpu_seconds"] / b["cpu_seconds"]
                                                                 for o, b in zip(ours, bare)), 3)
    report["target_ratio"] = 1.05
    report["meets_target"] = max(report["overhead_ratio_steady"], report["overhead_ratio_end_to_end"]) <= 1.05
    report["argv"] = TrainJob(scale, shards, runs_dir / "<repeat>_<ours|bare>", "train", threads=threads).argv()
    report["checkpoint"] = str(runs_dir / "0_ours" / "train" / "checkpoints" / f"epoch_{scale.epochs}.pt")
    return report


# ---------------------------------------------------------------- evaluation

def ours_evaluation(checkpoint: Path | None, suite_root: Path, out_jsonl: Path, batch: int) -> float:
    from datacomp_assets.evaluation.zeroshot import evaluate_checkpoint

    out_jsonl.unlink(missing_ok=True)  # a fresh results file: nothing is skipped as already done
    start = time.perf_counter()
    evaluate_checkpoint(TINY.model, checkpoint, suite_root, out_jsonl, batch_size=batch)
    return time.perf_counter() - start


def bare_encode(checkpoint: Path | None, suite_root: Path, tasks: list[str], batch: int) -> dict:
    """model.encode_image alone over every task's test images, decoded and preprocessed beforehand."""
    import torch

    from datacomp_assets.core.models import load_model
    from datacomp_assets.evaluation.zeroshot import decode_image, iter_shard_samples, sample_image

    model, preprocess, _ = load_model(TINY.model, checkpoint)
    start = time.perf_counter()
    images = [decode_image(sample_image(s)) for task in tasks for s in iter_shard_samples(suite_root / task)]
    decoded = time.perf_counter()
    tensors = torch.stack([preprocess(im) for im in images])
    preprocessed = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(tensors), batch):
            model.encode_image(tensors[i:i + batch])
    encoded = time.perf_counter()
    return {"images": len(images), "decode_seconds": decoded - start, "preprocess_seconds": preprocessed - decoded,
            "encode_seconds": encoded - preprocessed}


def bench_evaluation(checkpoint: Path | None, out: Path, repeats: int, batch: int, size_scale: float) -> dict:
    from datacomp_assets.world.eval_suite import build_suite

    suite_root = out / f"eval_suite_{size_scale}"
    start = time.perf_counter()
    counts = build_suite(suite_root, size_scale=size_scale)
    log(f"  suite: {len(counts)} tasks, {sum(counts.values())} test images under {suite_root} "
        f"({time.perf_counter() - start:.1f} s)")
    images = sum(counts.values())
    ours, bare = [], []
    for r in range(repeats):
        ours.append(ours_evaluation(checkpoint, suite_root, out / "eval_results.jsonl", batch))
        bare.append(bare_encode(checkpoint, suite_root, list(counts), batch))
        log(f"  evaluate_checkpoint #{r + 1}: {ours[-1]:.2f} s ({images / ours[-1]:.0f} images/s); "
            f"bare encode_image {bare[-1]['encode_seconds']:.2f} s "
            f"({images / bare[-1]['encode_seconds']:.0f} images/s), decode {bare[-1]['decode_seconds']:.2f} s, "
            f"preprocess {bare[-1]['preprocess_seconds']:.2f} s")
    ours_s = statistics.median(ours)

    def median(key: str) -> float:
        return statistics.median(b[key] for b in bare)

    return {
        "checkpoint": str(checkpoint) if checkpoint else "none (random weights: throughput does not depend on them)",
        "tasks": counts, "test_images": images, "batch_size": batch, "size_scale": size_scale,
        "ours_seconds": round(ours_s, 2), "ours_images_per_second": round(images / ours_s, 1),
        "bare_encode_seconds": round(median("encode_seconds"), 2),
        "bare_encode_images_per_second": round(images / median("encode_seconds"), 1),
        "bare_decode_seconds": round(median("decode_seconds"), 2),
        "bare_preprocess_seconds": round(median("preprocess_seconds"), 2),
        "ours_over_bare_encode_seconds": round(ours_s / median("encode_seconds"), 2),
        "ours_seconds_runs": [round(s, 2) for s in ours],
    }


# ---------------------------------------------------------------- the run

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--samples-seen", type=int, default=20_000, help="training budget of each run")
    parser.add_argument("--pool", type=int, default=5_000, help="samples in the training shards")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (OMP_NUM_THREADS); 0: default")
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--eval-size-scale", type=float, default=TINY.eval_suite_scale)
    parser.add_argument("--steps", default="train,eval")
    parser.add_argument("--out", default="data/benchmarks/training")
    args = parser.parse_args()
    steps = set(args.steps.split(","))
    out = Path(args.out).resolve()

    import open_clip
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {
        "benchmark": "training",
        "machine": {"cpus": os.cpu_count(), "threads": args.threads or torch.get_num_threads(),
                    "torch": torch.__version__, "open_clip": open_clip.__version__,
                    "python": platform.python_version(), "processor": platform.machine()},
        "recipe": {"scale": TINY.name, "model": TINY.model, "global_batch": TINY.global_batch, "lr": TINY.lr,
                   "warmup": TINY.warmup, "epochs": TINY.epochs, "samples_seen": args.samples_seen,
                   "device": "cpu", "precision": "fp32", "workers": 1},
        "repeats": args.repeats,
    }
    checkpoint = None
    if "train" in steps:
        log(f"training shards: {args.pool:,} synthetic samples under {out / f'shards_{args.pool}'}")
        shards = ensure_shards(out / f"shards_{args.pool}", args.pool)
        report["shards"] = shards
        log(f"training: ours (trainer.train) against bare open_clip_train.main, {args.samples_seen:,} samples "
            f"seen each, {args.repeats} x alternating")
        report["train"] = bench_training(shards["pattern"], out / "runs", args.samples_seen, args.repeats,
                                         args.threads)
        t = report["train"]
        log(f"  median steady: ours {t['ours']['steady_samples_per_second']}/s, bare "
            f"{t['bare']['steady_samples_per_second']}/s (ratio {t['overhead_ratio_steady']}); "
            f"end-to-end: ours {t['ours']['end_to_end_samples_per_second']}/s, bare "
            f"{t['bare']['end_to_end_samples_per_second']}/s (ratio {t['overhead_ratio_end_to_end']}); "
            f"loop: ours {t['ours']['loop_samples_per_second']}/s, bare {t['bare']['loop_samples_per_second']}/s "
            f"(ratio {t['overhead_ratio_loop']}); paired ratios: steady {t['paired_overhead_ratio_steady']}, "
            f"end-to-end {t['paired_overhead_ratio_end_to_end']}, loop {t['paired_overhead_ratio_loop']}, "
            f"CPU seconds ours/bare {t['paired_cpu_seconds_ratio']}")
        checkpoint = Path(t["checkpoint"])
    if "eval" in steps:
        if checkpoint is None:  # an earlier run's checkpoint, if one is there
            found = sorted((out / "runs").glob("0_ours/train/checkpoints/epoch_*.pt"))
            checkpoint = found[-1] if found else None
        log(f"evaluation: evaluate_checkpoint on the tiny suite against bare encode_image, checkpoint {checkpoint}")
        report["eval"] = bench_evaluation(checkpoint, out, args.repeats, args.eval_batch, args.eval_size_scale)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
