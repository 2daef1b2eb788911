"""Automation: a schedule per scale that requests every strategy partition of it, and a sensor that scores
each new checkpoint. Schedules start stopped: a scale's backfill is hours of GPU time, so a user turns it on."""

import dagster as dg

from datacomp_assets.core.layout import Asset
from datacomp_assets.core.strategies import STRATEGIES
from partitions import SCALES

# subset -> checkpoint -> eval_results of one (scale, strategy); the pool assets must exist already.
strategy_job = dg.define_asset_job(
    "strategy_job", selection=[Asset.SUBSET, Asset.CHECKPOINT, Asset.EVAL_RESULTS],
    description="Filter, train and score one strategy at one scale")
evaluation_job = dg.define_asset_job(
    "evaluation_job", selection=[Asset.EVAL_RESULTS],
    description="Score one checkpoint on its scale's evaluation suite")


def strategy_run_requests(scale: str, tick: str) -> list[dg.RunRequest]:
    """One run per registered strategy; the run key makes a tick's requests idempotent."""
    return [dg.RunRequest(run_key=f"{scale}|{strategy}|{tick}",
                          partition_key=dg.MultiPartitionKey({"scale": scale, "strategy": strategy}),
                          tags={"datacomp/scale": scale, "datacomp/strategy": strategy})
            for strategy in STRATEGIES]


def scale_schedule(scale: str) -> dg.ScheduleDefinition:
    """Each scale's cadence is its `cron_schedule` (scales.toml): small scales often, large ones rarely, since a
    week of xlarge training costs more than a weekly cadence."""
    def requests(context: dg.ScheduleEvaluationContext):
        yield from strategy_run_requests(scale, context.scheduled_execution_time.strftime("%Y-%m-%dT%H:%M"))

    return dg.ScheduleDefinition(
        name=f"{scale}_every_strategy", cron_schedule=SCALES[scale].cron_schedule, job=strategy_job, execution_fn=requests,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Requests subset, checkpoint and scores of every strategy at scale {scale}")


SCHEDULES = [scale_schedule(scale) for scale in SCALES]


@dg.asset_sensor(asset_key=dg.AssetKey(Asset.CHECKPOINT), job=evaluation_job, minimum_interval_seconds=60,
                 default_status=dg.DefaultSensorStatus.RUNNING)
def evaluate_new_checkpoints(context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry):
    """Each new checkpoint gets scored, unless the run that trained it also scores it."""
    partition = asset_event.dagster_event.partition
    planned = context.instance.get_records_for_run(
        asset_event.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED).records
    if any(r.event_log_entry.dagster_event.asset_key == dg.AssetKey(Asset.EVAL_RESULTS) for r in planned):
        return dg.SkipReason(f"run {asset_event.run_id} scores checkpoint {partition} itself")
    return dg.RunRequest(run_key=f"eval|{partition}|{asset_event.run_id}", partition_key=partition)


def strategy_partition_keys(scale: str) -> list[str]:
    return [str(dg.MultiPartitionKey({"scale": scale, "strategy": strategy})) for strategy in STRATEGIES]


if __name__ == "__main__":  # `python -m datacomp_assets.automation small`: the partitions a backfill of it needs
    import sys

    from partitions import get_scale

    print(",".join(strategy_partition_keys(get_scale(sys.argv[1]).name)))
