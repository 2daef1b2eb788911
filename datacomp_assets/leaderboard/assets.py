"""Leaderboard stage: every evaluated strategy of a scale, ranked."""

import dagster as dg
import numpy as np

from datacomp_assets.evaluation.zeroshot import read_results
from datacomp_assets.filtering.strategies import STRATEGIES, track
from datacomp_assets.leaderboard.table import Entry, rank, to_markdown
from partitions import by_scale, get_scale, scale_partitions
from resources import StorageResource


def collect_entries(storage: StorageResource, scale_name: str) -> list[Entry]:
    """One entry per strategy whose scores exist at this scale."""
    scale = get_scale(scale_name)
    entries = []
    for strategy in STRATEGIES:
        results = storage.path(scale_name, "eval_results", strategy) / "eval_results.jsonl"
        subset = storage.path(scale_name, "subset", strategy) / "subset.npy"
        if not results.exists() or not subset.exists():
            continue
        rows = read_results(results)
        entries.append(Entry(strategy, len(np.load(subset, mmap_mode="r")), scale.samples_seen,
                             {k: r["metrics"]["main_metric"] for k, r in rows.items()}, track=track(strategy)))
    return entries


@dg.asset(partitions_def=scale_partitions, group_name="leaderboard", code_version="1",
          deps=[dg.AssetDep("eval_results", partition_mapping=by_scale)])
def leaderboard(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Strategies ranked by average zero-shot score, with dataset size, samples seen and each task."""
    entries = collect_entries(storage, context.partition_key)
    if not entries:
        raise ValueError(f"no evaluated strategy at scale {context.partition_key!r}: materialize eval_results first")
    table = to_markdown(entries)
    out = storage.path(context.partition_key, "leaderboard")
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.md").write_text(table + "\n")
    best = rank(entries)[0]
    return dg.MaterializeResult(metadata={
        "leaderboard": dg.MetadataValue.md(table),
        "path": dg.MetadataValue.path(str(out / "leaderboard.md")),
        "strategies": len(entries), "best_strategy": best.strategy, "best_average": best.average,
    })
