"""A code location for tests/test_instance.py: two `gpu`-pool assets run by the project's own executor, one that
holds the slot for two minutes (to be killed) and one that returns at once."""

import time

import dagster as dg

from datacomp_assets.definitions import EXECUTOR


@dg.asset(pool="gpu")
def holds_the_gpu() -> None:
    time.sleep(120)


@dg.asset(pool="gpu")
def needs_the_gpu() -> None:
    pass


defs = dg.Definitions(assets=[holds_the_gpu, needs_the_gpu], executor=EXECUTOR)
