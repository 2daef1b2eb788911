"""Each wrapper of datacomp_assets.dagster_private, exercised for real on a throwaway instance: a Dagster upgrade
that moves or changes the private API one wraps fails here, with a message naming the wrapper to update.

And the rule that makes that module the only one to touch Dagster's private API: no other module of the project
imports it."""

from __future__ import annotations

import ast
import contextlib
import re
import shutil
import uuid
from pathlib import Path

import dagster as dg
import pytest

from datacomp_assets import dagster_private

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def wrapper(name: str):
    """Turn any error inside a call of `dagster_private.<name>` into a failure that says what to update."""
    try:
        yield getattr(dagster_private, name)
    except Exception as e:  # ImportError, AttributeError, TypeError...: whatever the upgrade broke
        pytest.fail(f"datacomp_assets.dagster_private.{name} no longer works with Dagster {dg.__version__} "
                    f"({type(e).__name__}: {e}). The private Dagster API it wraps moved or changed: update "
                    f"{name} (its docstring says what it wraps).", pytrace=False)


def expect(name: str, ok: bool, what: str) -> None:
    if not ok:
        pytest.fail(f"datacomp_assets.dagster_private.{name} runs with Dagster {dg.__version__} but {what}: "
                    f"the private API it wraps changed its meaning; update {name}.", pytrace=False)


# ------------------------------------------------------------------------------------------------ the wrappers


def test_is_sqlite_event_log_storage(tmp_path):
    bare, shipped = tmp_path / "bare", tmp_path / "shipped"
    bare.mkdir()
    shipped.mkdir()
    shutil.copy(ROOT / "instance" / "dagster.yaml", shipped / "dagster.yaml")
    results = {}
    with wrapper("is_sqlite_event_log_storage") as is_sqlite:
        for name, home in [("a bare $DAGSTER_HOME", bare), ("instance/dagster.yaml", shipped)]:
            with dg.DagsterInstance.from_config(str(home)) as instance:
                results[name] = is_sqlite(instance.event_log_storage)
        with dg.DagsterInstance.ephemeral() as instance:
            results["an ephemeral (in-memory) instance"] = is_sqlite(instance.event_log_storage)
    expected = {"a bare $DAGSTER_HOME": True, "instance/dagster.yaml": True, "an ephemeral (in-memory) instance": False}
    expect("is_sqlite_event_log_storage", results == expected, f"it answers {results}, not {expected}")


def test_stale_status():
    versions = {"a": "1", "b": "1"}
    parts = dg.StaticPartitionsDefinition(["a", "b"])

    @dg.observable_source_asset(partitions_def=parts)
    def rule() -> dg.DataVersionsByPartition:
        return dg.DataVersionsByPartition({k: dg.DataVersion(v) for k, v in versions.items()})

    @dg.asset(partitions_def=parts, deps=[rule])
    def derived() -> None:
        pass

    @dg.asset(partitions_def=parts)
    def never_materialized() -> None:
        pass

    assets = [rule, derived, never_materialized]
    with dg.DagsterInstance.ephemeral() as instance:
        dg.materialize([rule], selection=[rule], instance=instance)  # observe
        for key in parts.get_partition_keys():
            dg.materialize(assets, selection=[derived], partition_key=key, instance=instance)
        with wrapper("stale_status") as stale_status:
            before = {k: stale_status(instance, assets, derived.key, k) for k in ("a", "b")}
        versions["b"] = "2"
        dg.materialize([rule], selection=[rule], instance=instance)
        with wrapper("stale_status") as stale_status:
            after = {k: stale_status(instance, assets, derived.key, k) for k in ("a", "b")}
            missing = stale_status(instance, assets, never_materialized.key, "a")
    expect("stale_status", before == {"a": "FRESH", "b": "FRESH"}, f"before the change it says {before}")
    expect("stale_status", after == {"a": "FRESH", "b": "STALE"}, f"after partition b's change it says {after}")
    expect("stale_status", missing == "MISSING", f"it calls a never-materialized asset {missing!r}")


def test_engine_event_data():
    @dg.asset
    def step() -> None:
        pass

    with dg.DagsterInstance.ephemeral() as instance:
        job = dg.Definitions(assets=[step], jobs=[dg.define_asset_job("j", [step])]).resolve_job_def("j")
        run = instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTED)
        with wrapper("engine_event_data") as engine_event_data:
            instance.report_engine_event("Executing steps in process (pid: 4242)", run,
                                         engine_event_data({"pid": dg.MetadataValue.text("4242")}))
        (entry,) = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        metadata = getattr(entry.dagster_event.event_specific_data, "metadata", None) or {}
        value = metadata.get("pid")
    expect("engine_event_data", getattr(value, "value", None) == "4242",
           f"the engine event reads back with metadata {metadata!r}, not pid 4242")


def test_step_materialization_data():
    with dg.DagsterInstance.ephemeral() as instance:
        run = instance.add_run(dg.DagsterRun(job_name="bench", run_id=str(uuid.uuid4())))
        materialization = dg.AssetMaterialization(asset_key="a", partition="p0", metadata={"i": 1})
        with wrapper("step_materialization_data") as step_materialization_data:
            instance.report_dagster_event(dg.DagsterEvent(
                dg.DagsterEventType.ASSET_MATERIALIZATION.value, job_name="bench",
                event_specific_data=step_materialization_data(materialization)), run_id=run.run_id)
        records = instance.fetch_materializations(dg.AssetKey("a"), limit=1).records
    expect("step_materialization_data", len(records) == 1 and records[0].partition_key == "p0",
           f"the materialization reads back as {records!r}")


# -------------------------------------------------------------------------------------------------- the rule

PRIVATE = re.compile(r"^dagster\.(_\w*)")  # a module under dagster whose name starts with an underscore
ALLOWED = {
    "datacomp_assets/dagster_private.py",
}


def private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: import {a.name}" for a in node.names
                      if PRIVATE.match(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if PRIVATE.match(node.module):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import ...")
    return found


def test_only_dagster_private_imports_private_dagster():
    found = [hit for folder in ("datacomp_assets", "resources", "partitions", "tests", "benchmarks")
             for path in sorted((ROOT / folder).rglob("*.py"))
             if path.relative_to(ROOT).as_posix() not in ALLOWED
             for hit in private_imports(path)]
    assert not found, ("private Dagster imports outside datacomp_assets/dagster_private.py; use public Dagster, "
                       "or wrap the call there (one function, a comment, a test here):\n" + "\n".join(found))
