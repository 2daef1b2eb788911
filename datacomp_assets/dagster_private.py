"""The only module of the project that touches Dagster's private API (`dagster._...`).

Everything else uses public Dagster (what `import dagster` exports). Where no public API does what the project
needs, the private call lives here, one function per call, each saying what it wraps and why no public API does
it. tests/test_dagster_private.py exercises every function here for real, so a Dagster upgrade that moves or
changes one of these fails there, naming the function to update, not somewhere deep in a run.

The private imports are inside the functions: a wrapper that an upgrade breaks breaks only its own callers
(`stale_status` and `engine_event_data` serve the tests; `is_sqlite_event_log_storage` serves
datacomp_assets.instance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg


def is_sqlite_event_log_storage(storage: Any) -> bool:
    """Whether an instance's event log storage (`instance.event_log_storage`) is SQLite, hence local to this
    machine (datacomp_assets.instance checks the process ids of a SQLite instance's runs, not a shared one's).

    Wraps `isinstance` against `dagster._core.storage.event_log.SqliteEventLogStorage` and
    `ConsolidatedSqliteEventLogStorage`: Dagster exports neither class, and nothing public says which database
    backs an instance. The storage's `inst_data` is None for the SQLite storage of a bare $DAGSTER_HOME or of
    instance/dagster.yaml, and `instance.get_ref()` (private `InstanceRef`, none for an ephemeral instance)
    names the class by its private module path, no sturdier than this."""
    from dagster._core.storage.event_log import ConsolidatedSqliteEventLogStorage, SqliteEventLogStorage

    return isinstance(storage, (SqliteEventLogStorage, ConsolidatedSqliteEventLogStorage))


def stale_status(instance: dg.DagsterInstance, assets: Sequence[Any], asset_key: dg.AssetKey,
                 partition_key: str | None = None) -> str:
    """The staleness the UI shows for `asset_key` (one partition of it) given `assets`' definitions and the
    instance's events: "FRESH", "STALE" or "MISSING" (the name of Dagster's `StaleStatus`).

    Wraps `dagster._utils.test.data_versions.get_stale_status_resolver(...).get_status(...)`: staleness is public
    only through the UI and GraphQL; its resolver (`CachingStaleStatusResolver`, built on an `AssetGraph` and an
    `AssetGraphView`) and the `StaleStatus` enum are private, and that helper is what Dagster's own tests use."""
    from dagster._utils.test.data_versions import get_stale_status_resolver

    return get_stale_status_resolver(instance, list(assets)).get_status(asset_key, partition_key).value


def engine_event_data(metadata: Mapping[str, Any]) -> Any:
    """The `engine_event_data` argument of `DagsterInstance.report_engine_event` that carries `metadata`, as
    the run worker's own engine events do (`pid`); for tests that stand in for a run worker.

    Wraps `dagster._core.events.EngineEventData(metadata)`: `report_engine_event` takes its metadata only in
    that class, which Dagster does not export."""
    from dagster._core.events import EngineEventData

    return EngineEventData(dict(metadata))


def step_materialization_data(materialization: dg.AssetMaterialization) -> Any:
    """The `event_specific_data` of an ASSET_MATERIALIZATION `DagsterEvent`, for a benchmark that writes a
    backfill's events straight to an instance's storage (benchmarks/instance_storage.py).

    Wraps `dagster._core.events.StepMaterializationData(materialization)`: the event's payload class, which
    Dagster does not export."""
    from dagster._core.events import StepMaterializationData

    return StepMaterializationData(materialization)
