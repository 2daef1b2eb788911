"""A code location for tests/test_orphans.py, run by the project's own executor: a step that takes its asset's
one-writer lock and spins until killed (as a runaway rule would), and one that returns at once."""

import dagster as dg

from datacomp_assets.definitions import EXECUTOR, RESOURCES
from resources import StorageResource


@dg.asset
def spins_holding_its_lock(context: dg.AssetExecutionContext, storage: StorageResource) -> None:
    with storage.writing(context):
        while True:
            pass


@dg.asset
def returns_at_once() -> None:
    pass


defs = dg.Definitions(assets=[spins_holding_its_lock, returns_at_once], resources={"storage": RESOURCES["storage"]},
                      executor=EXECUTOR)
