"""`python -m datacomp_assets.run --scale tiny`: materialize a scale's benchmark, then print its leaderboard.

Runs go through Dagster (recorded in $DAGSTER_HOME, so `bin/ui` shows them, events included): the pool assets
the chosen strategies need first, then subset -> checkpoint -> eval_results for each strategy, then the
leaderboard. The terminal shows one line per step and a bar for the step running (console.py); Dagster's event
stream goes to the run's log file (and the UI), or, with `--dagster-logs`, to the terminal as well.
"""

from __future__ import annotations

import argparse
import errno
import shlex
import sys
import time
import warnings
from pathlib import Path

import dagster as dg

from datacomp_assets.core import settings

# The errors a user can fix (a scale or strategy name, a strategy file, a missing input, a home directory that is
# a file or read-only): one line, no traceback. main() also gives one line to a full disk and an unwritable instance.
USER_ERRORS = (ValueError, FileNotFoundError)

# With no --strategies: the paper's story in one short run. No filtering, a random tenth, the paper's basic
# filter, its best CLIP-score filter, and the strongest leaderboard method the miniature has (Data Filtering
# Networks, medium leaderboard rank 3 and half of rank 1). `--strategies all` runs every registered strategy.
HEADLINE_STRATEGIES = ("no_filter", "random_10pct", "basic", "clip_score_l14_30pct", "dfn_30pct")
JOB_NAME = "datacomp_run"


class RunFailed(Exception):
    """A step failed; the console has shown which, and the log holds the rest."""


def materialize(selection, partition_key, instance, resources, console=None, dagster_logs: bool = False,
                ops: dict | None = None) -> None:
    """Materialize `selection` (and its checks) for one partition, in this process, through Dagster; `ops`: the
    run config of assets in it (`{<asset name>: {"config": {...}}}`)."""
    from datacomp_assets.console import dagster_logger
    from datacomp_assets.definitions import ALL_ASSETS, CHECKS

    loggers = {"run_console": dagster_logger(console)} if console else {}
    if dagster_logs or not console:
        loggers["console"] = dg.colored_console_logger
    defs = dg.Definitions(assets=[*ALL_ASSETS, *CHECKS], resources=resources, loggers=loggers,
                          jobs=[dg.define_asset_job(JOB_NAME, selection=selection)])
    if console:
        console.partition = partition_label(partition_key)
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(
        run_config={"loggers": {name: {} for name in loggers}, **({"ops": ops} if ops else {})}, instance=instance,
        partition_key=partition_key,
        raise_on_error=False)
    if not result.success:
        raise RunFailed(f"materializing {partition_key} failed (run {result.run_id})")


def partition_label(partition_key) -> str:
    """How the console names a partition: the strategy (or scorer) of a (scale, x) key, else the key itself."""
    if isinstance(partition_key, dg.MultiPartitionKey):
        return "|".join(v for k, v in partition_key.keys_by_dimension.items() if k != "scale")
    return partition_key or ""


def run_scale(scale: str, strategies: list[str], resources=None, instance=None, subsets_only: bool = False,
              console=None, dagster_logs: bool = False) -> str:
    """Materialize the scale's pool assets, then each strategy, then the leaderboard; return its markdown.

    Only the pool assets the strategies need run: at a published pool, filtering reads the metadata alone, so
    with `subsets_only` nothing is downloaded unless a strategy scores images. The inputs the strategies need
    are checked before anything runs. Strategies run one after another: in-process Dagster runs are not safe in
    parallel threads (two runs configuring logging at once deadlock); on a CPU a strategy's seeds train side by
    side instead (the accelerator resource's `cpu_trainings_at_once`)."""
    # Late imports: loading the code location reads the strategy and scale files, whose errors main() reports.
    from datacomp_assets.definitions import RESOURCES, STRATEGY_ASSETS
    from datacomp_assets.core.layout import Asset
    from datacomp_assets.filtering.assets import image_scores, pool_features, strategy_definitions, subset
    from datacomp_assets.instance import free_orphaned_slots
    from datacomp_assets.leaderboard.assets import leaderboard, scaling_analysis
    from partitions import get_scale

    config = get_scale(scale)
    strategies = chosen_strategies(strategies)  # an unknown name fails here, before anything runs
    instance = instance or dg.DagsterInstance.get()
    resources = {**RESOURCES, **(resources or {})}  # overrides on top of the defaults
    pool_assets, scorers = assets_needed(config, strategies, train=not subsets_only)
    check_inputs(config, strategies, resources, train=not subsets_only)

    def run(selection, partition_key, ops=None):
        materialize(selection, partition_key, instance, resources, console, dagster_logs, ops)

    # A run killed earlier (SIGKILL, out of memory) may still hold the `gpu` slot; this run would wait forever.
    for run_id in free_orphaned_slots(instance):
        print(f"freed the pool slots of run {run_id}, which had ended or been killed")
    # Record each strategy's definition version first, so the UI can tell later which rules changed.
    run([strategy_definitions], None)  # observes it
    # pool_features computes only the columns these strategies read
    run(pool_assets, scale, {Asset.POOL_FEATURES: {"config": {"strategies": strategies}}}
        if pool_features in pool_assets else None)
    for scorer in scorers:
        run([image_scores], dg.MultiPartitionKey({"scale": scale, "scorer": scorer}))
    keys = [dg.MultiPartitionKey({"scale": scale, "strategy": strategy}) for strategy in strategies]
    for key in keys:
        run([subset] if subsets_only else STRATEGY_ASSETS, key)
    if subsets_only:
        return ""
    run([leaderboard], scale)
    run([scaling_analysis], None)
    return resources["storage"].layout.leaderboard_markdown(scale).read_text().strip()


def columns_read(strategies: list[str]) -> set[str]:
    from datacomp_assets.core.strategies import strategy_identifiers

    return set().union(*(strategy_identifiers(s) for s in strategies))


def recaptions(strategies: list[str]) -> bool:
    """Whether a strategy keeps samples of the recaptioned source (the captioner's captions of the pool's images)."""
    from datacomp_assets.core.scorers import RECAPTIONED_SOURCE
    from datacomp_assets.core.strategies import sources_read

    return any(RECAPTIONED_SOURCE in sources_read(s) for s in strategies)


def assets_needed(scale, strategies: list[str], train: bool) -> tuple[list, list[str]]:
    """(the scale-partitioned pool assets to materialize, the image scorers to run) for these strategies."""
    from datacomp_assets.core.scorers import IMAGE_SCORERS, image_score_column
    from datacomp_assets.core.strategies import track
    from datacomp_assets.definitions import POOL_ASSETS
    from datacomp_assets.evaluation.assets import eval_suite
    from datacomp_assets.filtering.assets import pool_features, recaptioned_source
    from datacomp_assets.filtering.features import feature_columns
    from datacomp_assets.metadata.assets import captioner_model, dfn_model, pool_metadata
    from datacomp_assets.pool.assets import external_sources, pool_index, pool_shards

    columns = columns_read(strategies)
    scorers = [s for s in IMAGE_SCORERS if image_score_column(s) in columns]
    byod = any(track(s) == "byod" for s in strategies)
    recaptioned = [recaptioned_source] if recaptions(strategies) else []
    # A model asset and the scorer that runs it (the captioner also writes the recaptioned source).
    trained_for = {dfn_model: "dfn", captioner_model: "sieve"}
    models = [asset for asset, scorer in trained_for.items()
              if scorer in scorers or (asset is captioner_model and recaptioned)]
    # pool_features only where a strategy reads one of its columns (with none, a published pool needs no npz)
    features = [pool_features] if feature_columns(columns) else []
    if scale.pool_source == "synthetic_web":
        # The miniature computes its metadata from images and trained scorers. It trains a DFN or a captioner only
        # when a chosen strategy reads its scores or captions, and downloads the bring-your-own-data sources only
        # when a chosen strategy mixes them in.
        skipped = [a for a in trained_for if a not in models] + ([] if byod else [external_sources])
        skipped += [] if features else [pool_features]
        return [a for a in POOL_ASSETS if a not in skipped] + recaptioned, scorers
    assets = [pool_index, pool_metadata, *features]
    if train or scorers or recaptioned:
        assets.append(pool_shards)
    assets += models
    if train:
        assets.append(eval_suite)
    if byod:
        assets.append(external_sources)
    return assets + recaptioned, scorers


def check_inputs(scale, strategies: list[str], resources: dict, train: bool) -> None:
    """Fail before anything runs, with every problem at once: a file the strategies need that the scale does not
    name, the published metadata out of reach, a GPU recipe with no GPU."""
    from datacomp_assets.core.inputs import configured_problems, inputs_for_columns
    from datacomp_assets.core.published import PublishedSource, hub_offline, offline_message

    problems = []
    if train:
        try:
            # A paper recipe on a CPU is refused; a cluster out of reach too.
            resources["accelerator"].training_placement(scale, resources["engine"].engine())
        except (ValueError, ConnectionError) as err:
            problems.append(str(err))
    if scale.pool_source == "published":
        mirror = configured_mirror(scale, resources)
        if not mirror and hub_offline():
            problems.append(offline_message(PublishedSource(scale.name), "HF_HUB_OFFLINE is set"))
        needed = inputs_for_columns(columns_read(strategies))
        if recaptions(strategies):
            needed += [name for name in ("captioner_checkpoint", "clip_l14_checkpoint") if name not in needed]
        problems += configured_problems(scale, needed)
        problems += embedding_problems(scale, strategies, mirror, resources["pool_source"].published.include_npz)
    if problems:
        raise FileNotFoundError(f"scale {scale.name!r} cannot run {', '.join(strategies)} here; nothing was started. "
                                "Supply what is missing, or choose other --strategies:\n- " + "\n- ".join(problems))


def configured_mirror(scale, resources: dict) -> str:
    """The scale's mirror, else the published resource's (Dagster's EnvVar where $DATACOMP_MIRROR set it)."""
    mirror = scale.mirror_dir or resources["pool_source"].published.published_mirror_dir
    return (mirror.get_value() or "") if isinstance(mirror, dg.EnvVar) else mirror


def embedding_problems(scale, strategies: list[str], mirror: str, include_npz: bool) -> list[str]:
    """The strategies that read columns computed from the npz embeddings, where the metadata will have none (the
    mirror's parquet files have no npz beside them, or the Hub's are not asked for)."""
    from datacomp_assets.core.published import files_without_npz, mirror_files, npz_advice
    from datacomp_assets.filtering.features import embedding_readers, missing_embeddings

    readers = embedding_readers(strategies)
    if not readers:
        return []
    if not mirror:
        if include_npz:
            return []
        rules = "; ".join(f"{name} (reads {', '.join(columns)})" for name, columns in readers.items())
        return [f"{rules}: computed from the metadata's embeddings, which are fetched from the Hub only with the "
                f"published resource's include_npz (about 25 times the parquet's size): set it, or use a local copy: "
                f"{npz_advice(scale.name, hub=False)}"]
    parquets = mirror_files(mirror) if Path(mirror).is_dir() else []  # none: the fetch names the mirror
    lacking = files_without_npz(parquets)
    advice = npz_advice(scale.name, lacking[0].parent, hub=False) if lacking else ""
    return [missing_embeddings(readers, lacking, len(parquets), advice)] if lacking else []


def chosen_strategies(names: list[str] | None) -> list[str]:
    """--strategies: none given, the headline set; `all`, every registered strategy; else the names given, each a
    registered strategy or one of the paper's sweeps (`clip_score_b32_thr0.28`)."""
    from datacomp_assets.core.strategies import PARTITIONED, STRATEGIES

    if not names:
        return list(HEADLINE_STRATEGIES)
    if names == ["all"]:
        return list(STRATEGIES)
    unknown = [name for name in names if name not in PARTITIONED]
    if unknown:
        raise ValueError(f"unknown strategies {', '.join(unknown)}; known: all, {', '.join(PARTITIONED)}")
    return names


def run_with_console(scale: str, strategies: list[str], command: str, subsets_only: bool = False,
                     dagster_logs: bool = False) -> None:
    """run_scale, shown in the terminal by console.py: a header, a line per step, bars; then the compact
    leaderboard and where everything is, or the failed step and the command that resumes."""
    from rich.markup import escape

    from datacomp_assets.console import RunConsole, clock, leaderboard_lines, output_to_log
    from datacomp_assets.core.layout import Asset
    from datacomp_assets.definitions import CHECKS, RESOURCES
    from partitions import get_scale

    config, layout = get_scale(scale), RESOURCES["storage"].layout  # an unknown scale fails here, in one line
    check_inputs(config, strategies, RESOURCES, train=not subsets_only)  # before anything is written
    settings.usable_directory(settings.DATACOMP_HOME, layout.root)  # a file or read-only: one line, here
    log_file = layout.run_log(scale, time.strftime("%Y%m%d-%H%M%S"))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with output_to_log(log_file, enabled=not dagster_logs) as terminal:
        console = RunConsole(terminal, log_file, quiet_steps=frozenset(c.node_def.name for c in CHECKS))
        seeds = "" if subsets_only else f", {len(config.seeds)} training seeds each"
        console.say(f"[bold]DataComp, scale {scale}[/]: {len(strategies)} strategies ({' '.join(strategies)}){seeds}")
        console.say(f"  data in {layout.root}/, full log in {log_file}")
        try:
            with console.drawing_bars():
                run_scale(scale, strategies, subsets_only=subsets_only, console=console, dagster_logs=dagster_logs)
        except (RunFailed, KeyboardInterrupt) as err:
            write_timings(console, log_file)
            elapsed = clock(time.perf_counter() - t0)
            if isinstance(err, KeyboardInterrupt) or not console.failure:
                console.say(f"\n[red bold]Interrupted[/] after {elapsed}.")
            else:
                step, error = console.failure
                console.say(f"\n[red bold]Stopped[/] after {elapsed}: {escape(step)} failed with")
                console.say(escape(indented_excerpt(error)))
            console.say(f"  Full log: {log_file}\n  In the UI: bin/ui, then the failed run under Runs")
            console.say(f"  To resume (what finished is kept): {command}")
            raise SystemExit(1) from None
        except Exception:  # main() prints one line; the traceback is kept in the log
            append_traceback(log_file)
            raise
        write_timings(console, log_file)
        console.say(f"\nDone in {clock(time.perf_counter() - t0)}.\n")
        if subsets_only:
            console.say(f"{len(strategies)} subsets in {layout.asset_dir(scale, Asset.SUBSET)}/")
            return
        for line in leaderboard_lines(layout.leaderboard_json(scale)):
            console.say(line)
        console.say(f"Full table (every task, the lineage of each row): {layout.leaderboard_markdown(scale)}")
        console.say(f"Figures (the paper's Figures 2 and 3 beside this board): {layout.scaling_analysis()}/")
        console.say("Open the UI on these runs: bin/ui, then http://127.0.0.1:3000 (Runs, or the asset graph)")


def indented_excerpt(text: str, head: int = 4, tail: int = 8) -> str:
    """An error message as the terminal shows it: indented, its middle left to the log when it is long."""
    lines = text.splitlines()
    if len(lines) > head + tail + 1:
        lines = [*lines[:head], f"[... {len(lines) - head - tail} more lines in the log ...]", *lines[-tail:]]
    return "\n".join(f"    {line}" for line in lines)


def write_timings(console, log_file: Path) -> None:
    """Each step's wall time, next to the log (`<log>.steps.json`): where this run's time went. A nicety: a disk
    that cannot take it (full, say) gets a warning line, never a traceback in place of the run's outcome."""
    import json
    from dataclasses import asdict

    from rich.markup import escape

    timings = log_file.with_suffix(".steps.json")
    try:
        timings.write_text(json.dumps([asdict(t) for t in console.timings], indent=1))
    except OSError as err:
        console.say(f"  [yellow]! the step timings were not written to {escape(str(timings))}: "
                    f"{escape(err.strerror or str(err))}[/]")


def append_traceback(log_file: Path) -> None:
    """The exception being handled, with its traceback, at the end of the run's log (if the disk takes it)."""
    import traceback

    try:
        with open(log_file, "a") as f:
            traceback.print_exc(file=f)
    except OSError:
        pass


def error_line(err: Exception) -> str:
    """What main() prints for an error that stops the command: the error and what to do, on one line."""
    from sqlalchemy.exc import OperationalError

    if isinstance(err, OperationalError):  # Dagster's instance storage (sqlite under DAGSTER_HOME, or PostgreSQL)
        why = str(err.orig).splitlines()[0]
        fix = ("free space there, or set DAGSTER_HOME to a directory with room" if "disk is full" in why else
               "check the storage that DAGSTER_HOME's dagster.yaml names (docs/instance.md)")
        return f"Dagster's instance (DAGSTER_HOME={settings.DAGSTER_HOME.get()}) cannot be written: {why}; {fix}"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"{err}; free space, then run the command again"
    return str(err)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="tiny")
    parser.add_argument("--strategies", nargs="*", metavar="NAME",
                        help=f"registered strategies or the paper's sweeps (e.g. clip_score_b32_thr0.28); `all` for "
                             f"every registered strategy; default: {' '.join(HEADLINE_STRATEGIES)}")
    parser.add_argument("--subsets-only", action="store_true",
                        help="stop after the subsets (no training or evaluation; at a published pool, no download "
                             "unless a strategy scores images)")
    parser.add_argument("--dagster-logs", action="store_true",
                        help="also print Dagster's event stream (every event, DEBUG included) to the terminal")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    # Dagster's notes that some partition mappings are in beta: true, known, and not the user's concern.
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    command = shlex.join([Path(sys.executable).relative_to(Path.cwd()).as_posix()
                          if Path(sys.executable).is_relative_to(Path.cwd()) else sys.executable,
                          "-m", "datacomp_assets.run", *(argv if argv is not None else sys.argv[1:])])
    from sqlalchemy.exc import OperationalError  # already imported by Dagster

    try:
        settings.dagster_home()  # record runs where `bin/ui` (dagster dev) will find them; a bad one fails here
        run_with_console(args.scale, chosen_strategies(args.strategies), command, subsets_only=args.subsets_only,
                         dagster_logs=args.dagster_logs)
    except (*USER_ERRORS, OSError, OperationalError) as err:
        if args.traceback:
            raise
        sys.exit(f"error: {error_line(err)}\n(run again with --traceback for the full traceback)")


if __name__ == "__main__":
    main()
