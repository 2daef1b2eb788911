"""Evaluation stage: the scale's evaluation suite and each checkpoint's zero-shot scores."""

import statistics

import dagster as dg

from datacomp_assets.evaluation.suite import TASKS, build_suite
from datacomp_assets.evaluation.zeroshot import aggregate, evaluate_checkpoint
from datacomp_assets.training.assets import checkpoint_file, seed_name
from partitions import by_scale, get_scale, scale_and_strategy, scale_partitions, scale_strategy_partitions
from partitions.scales import require_synthetic
from resources import AcceleratorResource, StorageResource

EVALUATION = "evaluation"


@dg.asset(partitions_def=scale_partitions, group_name=EVALUATION, code_version="1")
def eval_suite(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Zero-shot tasks in clip_benchmark's webdataset layout; no model ever trains on them."""
    scale = get_scale(context.partition_key)
    require_synthetic(scale, "eval_suite")
    root = storage.path(scale.name, "eval_suite")
    counts = build_suite(root, size_scale=scale.eval_suite_scale)
    rows = "\n".join(f"| {k} | {TASKS[k].group} | {TASKS[k].main_metric} | {n} |" for k, n in counts.items())
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(root)), "tasks": len(counts), "images": sum(counts.values()),
        "tasks_table": dg.MetadataValue.md("| task | group | main metric | samples |\n|---|---|---|---|\n" + rows),
    })


def results_file(storage: StorageResource, scale_name: str, strategy: str, seed: int):
    """One seed's scores, in the reference's `eval_results.jsonl` format."""
    return storage.path(scale_name, "eval_results", strategy) / seed_name(seed) / "eval_results.jsonl"


@dg.asset(partitions_def=scale_strategy_partitions, group_name=EVALUATION, code_version="2",
          deps=["checkpoint", dg.AssetDep("eval_suite", partition_mapping=by_scale)], pool="gpu")
def eval_results(context: dg.AssetExecutionContext, storage: StorageResource,
                 accelerator: AcceleratorResource) -> dg.MaterializeResult:
    """Zero-shot classification and retrieval scores of every seed's checkpoint, one line per task."""
    scale, strategy = scale_and_strategy(context)
    device = accelerator.placement(scale.precision).device
    per_seed = {}
    for seed in scale.seeds:
        out = results_file(storage, scale.name, strategy, seed)
        context.log.info(f"seed {seed}: evaluating {checkpoint_file(storage, scale, strategy, seed)}")
        per_seed[seed] = evaluate_checkpoint(scale.model, checkpoint_file(storage, scale, strategy, seed),
                                             storage.path(scale.name, "eval_suite"), out, device=device,
                                             progress=context.log.info)
    summaries = {seed: aggregate(rows) for seed, rows in per_seed.items()}
    averages = [s["average"] for s in summaries.values()]
    tasks = [r["key"] for r in next(iter(per_seed.values()))]
    task_means = {k: statistics.mean(next(r for r in rows if r["key"] == k)["metrics"]["main_metric"]
                                     for rows in per_seed.values()) for k in tasks}
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(results_file(storage, scale.name, strategy, scale.seeds[0]).parent.parent)),
        "seeds": list(scale.seeds),
        "average": statistics.mean(averages),
        "average_std": statistics.stdev(averages) if len(averages) > 1 else 0.0,
        "average_per_seed": dg.MetadataValue.json({seed_name(s): v["average"] for s, v in summaries.items()}),
        **{f"task/{k}": v for k, v in task_means.items()},
        "groups": dg.MetadataValue.json({seed_name(s): {k: v for k, v in summary.items() if k != "average"}
                                         for s, summary in summaries.items()}),
    })
