"""Trainings side by side on the CPU: is it faster to run a strategy's seeds one after another on every core, or
together, the cores shared out between them (the accelerator's `cpu_trainings_at_once`)?

    .venv/bin/python benchmarks/concurrent_training.py [--samples-seen 10000] [--seeds 3] [--out DIR]

On the same synthetic training shards as benchmarks/training.py, with the tiny recipe (`--samples-seen` per
training), it trains `--seeds` seeds through `trainer.train_in_waves`, as the `checkpoint` asset does, in every
arrangement worth trying on this machine: one at a time on all cores (the baseline: what the main command did
before), two at a time, and all together, each training with an equal share of the cores. It also times a
single training on one core and on all cores (how well one training uses the cores). Wall seconds are the
figure; the speed-up is the baseline's wall seconds over the arrangement's. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import TINY, ensure_shards  # noqa: E402  (beside this script)

from datacomp_assets.core.trainer import TrainJob, train_in_waves  # noqa: E402


def timed(jobs_in_waves: list[list[TrainJob]]) -> dict:
    start = time.perf_counter()
    results = train_in_waves(jobs_in_waves, log=lambda message: None)
    return {"wall_seconds": round(time.perf_counter() - start, 1),
            "per_training_seconds": [round(r.seconds, 1) for r in results],
            "final_losses": [round(r.final_loss, 4) for r in results if r.final_loss is not None]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-seen", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("data/benchmarks/concurrent_training"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    shards = ensure_shards(args.out / "shards", 5_000)
    recipe = replace(TINY, samples_seen=args.samples_seen)

    def jobs(label: str, threads: int, count: int) -> list[TrainJob]:
        shutil.rmtree(args.out / label, ignore_errors=True)
        return [TrainJob(recipe, shards["pattern"], args.out / label, f"seed_{seed}", seed=seed, threads=threads)
                for seed in range(count)]

    def waves(label: str, at_once: int) -> list[list[TrainJob]]:
        every = jobs(label, 0, args.seeds)
        groups = [every[i:i + at_once] for i in range(0, len(every), at_once)]
        return [[job if len(g) == 1 else replace(job, threads=max(1, cores // len(g))) for job in g] for g in groups]

    figures = {
        "one_training_all_cores": timed([jobs("one_all", cores, 1)]),
        "one_training_one_core": timed([jobs("one_one", 1, 1)]),
        "seeds_one_at_a_time": timed(waves("in_turn", 1)),
        "seeds_two_at_a_time": timed(waves("two", 2)),
        f"seeds_{args.seeds}_at_once": timed(waves("all", args.seeds)),
    }
    baseline = figures["seeds_one_at_a_time"]["wall_seconds"]
    for name, figure in figures.items():
        if name.startswith("seeds_"):
            figure["speed_up"] = round(baseline / figure["wall_seconds"], 3)
    print(json.dumps({"benchmark": "concurrent_training", "command": " ".join(sys.argv), "cores": cores,
                      "samples_seen_per_training": args.samples_seen, "seeds": args.seeds, "model": TINY.model,
                      "machine": platform.platform(), "figures": figures}))


if __name__ == "__main__":
    main()
