"""The instance configuration shipped in instance/: the run queue, run monitoring, the `gpu` pool, the bounded
executor, and the PostgreSQL storage, the latter against a real PostgreSQL server.

The server (tests/postgres_server.py): the one `DATACOMP_TEST_POSTGRES_URL` names
(postgresql://user:password@host:port/db; .ci/run starts one), in a fresh database when the role may create one;
otherwise a throwaway cluster (`initdb`, `pg_ctl`) on 127.0.0.1, run as the `postgres` user when the tests run as
root, removed afterwards."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from datacomp_assets.dagster_private import engine_event_data
from datacomp_assets.instance import GPU_POOL, configure_instance, free_orphaned_slots
from tests.postgres_server import connect, dagster_pg_env

ROOT = Path(__file__).resolve().parents[1]
INSTANCE_YAML = ROOT / "instance" / "dagster.yaml"
POSTGRES_YAML = ROOT / "instance" / "dagster-postgres.yaml"


# ---------------------------------------------------------------------------------------------- the server


@pytest.fixture
def postgres_instance(postgres_server, tmp_path, monkeypatch):
    """A DagsterInstance loaded from the shipped instance/dagster-postgres.yaml, its DAGSTER_PG_* pointing at
    the test server."""
    for name, value in dagster_pg_env(postgres_server).items():
        monkeypatch.setenv(name, value)
    shutil.copy(POSTGRES_YAML, tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        yield instance


# ----------------------------------------------------------------------------------------------- the tests

scales = dg.StaticPartitionsDefinition(["tiny", "small"])


@dg.asset(partitions_def=scales, pool=GPU_POOL)
def trained(context):
    return dg.MaterializeResult(metadata={"scale": context.partition_key})


def test_postgres_instance_records_runs_and_materializations(postgres_instance, postgres_server):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    instance = postgres_instance
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    configure_instance(instance)

    result = dg.materialize([trained], partition_key="tiny", instance=instance)
    assert result.success
    run_id = result.run_id

    record = instance.get_run_record_by_id(run_id)
    assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    event = instance.get_latest_materialization_event(trained.key)
    assert event.run_id == run_id
    materialization = event.asset_materialization
    assert materialization.partition == "tiny" and materialization.metadata["scale"].value == "tiny"
    assert instance.get_materialized_partitions(trained.key) == {"tiny"}

    # The rows themselves, read without Dagster.
    with contextlib.closing(connect(postgres_server)) as conn, conn.cursor() as cur:
        cur.execute("SELECT status, pipeline_name FROM runs WHERE run_id = %s", (run_id,))
        assert cur.fetchall() == [("SUCCESS", "__ephemeral_asset_job__")]
        cur.execute("SELECT partition FROM event_logs WHERE run_id = %s AND dagster_event_type = "
                    "'ASSET_MATERIALIZATION'", (run_id,))
        assert cur.fetchall() == [("tiny",)]
        cur.execute('SELECT "limit", using_default_limit FROM concurrency_limits WHERE concurrency_key = %s',
                    (GPU_POOL,))
        assert cur.fetchall() == [(1, False)]
        # The step held the gpu slot while it ran and gave it back.
        cur.execute("SELECT count(*), count(run_id) FROM concurrency_slots WHERE concurrency_key = %s "
                    "AND deleted = false", (GPU_POOL,))
        assert cur.fetchone() == (1, 0)


def test_gpu_pool_has_one_slot_and_holds_a_second_claim(postgres_instance):
    storage = postgres_instance.event_log_storage
    assert storage.supports_global_concurrency_limits
    configure_instance(postgres_instance)
    assert configure_instance(postgres_instance) is False  # idempotent
    info = storage.get_concurrency_info(GPU_POOL)
    assert (info.slot_count, info.limit, info.using_default_limit) == (1, 1, False)

    first = storage.claim_concurrency_slot(GPU_POOL, "run-a", "checkpoint")
    second = storage.claim_concurrency_slot(GPU_POOL, "run-b", "eval_results")
    try:
        assert first.is_claimed and not second.is_claimed
        storage.free_concurrency_slot_for_step("run-a", "checkpoint")
        assert storage.claim_concurrency_slot(GPU_POOL, "run-b", "eval_results").is_claimed
    finally:
        storage.free_concurrency_slots_for_run("run-a")
        storage.free_concurrency_slots_for_run("run-b")

    configure_instance(postgres_instance, gpu_slots=2)
    assert storage.get_concurrency_info(GPU_POOL).slot_count == 2
    configure_instance(postgres_instance)
    assert storage.get_concurrency_info(GPU_POOL).slot_count == 1


def test_slots_of_a_finished_run_are_freed(postgres_instance):
    """What run monitoring does after free_slots_after_run_end_seconds, at once."""
    configure_instance(postgres_instance)
    storage = postgres_instance.event_log_storage
    run_id = dg.materialize([trained], partition_key="small", instance=postgres_instance).run_id
    assert storage.claim_concurrency_slot(GPU_POOL, run_id, "trained").is_claimed  # left behind
    assert storage.get_concurrency_info(GPU_POOL).active_run_ids == {run_id}
    assert free_orphaned_slots(postgres_instance) == [run_id]
    assert storage.get_concurrency_info(GPU_POOL).active_run_ids == set()


def test_shipped_instance_yaml_queues_runs_monitors_them_and_limits_pools(tmp_path):
    shutil.copy(INSTANCE_YAML, tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.is_persistent  # SQLite under DAGSTER_HOME
        assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config.max_concurrent_runs == 4
        assert concurrency.pool_config.pool_granularity.value == "op"
        assert concurrency.pool_config.default_pool_limit == 1
        assert instance.run_monitoring_enabled
        assert 0 < instance.run_monitoring_settings["free_slots_after_run_end_seconds"] <= 300
        assert "MONITORING" in instance.get_required_daemon_types()

    # The PostgreSQL variant differs in its storage only, which holds no secret: every field comes from env.
    default, postgres = yaml.safe_load(INSTANCE_YAML.read_text()), yaml.safe_load(POSTGRES_YAML.read_text())
    assert {k: v for k, v in postgres.items() if k != "storage"} == default
    fields = postgres["storage"]["postgres"]["postgres_db"]
    assert fields.pop("scheme") == "postgresql+psycopg2"
    assert fields == {key: {"env": f"DAGSTER_PG_{name}"} for key, name in
                      [("hostname", "HOST"), ("port", "PORT"), ("username", "USER"), ("password", "PASSWORD"),
                       ("db_name", "DB")]}


def kill_once_it_holds_the_gpu(command: list[str], env: dict, storage, seconds: float) -> None:
    """Start `command` in a process group of its own, wait until a run holds the gpu slot, SIGKILL the group."""
    proc = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + seconds
        while not storage.get_concurrency_info(GPU_POOL).active_run_ids:
            assert proc.poll() is None and time.monotonic() < deadline, "the run never claimed the gpu slot"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


KILLED_RUN = textwrap.dedent("""
    import time
    import dagster as dg

    @dg.asset(pool="gpu")
    def training():
        time.sleep(120)

    dg.materialize([training], instance=dg.DagsterInstance.get())
""")


def test_slot_of_a_killed_run_is_freed_and_the_next_run_gets_it(tmp_path):
    """A run killed with SIGKILL keeps its gpu slot and stays STARTED; bin/setup's free_orphaned_slots frees it."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(INSTANCE_YAML, home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        configure_instance(instance)
        storage = instance.event_log_storage
        kill_once_it_holds_the_gpu([sys.executable, "-c", KILLED_RUN], {**os.environ, "DAGSTER_HOME": str(home)},
                                   storage, seconds=60)
        (run_id,) = storage.get_concurrency_info(GPU_POOL).active_run_ids
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED

        assert free_orphaned_slots(instance) == [run_id]
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
        assert storage.get_concurrency_info(GPU_POOL).active_run_ids == set()
        assert dg.materialize([trained], partition_key="tiny", instance=instance).success  # not blocked
        assert free_orphaned_slots(instance) == []


@pytest.mark.parametrize("pid_alive", [True, False])
def test_started_runs_keep_their_slots_unless_their_process_is_gone(tmp_path, pid_alive):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    pid = os.getpid() if pid_alive else dead.pid
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        configure_instance(instance)
        job = dg.Definitions(assets=[trained], jobs=[dg.define_asset_job("j", [trained])]).resolve_job_def("j")
        run = instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTED)
        instance.report_engine_event(f"Executing steps in process (pid: {pid})", run,
                                     engine_event_data({"pid": dg.MetadataValue.text(str(pid))}))
        assert instance.event_log_storage.claim_concurrency_slot(GPU_POOL, run.run_id, "trained").is_claimed
        assert free_orphaned_slots(instance, check_pids=False) == []  # a shared (PostgreSQL) instance
        assert free_orphaned_slots(instance) == ([] if pid_alive else [run.run_id])
        active = instance.event_log_storage.get_concurrency_info(GPU_POOL).active_run_ids
        assert active == ({run.run_id} if pid_alive else set())


def test_a_retry_after_a_sigkill_through_dagster_asset_materialize_finishes_without_manual_steps(tmp_path):
    """`dagster asset materialize` of a gpu-pool step, killed with SIGKILL while it holds the slot, then any
    gpu-pool step materialized again the same way: the retry frees the dead run's slot itself (no daemon, no
    command to know) and finishes."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(INSTANCE_YAML, home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT)}
    cli = [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m", "tests.gpu_location"]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        configure_instance(instance)
        storage = instance.event_log_storage
        kill_once_it_holds_the_gpu([*cli, "--select", "holds_the_gpu"], env, storage, seconds=120)
        assert storage.get_concurrency_info(GPU_POOL).active_run_ids  # the dead run still holds the slot

        retry = subprocess.run([*cli, "--select", "needs_the_gpu"], env=env, cwd=ROOT, capture_output=True,
                               text=True, timeout=180)
        assert retry.returncode == 0, retry.stderr[-3000:]
        (run,) = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]))
        assert run.asset_selection == {dg.AssetKey("needs_the_gpu")}


def test_definitions_executor_is_a_bounded_multiprocess_executor(monkeypatch):
    import datacomp_assets.definitions as definitions

    def max_concurrent(executor_def) -> int:
        return executor_def.config_schema.resolve_config({}).value["config"]["max_concurrent"]

    job = definitions.defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def is definitions.EXECUTOR
    assert definitions.EXECUTOR.executor_creation_fn is \
        definitions.multiprocess_freeing_orphaned_slots.executor_creation_fn
    assert max_concurrent(job.executor_def) == 2
    monkeypatch.setenv("DATACOMP_MAX_CONCURRENT_STEPS", "3")
    try:
        assert max_concurrent(importlib.reload(definitions).EXECUTOR) == 3
    finally:
        monkeypatch.delenv("DATACOMP_MAX_CONCURRENT_STEPS")
        importlib.reload(definitions)
