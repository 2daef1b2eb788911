"""The asset graph materialized end to end through Dagster on a miniature `tiny` configuration."""

import json
from dataclasses import replace

import dagster as dg
import numpy as np
import pytest

from datacomp_assets.definitions import defs
from datacomp_assets.pool.web_server import free_port
from datacomp_assets.run import run_scale
from partitions.scales import SCALES
from resources import AcceleratorResource, DownloaderResource, StorageResource, SyntheticWebResource

MINIATURE = replace(SCALES["tiny"], pool_size=400, samples_seen=256, global_batch=64, checkpoints=1, warmup=2,
                    shard_size=200, curated_size=256, scorer_samples_seen=128, eval_suite_scale=0.04)


@pytest.fixture
def miniature(tmp_path, monkeypatch):
    monkeypatch.setitem(SCALES, "tiny", MINIATURE)
    resources = {
        "storage": StorageResource(root=str(tmp_path / "data")),
        "accelerator": AcceleratorResource(device="cpu"),
        "downloader": DownloaderResource(processes=1, threads=8),
        "synthetic_web": SyntheticWebResource(port=free_port()),
    }
    return tmp_path / "data" / "tiny", resources


def test_definitions_load_with_partitions():
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"pool_index", "pool_shards", "pool_metadata", "subset", "checkpoint", "eval_suite", "eval_results",
            "leaderboard"} <= keys
    subset_parts = repo.asset_graph.get(dg.AssetKey("subset")).partitions_def
    assert "tiny|basic" in subset_parts.get_partition_keys()


def test_tiny_scale_end_to_end(miniature):
    root, resources = miniature
    strategies = ["no_filter", "basic", "clip_score_l14_30pct"]
    with dg.instance_for_test() as instance:
        table = run_scale("tiny", strategies, resources=resources, instance=instance)
        for s in strategies:
            assert f"| {s} |" in table
        assert "dataset_size" in table and "average" in table

        # Subsets are sorted u8,u8 arrays of pool uids.
        pool = np.load(root / "subset" / "no_filter" / "subset.npy")
        basic = np.load(root / "subset" / "basic" / "subset.npy")
        assert pool.dtype == np.dtype("u8,u8") and np.all(pool[:-1] <= pool[1:])
        assert 0 < len(basic) < len(pool) and np.isin(basic, pool).all()

        # Every eval task wrote one reference-format line per strategy.
        lines = [json.loads(x) for x in (root / "eval_results" / "basic" / "eval_results.jsonl").read_text().splitlines()]
        assert {"objects", "retrieval", "digits"} <= {x["key"] for x in lines}
        assert all(0.0 <= x["metrics"]["main_metric"] <= 1.0 for x in lines)

        # Materializations carry what a user looks at.
        shards = instance.get_latest_materialization_event(dg.AssetKey("pool_shards"), partition="tiny")
        meta = shards.asset_materialization.metadata
        assert meta["successes"].value == MINIATURE.pool_size and meta["success_rate"].value == 1.0
        ckpt = instance.get_latest_materialization_event(
            dg.AssetKey("checkpoint"), partition=dg.MultiPartitionKey({"scale": "tiny", "strategy": "basic"}))
        assert ckpt.asset_materialization.metadata["final_loss"].value > 0
        assert ckpt.asset_materialization.metadata["samples_per_second"].value > 0

        # Materializing again reuses what exists: the pool is not downloaded twice.
        run_scale("tiny", ["basic"], resources=resources, instance=instance)
        again = instance.get_latest_materialization_event(dg.AssetKey("pool_shards"), partition="tiny")
        assert again.asset_materialization.metadata["successes"].value == MINIATURE.pool_size
