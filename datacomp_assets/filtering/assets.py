"""Filtering stage: one subset (sorted `u8,u8` uid .npy) per (scale, strategy), with its checks."""

import time

import dagster as dg
import numpy as np

from datacomp_assets.filtering.strategies import STRATEGIES, expected_fraction, select_uids
from datacomp_assets.filtering.uids import load_subset, save_subset, uids_to_array
from partitions import by_scale, scale_and_strategy, scale_strategy_partitions
from resources import StorageResource


@dg.asset(partitions_def=scale_strategy_partitions, group_name="filtering",
          deps=[dg.AssetDep("pool_metadata", partition_mapping=by_scale)],
          code_version="1")
def subset(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """The strategy's rule applied to the pool metadata: the uids a CLIP will be trained on."""
    scale, strategy = scale_and_strategy(context)
    metadata_dir = storage.path(scale.name, "pool_metadata")
    t0 = time.perf_counter()
    uids = select_uids(metadata_dir, strategy, seed=scale.seed)
    seconds = time.perf_counter() - t0
    path = storage.path(scale.name, "subset", strategy) / "subset.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_subset(uids, path)
    pool_rows = _pool_rows(metadata_dir)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)),
        "strategy": STRATEGIES[strategy].description,
        "dataset_size": len(uids),
        "pool_size": pool_rows,
        "kept_fraction": len(uids) / pool_rows if pool_rows else 0.0,
        "seconds": round(seconds, 2),
    })


def _pool_rows(metadata_dir) -> int:
    import duckdb

    return duckdb.sql(f"select count(*) from read_parquet('{metadata_dir}/*.parquet')").fetchall()[0][0]


@dg.asset_check(asset=subset, blocking=True, description="A non-empty subset of the pool, of the rule's size")
def subset_is_valid(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    import duckdb

    scale, strategy = scale_and_strategy(context)
    uids = load_subset(storage.path(scale.name, "subset", strategy) / "subset.npy")
    metadata_dir = storage.path(scale.name, "pool_metadata")
    pool = uids_to_array([u for (u,) in duckdb.sql(
        f"select uid from read_parquet('{metadata_dir}/*.parquet')").fetchall()])
    outside = int((~np.isin(uids, pool)).sum())
    fraction = len(uids) / len(pool) if len(pool) else 0.0
    expected = expected_fraction(strategy)
    size_ok = expected is None or abs(fraction - expected) <= 0.01 + 0.01 * expected
    return dg.AssetCheckResult(
        passed=bool(len(uids) > 0 and outside == 0 and size_ok),
        metadata={"rows": len(uids), "uids_outside_pool": outside, "kept_fraction": fraction,
                  "expected_fraction": expected if expected is not None else "data-dependent"},
    )
