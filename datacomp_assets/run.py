"""`python -m datacomp_assets.run --scale tiny`: materialize a whole scale, then print its leaderboard.

Runs go through Dagster (recorded in $DAGSTER_HOME, so `dagster dev` shows them): the scale's pool
assets first, then subset -> checkpoint -> eval_results for each strategy, then the leaderboard.
"""

from __future__ import annotations

import argparse
import sys
import time

import dagster as dg

from datacomp_assets.core import settings

# The errors a user can fix (a scale or strategy name, a strategy file, a missing input): one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError)


def materialize(selection, partition_key, instance, resources) -> None:
    from datacomp_assets.definitions import ALL_ASSETS, CHECKS

    result = dg.materialize([*ALL_ASSETS, *CHECKS], selection=selection, partition_key=partition_key,
                            instance=instance, resources=resources, raise_on_error=False)
    if not result.success:
        sys.exit(f"materializing {partition_key} failed; see the errors above. Re-run the same command to resume.")


def run_scale(scale: str, strategies: list[str], resources=None, instance=None, subsets_only: bool = False) -> str:
    """Materialize the scale's pool assets, then each strategy, then the leaderboard.

    Only the pool assets the strategies need run: at a published pool, filtering reads the metadata alone, so
    with `subsets_only` nothing is downloaded unless a strategy scores images. The inputs the strategies need
    are checked before anything runs. Strategies run one after another: in-process Dagster runs are not safe in
    parallel threads (two runs configuring logging at once deadlock), and on a CPU two trainings only split the
    same cores."""
    # Late imports: loading the code location reads the strategy and scale files, whose errors main() reports.
    from datacomp_assets.core.strategies import STRATEGIES
    from datacomp_assets.definitions import RESOURCES, STRATEGY_ASSETS
    from datacomp_assets.core.layout import Asset
    from datacomp_assets.filtering.assets import image_scores, strategy_definitions, subset
    from datacomp_assets.instance import free_orphaned_slots
    from datacomp_assets.leaderboard.assets import leaderboard, scaling_analysis
    from partitions import get_scale

    config = get_scale(scale)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
    instance = instance or dg.DagsterInstance.get()
    resources = {**RESOURCES, **(resources or {})}  # overrides on top of the defaults
    pool_assets, scorers = assets_needed(config, strategies, train=not subsets_only)
    check_inputs(config, strategies, resources, train=not subsets_only)
    t0 = time.perf_counter()
    # A run killed earlier (SIGKILL, out of memory) may still hold the `gpu` slot; this run would wait forever.
    for run_id in free_orphaned_slots(instance):
        print(f"freed the pool slots of run {run_id}, which had ended or been killed")
    # Record each strategy's definition version first, so the UI can tell later which rules changed.
    dg.materialize([strategy_definitions], selection=[strategy_definitions], instance=instance)  # observes it
    materialize(pool_assets, scale, instance, resources)
    for scorer in scorers:
        materialize([image_scores], dg.MultiPartitionKey({"scale": scale, "scorer": scorer}), instance,
                    resources)
    keys = [dg.MultiPartitionKey({"scale": scale, "strategy": strategy}) for strategy in strategies]
    for key in keys:
        materialize([subset] if subsets_only else STRATEGY_ASSETS, key, instance, resources)
    layout = resources["storage"].layout
    if subsets_only:
        print(f"\n{len(keys)} subsets of scale {scale} in {layout.asset_dir(scale, Asset.SUBSET)}/ "
              f"({time.perf_counter() - t0:.0f} s)")
        return ""
    materialize([leaderboard], scale, instance, resources)
    materialize([scaling_analysis], None, instance, resources)
    table = layout.leaderboard_markdown(scale).read_text().strip()
    print(f"\nDataComp leaderboard, scale {scale} ({time.perf_counter() - t0:.0f} s)\n\n{table}\n")
    print(f"Scaling analysis (the paper's Figures 2 and 3): {layout.scaling_analysis()}/")
    return table


def columns_read(strategies: list[str]) -> set[str]:
    from datacomp_assets.core.strategies import strategy_identifiers

    return set().union(*(strategy_identifiers(s) for s in strategies))


def assets_needed(scale, strategies: list[str], train: bool) -> tuple[list, list[str]]:
    """(the scale-partitioned pool assets to materialize, the image scorers to run) for these strategies."""
    from datacomp_assets.core.scorers import IMAGE_SCORERS, image_score_column
    from datacomp_assets.core.strategies import track
    from datacomp_assets.definitions import POOL_ASSETS
    from datacomp_assets.evaluation.assets import eval_suite
    from datacomp_assets.filtering.assets import pool_features
    from datacomp_assets.metadata.assets import dfn_model, pool_metadata
    from datacomp_assets.pool.assets import external_sources, pool_index, pool_shards

    columns = columns_read(strategies)
    scorers = [s for s in IMAGE_SCORERS if image_score_column(s) in columns]
    byod = any(track(s) == "byod" for s in strategies)
    if scale.pool_source == "synthetic_web":
        # The miniature computes its metadata from images and trained scorers; it trains a DFN only when a chosen
        # strategy reads its scores (dfn_model feeds image_scores alone).
        return [a for a in POOL_ASSETS if a is not dfn_model or scorers], scorers
    assets = [pool_index, pool_metadata, pool_features]
    if train or scorers:
        assets.append(pool_shards)
    if scorers:
        assets.append(dfn_model)
    if train:
        assets.append(eval_suite)
    if byod:
        assets.append(external_sources)
    return assets, scorers


def check_inputs(scale, strategies: list[str], resources: dict, train: bool) -> None:
    """Fail before anything runs, with every problem at once: a file the strategies need that the scale does not
    name, the published metadata out of reach, a GPU recipe with no GPU."""
    from datacomp_assets.core.inputs import configured_problems, inputs_for_columns
    from datacomp_assets.core.published import PublishedSource, hub_offline, offline_message

    problems = []
    if train:
        try:
            resources["accelerator"].training_placement(scale)  # a paper recipe on a CPU is refused
        except ValueError as err:
            problems.append(str(err))
    if scale.pool_source == "published":
        mirror = scale.mirror_dir or resources["pool_source"].published.published_mirror_dir
        if not mirror and hub_offline():
            problems.append(offline_message(PublishedSource(scale.name), "HF_HUB_OFFLINE is set"))
        problems += configured_problems(scale, inputs_for_columns(columns_read(strategies)))
    if problems:
        raise FileNotFoundError(f"scale {scale.name!r} cannot run {', '.join(strategies)} here; nothing was started. "
                                "Supply what is missing, or choose other --strategies:\n- " + "\n- ".join(problems))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="tiny")
    parser.add_argument("--strategies", nargs="*", help="default: every registered strategy")
    parser.add_argument("--subsets-only", action="store_true",
                        help="stop after the subsets (no training or evaluation; at a published pool, no download "
                             "unless a strategy scores images)")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    settings.dagster_home()  # record runs where `bin/ui` (dagster dev) will find them
    try:
        from datacomp_assets.core.strategies import STRATEGIES

        run_scale(args.scale, args.strategies or list(STRATEGIES), subsets_only=args.subsets_only)
    except USER_ERRORS as err:
        if args.traceback:
            raise
        sys.exit(f"error: {err}\n(run again with --traceback for the full traceback)")


if __name__ == "__main__":
    main()
