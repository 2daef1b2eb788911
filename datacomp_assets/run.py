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


def run_scale(scale: str, strategies: list[str], resources=None, instance=None) -> str:
    """Materialize the scale's pool assets, then each strategy, then the leaderboard.

    Strategies run one after another: in-process Dagster runs are not safe in parallel threads (two runs
    configuring logging at once deadlock), and on a CPU two trainings only split the same cores."""
    # Late imports: loading the code location reads the strategy files, whose errors main() reports.
    from datacomp_assets.core.strategies import STRATEGIES
    from datacomp_assets.definitions import POOL_ASSETS, RESOURCES, STRATEGY_ASSETS
    from datacomp_assets.filtering.assets import strategy_definitions
    from datacomp_assets.instance import free_orphaned_slots
    from datacomp_assets.leaderboard.assets import leaderboard, scaling_analysis
    from partitions import get_scale

    get_scale(scale)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
    instance = instance or dg.DagsterInstance.get()
    resources = {**RESOURCES, **(resources or {})}  # overrides on top of the defaults
    t0 = time.perf_counter()
    # A run killed earlier (SIGKILL, out of memory) may still hold the `gpu` slot; this run would wait forever.
    for run_id in free_orphaned_slots(instance):
        print(f"freed the pool slots of run {run_id}, which had ended or been killed")
    # Record each strategy's definition version first, so the UI can tell later which rules changed.
    dg.materialize([strategy_definitions], selection=[strategy_definitions], instance=instance)  # observes it
    materialize(POOL_ASSETS, scale, instance, resources)
    keys = [dg.MultiPartitionKey({"scale": scale, "strategy": strategy}) for strategy in strategies]
    for key in keys:
        materialize(STRATEGY_ASSETS, key, instance, resources)
    materialize([leaderboard], scale, instance, resources)
    materialize([scaling_analysis], None, instance, resources)
    layout = resources["storage"].layout
    table = layout.leaderboard_markdown(scale).read_text().strip()
    print(f"\nDataComp leaderboard, scale {scale} ({time.perf_counter() - t0:.0f} s)\n\n{table}\n")
    print(f"Scaling analysis (the paper's Figures 2 and 3): {layout.scaling_analysis()}/")
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="tiny")
    parser.add_argument("--strategies", nargs="*", help="default: every registered strategy")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    settings.dagster_home()  # record runs where `bin/ui` (dagster dev) will find them
    try:
        from datacomp_assets.core.strategies import STRATEGIES

        run_scale(args.scale, args.strategies or list(STRATEGIES))
    except USER_ERRORS as err:
        if args.traceback:
            raise
        sys.exit(f"error: {err}\n(run again with --traceback for the full traceback)")


if __name__ == "__main__":
    main()
