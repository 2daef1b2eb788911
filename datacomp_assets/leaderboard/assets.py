"""Leaderboard stage: every evaluated strategy of a scale, ranked by its mean over training seeds."""

import json
import statistics

import dagster as dg
import numpy as np

from datacomp_assets.evaluation.assets import results_file
from datacomp_assets.evaluation.zeroshot import aggregate, read_results
from datacomp_assets.filtering.strategies import STRATEGIES, track
from datacomp_assets.leaderboard.table import (
    Entry, board_markdown, board_rows, ordering_markdown, ordering_report, rank)
from datacomp_assets.lineage import read_lineage
from partitions import by_scale, get_scale, scale_partitions
from resources import StorageResource


def lineage_of(storage: StorageResource, scale_name: str, strategy: str) -> dict:
    """A row's lineage from the records each stage wrote, and whether the chain holds: the checkpoints were
    trained on the current subset, and the scores are of the current checkpoints."""
    subset = read_lineage(storage.path(scale_name, "subset", strategy))
    ckpt = read_lineage(storage.path(scale_name, "checkpoint", strategy))
    scores = read_lineage(storage.path(scale_name, "eval_results", strategy))
    checkpoints = ckpt.get("checkpoints", {})
    consistent = None
    if subset and ckpt and scores:
        consistent = (ckpt.get("subset_sha256") == subset.get("subset_sha256")
                      and scores.get("checkpoints") == {seed: c["sha256"] for seed, c in checkpoints.items()})
    return {"subset_path": str(storage.path(scale_name, "subset", strategy) / "subset.npy"),
            "subset_sha256": subset.get("subset_sha256", ""), "pool_version": subset.get("pool_version", ""),
            "strategy_version": subset.get("strategy_version", ""), "checkpoints": checkpoints,
            "results_sha256": scores.get("results_sha256", ""),
            "code_revision": scores.get("code_revision", ckpt.get("code_revision", "")), "consistent": consistent}


def collect_entries(storage: StorageResource, scale_name: str) -> list[Entry]:
    """One entry per strategy whose subset and scores (of at least one seed) exist at this scale."""
    scale = get_scale(scale_name)
    entries = []
    for strategy in STRATEGIES:
        subset = storage.path(scale_name, "subset", strategy) / "subset.npy"
        seeds = {seed: read_results(results_file(storage, scale_name, strategy, seed)) for seed in scale.seeds}
        seeds = {seed: rows for seed, rows in seeds.items() if rows}
        if not seeds or not subset.exists():
            continue
        group_scores = [aggregate(list(rows.values())) for rows in seeds.values()]
        groups = {g: statistics.mean(s[g] for s in group_scores) for g in group_scores[0] if g != "average"}
        entries.append(Entry(
            strategy, len(np.load(subset, mmap_mode="r")), scale.samples_seen,
            {seed: {k: r["metrics"]["main_metric"] for k, r in rows.items()} for seed, rows in seeds.items()},
            groups=groups, track=track(strategy), lineage=lineage_of(storage, scale_name, strategy)))
    return entries


@dg.asset(partitions_def=scale_partitions, group_name="leaderboard", code_version="2",
          deps=[dg.AssetDep("eval_results", partition_mapping=by_scale)])
def leaderboard(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Strategies ranked by average zero-shot score (mean over seeds, with its spread), with dataset size,
    samples seen, each task group and each task; and whether the paper's ordering holds beyond the noise."""
    entries = collect_entries(storage, context.partition_key)
    if not entries:
        raise ValueError(f"no evaluated strategy at scale {context.partition_key!r}: materialize eval_results first")
    report = ordering_report([e for e in entries if e.track == "filtering"])
    table = board_markdown(entries)
    if report:
        table += "\n\n### The paper's ordering\n\n" + ordering_markdown(report)
    out = storage.path(context.partition_key, "leaderboard")
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.md").write_text(table + "\n")
    rows = board_rows(entries)
    (out / "leaderboard.json").write_text(json.dumps({"scale": context.partition_key, "rows": rows}, indent=2) + "\n")
    best = rank(entries)[0]
    stale = [e.strategy for e in entries if e.lineage["consistent"] is False]
    if stale:
        context.log.warning(f"rows whose lineage does not hold (re-materialize them): {', '.join(stale)}")
    return dg.MaterializeResult(metadata={
        "leaderboard": dg.MetadataValue.md(table),
        "path": dg.MetadataValue.path(str(out / "leaderboard.md")),
        "rows_json": dg.MetadataValue.path(str(out / "leaderboard.json")),
        "strategies": len(entries), "best_strategy": best.strategy, "best_average": best.average,
        "best_average_std": best.std, "inconsistent_rows": dg.MetadataValue.json(stale),
        "lineage": dg.MetadataValue.json({e.strategy: e.lineage for e in entries}),
        "paper_ordering": dg.MetadataValue.json(report),
    })
