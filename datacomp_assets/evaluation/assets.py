"""Evaluation stage: the scale's evaluation suite and each checkpoint's zero-shot scores."""

import json

import dagster as dg

from datacomp_assets.evaluation.suite import TASKS, build_suite
from datacomp_assets.evaluation.zeroshot import aggregate, evaluate_checkpoint
from datacomp_assets.training.assets import checkpoint_file
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


@dg.asset(partitions_def=scale_strategy_partitions, group_name=EVALUATION, code_version="1",
          deps=["checkpoint", dg.AssetDep("eval_suite", partition_mapping=by_scale)], pool="gpu")
def eval_results(context: dg.AssetExecutionContext, storage: StorageResource,
                 accelerator: AcceleratorResource) -> dg.MaterializeResult:
    """Zero-shot classification and retrieval scores, one `eval_results.jsonl` line per task."""
    scale, strategy = scale_and_strategy(context)
    ckpt = checkpoint_file(storage, scale, strategy)
    out = storage.path(scale.name, "eval_results", strategy) / "eval_results.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    device = accelerator.placement(scale.precision).device
    rows = evaluate_checkpoint(scale.model, ckpt, storage.path(scale.name, "eval_suite"), out, device=device,
                               progress=context.log.info)
    summary = aggregate(rows)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(out)),
        "average": summary["average"],
        **{f"task/{r['key']}": r["metrics"]["main_metric"] for r in rows},
        "groups": dg.MetadataValue.json({k: v for k, v in summary.items() if k != "average"}),
        "results": dg.MetadataValue.md("```\n" + "\n".join(json.dumps(r) for r in rows) + "\n```"),
    })
