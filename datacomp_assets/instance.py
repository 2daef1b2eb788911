"""The Dagster instance settings that dagster.yaml cannot hold: the `gpu` pool's limit.

`instance/dagster.yaml` (copied to $DAGSTER_HOME by bin/setup) sets the run queue, run monitoring and the pools'
default limit; a limit for one named pool lives in the instance's storage, set here (the equivalent of
`dagster instance concurrency set gpu 1`). Idempotent:

    python -m datacomp_assets.instance [--gpu-slots N]    # the instance of $DAGSTER_HOME

It also marks failed the runs whose processes are gone (`fail_runs_whose_processes_are_gone`) and frees the slots
of runs that can no longer release them (`free_orphaned_slots`): a run whose process was killed (SIGKILL, out of
memory) stays STARTED, and keeps its slot, so the next run would wait for it forever; the daemon's run monitoring
frees the slots of failed and cancelled runs, but only while a daemon runs. Every run of the code location, and the
main command, call `free_orphaned_slots` first, so a killed run is marked failed by the next one.
"""

from __future__ import annotations

import argparse
import errno
import os

import dagster as dg

from datacomp_assets.core import settings
from datacomp_assets.dagster_private import is_sqlite_event_log_storage

GPU_POOL = "gpu"  # the pool of every asset that uses the accelerator (`pool="gpu"`)


def configure_instance(instance: dg.DagsterInstance, gpu_slots: int = 1) -> bool:
    """Give the `gpu` pool `gpu_slots` slots, explicitly (not the pools' default). True if it changed."""
    if gpu_slots < 0:
        raise ValueError(f"gpu_slots must be >= 0, got {gpu_slots}")
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        raise RuntimeError("this instance's storage has no concurrency tables; run `dagster instance migrate` first")
    info = storage.get_concurrency_info(GPU_POOL)
    if info.slot_count == gpu_slots and not info.using_default_limit:
        return False
    storage.set_concurrency_slots(GPU_POOL, gpu_slots)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


def _run_pids(instance: dg.DagsterInstance, run_id: str) -> set[int]:
    """The processes that ran the run: those that emitted its start and its steps' starts, and those its engine
    events name in their `pid` metadata (`Started process for run`, `Executing steps in process`, the
    multiprocess executor's parent); not the emitters of engine events, which include the code server."""
    emitted = {dg.DagsterEventType.RUN_START, dg.DagsterEventType.STEP_WORKER_STARTED, dg.DagsterEventType.STEP_START}
    pids = set()
    for entry in instance.all_logs(run_id, of_type={*emitted, dg.DagsterEventType.ENGINE_EVENT}):
        event = entry.dagster_event
        if event.event_type in emitted:
            if event.pid is not None:
                pids.add(event.pid)
            continue
        metadata = getattr(event.event_specific_data, "metadata", None) or {}
        value = metadata.get("pid")
        text = str(getattr(value, "value", value))
        if text.isdigit():
            pids.add(int(text))
    return pids


def _checks_pids(instance: dg.DagsterInstance, check_pids: bool | None) -> bool:
    """Process ids mean something only on the machine that ran the run: by default they are checked only for a
    SQLite instance (local by construction), not for a PostgreSQL one that several machines may share."""
    return is_sqlite_event_log_storage(instance.event_log_storage) if check_pids is None else check_pids


def fail_runs_whose_processes_are_gone(instance: dg.DagsterInstance, check_pids: bool | None = None) -> list[str]:
    """Mark failed the STARTED runs whose recorded processes are all gone (killed with their steps, which die with
    them: core.processes), so that the UI and the next run do not take them for running. Returns their ids."""
    if not _checks_pids(instance, check_pids):
        return []
    failed = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        pids = _run_pids(instance, run.run_id)
        if not pids or any(_alive(pid) for pid in pids):
            continue
        instance.report_run_failed(run, message=f"the run's processes {sorted(pids)} are gone (killed?); marked "
                                                "failed by a later run, and its pool slots freed")
        failed.append(run.run_id)
    return failed


def free_orphaned_slots(instance: dg.DagsterInstance, check_pids: bool | None = None) -> list[str]:
    """Mark failed the STARTED runs whose processes are all gone, then free the pool slots held by finished runs.
    Returns the run ids whose slots were freed."""
    fail_runs_whose_processes_are_gone(instance, check_pids)
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    freed = []
    for run_id in sorted(storage.get_concurrency_run_ids()):
        run = instance.get_run_by_id(run_id)
        if run is None or run.is_finished:  # SUCCESS, FAILURE or CANCELED
            storage.free_concurrency_slots_for_run(run_id)
            freed.append(run_id)
    return freed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-slots", type=int, default=settings.gpu_slots(),
                        help="slots of the gpu pool (default: $DATACOMP_GPU_SLOTS or 1)")
    args = parser.parse_args(argv)
    home = settings.dagster_home()
    with dg.DagsterInstance.get() as instance:
        changed = configure_instance(instance, args.gpu_slots)
        for run_id in fail_runs_whose_processes_are_gone(instance):
            print(f"marked run {run_id} failed: its processes are gone")
        for run_id in free_orphaned_slots(instance):
            print(f"freed the pool slots of run {run_id}, which had ended or whose process was gone")
        print(f"{home}: pool {GPU_POOL} has {args.gpu_slots} slot(s)"
              f"{'' if changed else ' (unchanged)'}")


if __name__ == "__main__":
    main()
