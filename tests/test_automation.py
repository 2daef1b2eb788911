"""Schedules request every strategy of their scale; the sensor scores each new checkpoint once."""

import datetime as dt

import dagster as dg

from datacomp_assets.automation import evaluate_new_checkpoints
from datacomp_assets.core.strategies import STRATEGIES
from datacomp_assets.definitions import defs
from partitions import SCALES


def schedule_requests(name: str, when: dt.datetime) -> list[dg.RunRequest]:
    schedule = defs.get_repository_def().get_schedule_def(name)
    context = dg.build_schedule_context(scheduled_execution_time=when, repository_def=defs.get_repository_def())
    return list(schedule.evaluate_tick(context).run_requests)


def test_each_scale_has_a_schedule_requesting_every_strategy_partition():
    repo = defs.get_repository_def()
    assert {s.name for s in repo.schedule_defs} == {f"{scale}_every_strategy" for scale in SCALES}
    when = dt.datetime(2026, 11, 23, 2, tzinfo=dt.timezone.utc)
    requests = schedule_requests("small_every_strategy", when)
    assert {r.partition_key for r in requests} == {f"small|{s}" for s in STRATEGIES}
    assert all(r.job_name in (None, "strategy_job") for r in requests)
    # Requests of one tick are idempotent; the next tick asks again.
    again = schedule_requests("small_every_strategy", when)
    later = schedule_requests("small_every_strategy", when + dt.timedelta(days=7))
    assert [r.run_key for r in requests] == [r.run_key for r in again]
    assert not {r.run_key for r in requests} & {r.run_key for r in later}
    # The job behind it builds a strategy end to end: filter, train, score.
    job = repo.get_job("strategy_job")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {"subset", "checkpoint", "eval_results"}


def test_a_new_checkpoint_is_scored_once_and_a_run_that_scores_it_itself_is_left_alone():
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization("checkpoint", partition="tiny|basic"))
        context = dg.build_sensor_context(instance=instance, definitions=defs)
        first = evaluate_new_checkpoints.evaluate_tick(context)
        assert [r.partition_key for r in first.run_requests] == ["tiny|basic"]
        assert first.run_requests[0].job_name in (None, "evaluation_job")

        context = dg.build_sensor_context(instance=instance, definitions=defs, cursor=first.cursor)
        assert not evaluate_new_checkpoints.evaluate_tick(context).run_requests  # nothing new

        # A checkpoint materialized by a run whose selection includes eval_results is scored by that run.
        @dg.asset(name="checkpoint", partitions_def=dg.StaticPartitionsDefinition(["tiny|laion2b"]))
        def stand_in_checkpoint():
            return None

        @dg.asset(name="eval_results", deps=["checkpoint"],
                  partitions_def=dg.StaticPartitionsDefinition(["tiny|laion2b"]))
        def stand_in_scores():
            return None

        dg.materialize([stand_in_checkpoint, stand_in_scores], instance=instance, partition_key="tiny|laion2b")
        context = dg.build_sensor_context(instance=instance, definitions=defs, cursor=first.cursor)
        tick = evaluate_new_checkpoints.evaluate_tick(context)
        assert not tick.run_requests and "scores checkpoint" in tick.skip_message
