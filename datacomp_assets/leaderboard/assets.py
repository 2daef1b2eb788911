"""Leaderboard stage: every evaluated strategy of a scale, ranked by its mean over training seeds."""

import json
import statistics
from pathlib import Path

import dagster as dg
import numpy as np

from datacomp_assets.core.figures import png_markdown
from datacomp_assets.core.layout import Asset, Group, Layout, seed_name
from datacomp_assets.core.lineage import file_sha256, files_sha256, path_from_record, path_in_record, read_lineage
from datacomp_assets.core.results import aggregate, read_results
from datacomp_assets.core.scales import scale_version
from datacomp_assets.core.strategies import PARTITIONED, get_strategy, overrides, strategy_version, track
from datacomp_assets.leaderboard.scaling import (
    PAPER_IMAGENET, correlation_png, correlations_markdown, imagenet_scores, rank_correlations, size_vs_average_png)
from datacomp_assets.leaderboard.submission import PUBLIC_SCALES, export_submission
from datacomp_assets.leaderboard.table import (
    Entry, board_markdown, board_rows, ordering_markdown, ordering_report, rank)
from partitions import SCALES, by_scale, get_scale, scale_and_strategy, scale_partitions, scale_strategy_partitions
from resources import StorageResource


def _holds(path: Path, sha256: str | None) -> bool:
    return sha256 is not None and path.is_file() and file_sha256(path) == sha256


def lineage_of(layout: Layout, scale_name: str, strategy: str) -> dict:
    """A row's lineage from the records each stage wrote, and whether the chain holds: the checkpoints were
    trained on the current subset and the scores are of the current checkpoints, by the records, and the files
    on disk are the ones the records hashed (a truncated or replaced checkpoint breaks the chain)."""
    subset = read_lineage(layout.subset_dir(scale_name, strategy))
    ckpt_dir = layout.checkpoint_dir(scale_name, strategy)
    ckpt = read_lineage(ckpt_dir)
    scores = read_lineage(layout.eval_results_dir(scale_name, strategy))
    checkpoints = ckpt.get("checkpoints", {})
    consistent = None
    if subset and ckpt and scores:
        seeds = get_scale(scale_name).seeds
        results = [layout.results_file(scale_name, strategy, seed) for seed in seeds]
        consistent = (ckpt.get("subset_sha256") == subset.get("subset_sha256")
                      and scores.get("checkpoints") == {seed: c["sha256"] for seed, c in checkpoints.items()}
                      and _holds(layout.subset_file(scale_name, strategy), subset.get("subset_sha256"))
                      # (read in this tree: a copied or moved tree is checked against its own files)
                      and all(_holds(path_from_record(c["path"], layout.root, ckpt_dir), c["sha256"])
                              for c in checkpoints.values())
                      and all(r.is_file() for r in results)
                      and files_sha256(results) == scores.get("results_sha256")
                      # ... and they were made under today's rule and recipe (an override since breaks it)
                      and subset.get("strategy_version") == strategy_version(strategy)
                      and ckpt.get("scale_version") == scale_version(get_scale(scale_name)))
    return {"subset_path": path_in_record(layout.subset_file(scale_name, strategy), layout.root),
            # what the checkpoints were trained on, by their own record (not the scale file's budget)
            "samples_seen": ckpt.get("samples_seen"), "scale_version": ckpt.get("scale_version", ""),
            "scale_override": get_scale(scale_name).override, "overrides": overrides(strategy),
            "subset_sha256": subset.get("subset_sha256", ""), "pool_version": subset.get("pool_version", ""),
            "strategy_version": subset.get("strategy_version", ""), "checkpoints": checkpoints,
            "results_sha256": scores.get("results_sha256", ""),
            "code_revision": scores.get("code_revision", ckpt.get("code_revision", "")), "consistent": consistent}


def noise_replicates(layout: Layout, scale_name: str, strategy: str, seeds: list[int]) -> dict[int, list[float]]:
    """Each seed's bootstrap replicates of its average, from the evaluation's eval_noise.json; a seed scored
    before the file existed (or whose file lacks some task's outcomes) has none, and its row then no interval."""
    replicates = {}
    for seed in seeds:
        path = layout.eval_noise_file(scale_name, strategy, seed)
        if path.is_file():
            average = json.loads(path.read_text()).get("average_replicates")
            if average:
                replicates[seed] = average
    return replicates


def collect_entries(layout: Layout, scale_name: str) -> list[Entry]:
    """One entry per strategy whose subset and scores (of at least one seed) exist at this scale."""
    scale = get_scale(scale_name)
    entries = []
    for strategy in PARTITIONED:  # a sweep trained by name has its row too
        subset = layout.subset_file(scale_name, strategy)
        seeds = {seed: read_results(layout.results_file(scale_name, strategy, seed)) for seed in scale.seeds}
        seeds = {seed: rows for seed, rows in seeds.items() if rows}
        if not seeds or not subset.exists():
            continue
        group_scores = [aggregate(list(rows.values())) for rows in seeds.values()]
        groups = {g: statistics.mean(s[g] for s in group_scores) for g in group_scores[0] if g != "average"}
        lineage = lineage_of(layout, scale_name, strategy)
        entries.append(Entry(
            strategy, len(np.load(subset, mmap_mode="r")), lineage["samples_seen"],
            {seed: {k: r["metrics"]["main_metric"] for k, r in rows.items()
                    if r["metrics"].get("main_metric") is not None}  # FairFace, UTKFace: outside the average
             for seed, rows in seeds.items()},
            groups=groups, track=track(strategy), lineage=lineage,
            noise_replicates=noise_replicates(layout, scale_name, strategy, list(seeds))))
    return entries


@dg.asset(partitions_def=scale_partitions, group_name=Group.LEADERBOARD, code_version="4",
          deps=[dg.AssetDep(Asset.EVAL_RESULTS, partition_mapping=by_scale)])
def leaderboard(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Strategies ranked by average zero-shot score (mean over seeds, with its spread), with dataset size,
    samples seen, each task group and each task; and whether the paper's ordering holds beyond the noise."""
    with storage.writing(context):
        layout = storage.layout
        entries = collect_entries(layout, context.partition_key)
        if not entries:
            raise ValueError(f"no evaluated strategy at scale {context.partition_key!r}: "
                             "materialize eval_results first")
        report = ordering_report([e for e in entries if e.track == "filtering"])
        table = board_markdown(entries)
        if report:
            table += "\n\n### The paper's ordering\n\n" + ordering_markdown(report)
        scale_name = context.partition_key
        markdown, rows_json = layout.leaderboard_markdown(scale_name), layout.leaderboard_json(scale_name)
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(table + "\n")
        rows = board_rows(entries)
        rows_json.write_text(json.dumps({"scale": context.partition_key, "rows": rows, "paper_ordering": report},
                                        indent=2) + "\n")
        best = rank(entries)[0]
        stale = [e.strategy for e in entries if e.lineage["consistent"] is False]
        if stale:
            context.log.warning(f"rows whose lineage does not hold (re-materialize them): {', '.join(stale)}")
        return dg.MaterializeResult(metadata={
            Asset.LEADERBOARD: dg.MetadataValue.md(table),
            "path": dg.MetadataValue.path(str(markdown)),
            "rows_json": dg.MetadataValue.path(str(rows_json)),
            "strategies": len(entries), "best_strategy": best.strategy, "best_average": best.average,
            "best_average_std": best.std, "inconsistent_rows": dg.MetadataValue.json(stale),
            "lineage": dg.MetadataValue.json({e.strategy: e.lineage for e in entries}),
            "paper_ordering": dg.MetadataValue.json(report),
        })


def read_board(layout: Layout, scale_name: str) -> list[dict]:
    path = layout.leaderboard_json(scale_name)
    return json.loads(path.read_text())["rows"] if path.exists() else []


@dg.asset(group_name=Group.LEADERBOARD, code_version="1", deps=[Asset.LEADERBOARD])
def scaling_analysis(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """The paper's scaling analysis over every scale with a leaderboard: subset size against average score per
    strategy family (Figure 2), and Spearman's rank correlation of the strategies' ImageNet scores between
    scales (Figure 3), this project's measured scales beside the paper's published numbers."""
    with storage.writing(context):
        boards = {scale: rows for scale in SCALES if (rows := read_board(storage.layout, scale))}
        if not boards:
            raise ValueError("no scale has a leaderboard yet: materialize leaderboard for a scale first")
        rankings = {f"{scale} (measured)": imagenet_scores(rows) for scale, rows in boards.items()}
        rankings |= {f"{scale} (paper)": scores for scale, scores in PAPER_IMAGENET.items()}
        correlations = rank_correlations(rankings)
        out = storage.layout.scaling_analysis()
        out.mkdir(parents=True, exist_ok=True)
        fig2, fig3 = size_vs_average_png(boards), correlation_png(rankings, correlations)
        (out / "size_vs_average.png").write_bytes(fig2)
        (out / "rank_correlation.png").write_bytes(fig3)
        (out / "scaling.json").write_text(json.dumps({"rankings": rankings, "correlations": correlations}, indent=2))
        measured = [c for c in correlations if "measured" in c["a"] or "measured" in c["b"]]
        context.log.info(f"{len(boards)} measured scale(s), {len(correlations)} rank correlations")
        return dg.MaterializeResult(metadata={
            "size_vs_average": dg.MetadataValue.md(png_markdown(fig2, "subset size vs average score")),
            "rank_correlation": dg.MetadataValue.md(png_markdown(fig3, "rank correlation between scales")
                                                    + "\n\n" + correlations_markdown(correlations)),
            "measured_scales": list(boards), "path": dg.MetadataValue.path(str(out)),
            "correlations": dg.MetadataValue.json(correlations),
            "mean_rho_measured_vs_paper": (statistics.mean(c["spearman"] for c in measured) if measured else None),
        })


@dg.asset(partitions_def=scale_strategy_partitions, group_name=Group.LEADERBOARD, code_version="1",
          deps=[Asset.EVAL_RESULTS, Asset.SUBSET, dg.AssetDep(Asset.LEADERBOARD, partition_mapping=by_scale)])
def submission(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """The strategy's entry in the public leaderboard's layout: `<scale>_scale/results.jsonl`, the subset's uids
    under `<scale>_scale/samples/`, `submission.json` (the record the leaderboard stores, submitter fields
    blank) and a README with the upload steps. No credentials are read or written."""
    with storage.writing(context):
        scale, strategy = scale_and_strategy(context)
        seed = scale.seeds[0]  # the leaderboard takes one model: the scale's first training seed
        layout = storage.layout
        row = next((r for r in read_board(layout, scale.name) if r["strategy"] == strategy), None)
        if row is None:
            raise ValueError(f"{strategy} is not on the {scale.name} leaderboard: "
                             f"materialize leaderboard[{scale.name}]")
        if row["lineage"].get("consistent") is False:
            raise ValueError(f"the {scale.name} leaderboard row of {strategy} does not match its current subset or "
                             f"checkpoints: materialize its subset, checkpoint, eval_results and leaderboard again")
        out = layout.submission_dir(scale.name, strategy)
        exported = export_submission(
            out, scale, strategy, get_strategy(strategy).description, row["track"],
            layout.subset_file(scale.name, strategy), layout.results_file(scale.name, strategy, seed),
            row["seed_averages"], row["lineage"])
        if scale.name not in PUBLIC_SCALES:
            context.log.warning(f"{scale.name} is not a public leaderboard scale; the export shows the layout only")
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(out)), "seed": seed_name(seed),
            "average": exported["summary"]["average"], "dataset_size": exported["record"]["dataset_size"],
            "record": dg.MetadataValue.json(exported["record"]),
            "readme": dg.MetadataValue.md((out / "README.md").read_text()),
        })
