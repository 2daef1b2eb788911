"""Evaluation stage: the scale's evaluation suite and each checkpoint's zero-shot scores.

At `tiny` the suite is built here (synthetic tasks in clip_benchmark's layout); at the paper's scales it is
DataComp's 38 reference tasks (and its two fairness tasks, outside the average), read from a local directory
or fetched from the Hugging Face Hub.
"""

import statistics
from pathlib import Path

import dagster as dg

from datacomp_assets.core.layout import Asset, Group, Layout, seed_name
from datacomp_assets.core.progress import Progress
from datacomp_assets.core.lineage import code_revision, file_sha256, files_sha256, read_lineage, write_lineage
from datacomp_assets.core.reference_tasks import TASKLIST
from datacomp_assets.core.scales import ScaleConfig
from datacomp_assets.evaluation.noise import write_noise
from datacomp_assets.evaluation.on_engine import CheckpointToScore, evaluate_on_engine, part_samples
from datacomp_assets.evaluation.reference import ensure_reference_suite
from datacomp_assets.evaluation.zeroshot import summarize
from datacomp_assets.world.eval_suite import TASKS, build_suite
from partitions import (
    STRATEGY_DEFINITION, by_scale, get_scale, scale_and_strategy, scale_partitions, scale_strategy_partitions)
from resources import AcceleratorResource, EngineResource, EvaluationDataResource, StorageResource

# A scale's `eval_suite`: the miniature's own, or DataComp's tasklist.yml (the 38 averaged, and FairFace and UTKFace
# outside the average, as its evaluate.py runs them).
SUITES = ("synthetic", "reference")


def suite_for(scale: ScaleConfig, layout: Layout, eval_data: EvaluationDataResource) -> tuple[Path, dict]:
    """(directory, task registry) of the scale's evaluation suite."""
    if scale.eval_suite == "synthetic":
        return layout.eval_suite(scale.name), TASKS
    if scale.eval_suite == "reference":
        return eval_data.root(layout), TASKLIST
    raise ValueError(f"scale {scale.name!r}: unknown eval_suite {scale.eval_suite!r}; choose one of {SUITES}")


@dg.asset(partitions_def=scale_partitions, group_name=Group.EVALUATION, code_version="2")
def eval_suite(context: dg.AssetExecutionContext, storage: StorageResource,
               eval_data: EvaluationDataResource) -> dg.MaterializeResult:
    """Zero-shot tasks in clip_benchmark's webdataset layout, never trained on: built at tiny, DataComp's 38
    reference tasks and FairFace, UTKFace at the paper's scales (fails at once, naming what is missing, when they
    cannot be had)."""
    with storage.writing(context):
        scale = get_scale(context.partition_key)
        root, registry = suite_for(scale, storage.layout, eval_data)
        if scale.eval_suite == "synthetic":
            counts = build_suite(root, size_scale=scale.eval_suite_scale)
        else:
            fetched = ensure_reference_suite(root, eval_data.download, tasks=list(registry), progress=context.log.info)
            counts = {key: task.size for key, task in registry.items()}
            context.log.info(f"{len(fetched)} reference tasks downloaded, {len(registry) - len(fetched)} already there")
        rows = "\n".join(f"| {k} | {registry[k].group} | {registry[k].main_metric} | {n} |" for k, n in counts.items())
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(root)), "tasks": len(counts), "images": sum(counts.values()),
            "tasks_table": dg.MetadataValue.md("| task | group | main metric | samples |\n|---|---|---|---|\n" + rows),
        })


@dg.asset(partitions_def=scale_strategy_partitions, group_name=Group.EVALUATION, code_version="3",
          deps=[STRATEGY_DEFINITION, Asset.CHECKPOINT, dg.AssetDep(Asset.EVAL_SUITE, partition_mapping=by_scale)],
          pool="gpu")
def eval_results(context: dg.AssetExecutionContext, storage: StorageResource, accelerator: AcceleratorResource,
                 eval_data: EvaluationDataResource, engine: EngineResource) -> dg.MaterializeResult:
    """Zero-shot scores of every seed's checkpoint, one line per task; tasks already written are not redone. One
    engine task per checkpoint and task group: in this process here, Ray tasks on a cluster (on a GPU each where
    it has them)."""
    with storage.writing(context):
        scale, strategy = scale_and_strategy(context)
        on = engine.engine()
        device = accelerator.placement(scale.precision, on).device
        layout = storage.layout
        suite_root, registry = suite_for(scale, layout, eval_data)
        out = layout.eval_results_dir(scale.name, strategy)
        scored = read_lineage(out).get("checkpoints", {})
        noise, to_score = {}, []
        for seed in scale.seeds:
            ckpt = layout.seed_checkpoint(scale.name, strategy, seed, scale.epochs)
            results = layout.results_file(scale.name, strategy, seed)
            samples = layout.eval_samples_file(scale.name, strategy, seed)
            ckpt_sha256 = file_sha256(ckpt)

            def part(group: str, seed=seed) -> Path:
                return layout.eval_part_file(scale.name, strategy, seed, group)

            if scored.get(seed_name(seed), ckpt_sha256) != ckpt_sha256 and results.exists():
                # Lines already written score an earlier checkpoint: skipping them as done would be wrong.
                context.log.warning(f"seed {seed}: {ckpt} changed since it was scored; scoring it again")
                results.unlink()
                samples.unlink(missing_ok=True)
            if scored.get(seed_name(seed)) != ckpt_sha256:
                for group in {task.group for task in registry.values()}:  # nor are a killed run's parts
                    part(group).unlink(missing_ok=True)
                    part_samples(part(group)).unlink(missing_ok=True)
                # Reset the record only when a seed's scores are about to be replaced: a failed run over unchanged
                # checkpoints must leave the finished record (and the board's consistency) as it was.
                scored[seed_name(seed)] = ckpt_sha256
                write_lineage(out, {"checkpoints": scored, "complete": False})
            to_score.append(CheckpointToScore(ckpt, results, samples, part, f"seed {seed}"))
        context.log.info(f"evaluating {len(to_score)} checkpoints on {on.describe()} ({device})")
        lines = evaluate_on_engine(
            scale.model, to_score, suite_root, registry, device, on, engine.task_gpus(device), context.log.info,
            task_done=Progress(context.log.info, "tasks scored", len(scale.seeds) * len(registry), "tasks"))
        per_seed = dict(zip(scale.seeds, lines))
        for seed, rows in per_seed.items():
            averaged = [r["key"] for r in rows if r["metrics"].get("main_metric") is not None]
            noise[seed] = write_noise(layout.eval_samples_file(scale.name, strategy, seed),
                                      layout.eval_noise_file(scale.name, strategy, seed), averaged)
        summaries = {seed: summarize(rows) for seed, rows in per_seed.items()}
        averages = [s["average"] for s in summaries.values()]
        task_means = {row["key"]: statistics.mean(r["metrics"]["main_metric"] for rows in per_seed.values()
                                                  for r in rows if r["key"] == row["key"])
                      for row in next(iter(per_seed.values()))
                      if row["metrics"].get("main_metric") is not None}  # FairFace and UTKFace have none
        results_sha256 = files_sha256(layout.results_file(scale.name, strategy, seed) for seed in scale.seeds)
        write_lineage(out, {"checkpoints": scored, "results_sha256": results_sha256, "complete": True,
                            "code_revision": code_revision()})
        return dg.MaterializeResult(data_version=dg.DataVersion(results_sha256[:16]), metadata={
            "path": dg.MetadataValue.path(str(out)),
            "seeds": list(scale.seeds),
            "average": statistics.mean(averages),
            "average_std": statistics.stdev(averages) if len(averages) > 1 else 0.0,
            "average_per_seed": dg.MetadataValue.json({seed_name(s): v["average"] for s, v in summaries.items()}),
            # The 95% bootstrap interval over test samples (None where results predate the per-sample file).
            "average_eval_noise_95": dg.MetadataValue.json({seed_name(s): n["average"] for s, n in noise.items()}),
            "task_eval_noise_95": dg.MetadataValue.json(
                {k: [v["low"], v["high"]] for k, v in noise[scale.seeds[0]]["tasks"].items()}),
            **{f"task/{k}": v for k, v in task_means.items()},
            "groups": dg.MetadataValue.json({seed_name(s): {k: v for k, v in summary.items() if k != "average"}
                                             for s, summary in summaries.items()}),
        })
