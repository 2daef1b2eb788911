"""Evaluate any open_clip checkpoint file on the tiny suite or on DataComp's 38 tasks, from the command line.

    python -m datacomp_assets.evaluation --model ViT-B-32 --checkpoint epoch_latest.pt --suite reference \\
        --data-dir /data/datacomp_eval --out eval_results.jsonl [--device cuda] [--tasks imagenet1k ...] [--download]

Writes (and resumes) the reference's eval_results.jsonl, prints progress, then the group means and the average
with its 95% evaluation-noise interval (a bootstrap over the test samples; per-sample outcomes in
`<out>.samples.npz`, the intervals in `<out>.noise.json`).
For the reference suite, missing test sets are fetched with --download, or else reported at once, before any
model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUITES = ("tiny", "reference")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(prog="python -m datacomp_assets.evaluation", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="open_clip architecture name, e.g. ViT-B-32 or datacomp-tiny")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="state_dict file (bare, or open_clip's {'state_dict': ...}); omitted: random weights")
    parser.add_argument("--suite", choices=SUITES, default="reference")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder holding the suite's test sets")
    parser.add_argument("--out", type=Path, required=True, help="eval_results.jsonl to write (and resume)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", nargs="+", default=None, help="task keys (default: every task of the suite)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding classification images")
    parser.add_argument("--download", action="store_true",
                        help="reference suite: fetch missing test sets from the Hugging Face Hub")
    return parser.parse_args(argv)


def samples_file(out: Path) -> Path:
    """Where the per-sample outcomes of `--out`'s tasks are kept (noise.py reads them)."""
    return out.with_suffix(".samples.npz")


def print_summary(summary: dict[str, float], n_tasks: int, reference: bool, noise: dict | None = None) -> None:
    from datacomp_assets.core.reference_tasks import REFERENCE_TASKS, REPORTED_GROUPS

    groups = [g for g in REPORTED_GROUPS if g in summary] + sorted(
        g for g in summary if g not in REPORTED_GROUPS and g != "average")
    for group in groups:
        print(f"{group}: {summary[group]:.4f}")
    of = f" of {len(REFERENCE_TASKS)}" if reference and n_tasks != len(REFERENCE_TASKS) else ""
    interval = (noise or {}).get("average")
    within = f" (95% evaluation-noise interval {interval['low']:.4f}-{interval['high']:.4f})" if interval else ""
    print(f"Average over {n_tasks}{of} tasks: {summary['average']:.4f}{within}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from datacomp_assets.core.reference_tasks import TASKLIST
    from datacomp_assets.evaluation.hub_rows import HubCacheError
    from datacomp_assets.evaluation.noise import write_noise
    from datacomp_assets.evaluation.reference import MissingEvalData, ensure_reference_suite
    from datacomp_assets.evaluation.zeroshot import evaluate_checkpoint, summarize
    from datacomp_assets.world.eval_suite import TASKS

    # The reference suite is all of tasklist.yml, as evaluate.py runs it: the 38 and FairFace, UTKFace.
    registry = TASKLIST if args.suite == "reference" else TASKS
    unknown = [key for key in args.tasks or [] if key not in registry]
    if unknown:
        print(f"unknown {args.suite} task(s): {', '.join(unknown)}; known: {', '.join(registry)}", file=sys.stderr)
        return 2
    if args.checkpoint is not None and not args.checkpoint.is_file():
        print(f"checkpoint not found: {args.checkpoint}", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(message, flush=True)

    try:
        if args.suite == "reference":
            ensure_reference_suite(args.data_dir, download=args.download, tasks=args.tasks or list(registry),
                                   progress=log)
        rows = evaluate_checkpoint(args.model, args.checkpoint, args.data_dir, args.out, device=args.device,
                                   batch_size=args.batch_size, progress=log, tasks=args.tasks, registry=registry,
                                   num_workers=args.workers, samples_file=samples_file(args.out))
    except (MissingEvalData, HubCacheError) as error:
        print(error, file=sys.stderr)
        return 2
    scored = [row["key"] for row in rows if row["metrics"].get("main_metric") is not None]  # not FairFace, UTKFace
    noise = write_noise(samples_file(args.out), args.out.with_suffix(".noise.json"), scored)
    print_summary(summarize(rows), len(scored), args.suite == "reference", noise)
    return 0
