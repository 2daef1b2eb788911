"""The asset graph materialized end to end through Dagster on a miniature `tiny` configuration."""

import json
from dataclasses import replace

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.lineage import file_sha256, read_lineage
from datacomp_assets.core.scales import SCALES
from datacomp_assets.core.strategies import STRATEGIES
from datacomp_assets.core.uids import uids_to_array
from datacomp_assets.dagster_private import stale_status
from datacomp_assets.definitions import ALL_ASSETS, RESOURCES, defs
from datacomp_assets.filtering.assets import strategy_definitions
from datacomp_assets.run import run_scale
from datacomp_assets.training.faces import faces_in_pool
from datacomp_assets.world.web_server import free_port
from resources import (
    AcceleratorResource, DownloaderResource, EngineResource, PoolSourceResource, PublishedMetadataResource,
    StorageResource, SyntheticWebResource)
from tests.miniature import MINIATURE


@pytest.fixture
def miniature(tmp_path, monkeypatch):
    monkeypatch.setitem(SCALES, "tiny", MINIATURE)
    resources = {
        "storage": StorageResource(root=str(tmp_path / "data")),
        "accelerator": AcceleratorResource(device="cpu"),
        "downloader": DownloaderResource(processes=1, threads=8),
        "engine": EngineResource(),
        "pool_source": PoolSourceResource(synthetic_web=SyntheticWebResource(port=free_port()),
                                          published=PublishedMetadataResource()),
    }
    return tmp_path / "data" / "tiny", resources


def shards_successes(root) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in (root / "pool_shards").glob("*_stats.json"))


def removed(root) -> int:
    return pq.read_table(root / "pool_metadata" / "removed").num_rows


def latest_metadata(instance, asset: str, partition: str | None) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_definitions_load_with_partitions():
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"pool_index", "pool_shards", "pool_metadata", "subset", "checkpoint", "eval_suite", "eval_results",
            "leaderboard"} <= keys
    subset_parts = repo.asset_graph.get(dg.AssetKey("subset")).partitions_def
    assert "tiny|basic" in subset_parts.get_partition_keys()


def test_tiny_scale_end_to_end(miniature, monkeypatch):
    root, resources = miniature
    strategies = ["no_filter", "basic", "clip_score_l14_30pct", "image_based_clip_score_l14_30pct", "metaclip"]
    with dg.instance_for_test() as instance:
        table = run_scale("tiny", strategies, resources=resources, instance=instance)
        for s in strategies:
            assert f"| {s} |" in table
        assert "dataset_size" in table and "average" in table

        truth = pq.read_table(root / "pool_index" / "ground_truth.parquet").to_pandas()

        # Safety: every planted eval copy and unsafe caption that downloaded left the pool, and little else did.
        downloaded = {u for p in (root / "pool_shards").glob("*.parquet")
                      for u, st in zip(*pq.read_table(p, columns=["uid", "status"]).to_pydict().values())
                      if st == "success"}
        gone = pq.read_table(root / "pool_metadata" / "removed").to_pandas()
        # (The miniature suite holds only the first few `objects` images; copies of later ones have no original.)
        in_suite = json.loads((root / "eval_suite" / "objects" / "info.json").read_text())["num_samples"]
        truth.loc[(truth.kind == "eval_copy") & (truth.eval_index >= in_suite), "kind"] = "eval_copy_not_in_suite"
        for kind, reason in (("eval_copy", "eval_duplicate"), ("unsafe", "unsafe_text")):
            planted = set(truth.uid[truth.kind == kind]) & downloaded
            assert planted <= set(gone.uid[gone.reason == reason]), kind
            assert (gone.reason == reason).sum() <= len(planted) + 0.01 * len(truth)

        # Subsets are sorted u8,u8 arrays of pool uids.
        pool = np.load(root / "subset" / "no_filter" / "subset.npy")
        basic = np.load(root / "subset" / "basic" / "subset.npy")
        assert pool.dtype == np.dtype("u8,u8") and np.array_equal(pool, np.sort(pool))
        assert len(pool) == shards_successes(root) - removed(root)
        assert 0 < len(basic) < len(pool) and set(basic.tolist()) <= set(pool.tolist())

        # Every eval task wrote one reference-format line per strategy.
        # ... for each training seed, from that seed's own checkpoint.
        for seed in MINIATURE.seeds:
            results = root / "eval_results" / "basic" / f"seed_{seed}" / "eval_results.jsonl"
            lines = [json.loads(x) for x in results.read_text().splitlines()]
            assert {"objects", "retrieval", "digits"} <= {x["key"] for x in lines}
            assert all(0.0 <= x["metrics"]["main_metric"] <= 1.0 for x in lines)
            assert (root / "checkpoint" / "basic" / "logs" / f"seed_{seed}" / "checkpoints" / "epoch_1.pt").exists()
        # The leaderboard shows the seeds' spread, and beside it each row's evaluation-noise interval.
        assert "| std |" in table and "| seeds |" in table and "| eval_noise_95 |" in table
        board_rows = json.loads((root / "leaderboard" / "leaderboard.json").read_text())["rows"]
        assert all(low < r["average"] < high for r in board_rows for low, high in [r["eval_noise_95"]])

        # Materializations carry what a user looks at.
        # Every download failure is one the web injected, counted under its kind.
        shards = latest_metadata(instance, "pool_shards", "tiny")
        assert shards["unexpected_failures"] == 0 and 0.8 < shards["success_rate"] < 1.0
        failing = truth["fault"].isin(["dead_link", "refused", "slow", "corrupt", "truncated", "poisoned"])
        assert shards["successes"] == len(truth) - failing.sum()
        ckpt = latest_metadata(instance, "checkpoint", "tiny|basic")
        assert ckpt["final_loss"] > 0 and ckpt["samples_per_second"] > 0
        assert ckpt["seeds"] == [0, 1] and "data:image/png;base64," in ckpt["loss_curve"]
        scores = latest_metadata(instance, "eval_results", "tiny|basic")
        assert scores["average_std"] >= 0 and set(scores["average_per_seed"]) == {"seed_0", "seed_1"}
        basic_subset = latest_metadata(instance, "subset", "tiny|basic")
        assert basic_subset["kept_fraction"] < 1.0
        assert "ground_truth_kind" in basic_subset["audit"] and "| non_english |" in basic_subset["audit"]
        from datacomp_assets.filtering.features import read_features

        features = read_features(root / "pool_features").to_pandas()  # each method its own folder
        assert len(features) == len(pool) and features["in_target_cluster"].any()
        both = np.load(root / "subset" / "image_based_clip_score_l14_30pct" / "subset.npy")
        clip = np.load(root / "subset" / "clip_score_l14_30pct" / "subset.npy")
        assert 0 < len(both) < len(clip) and set(both.tolist()) <= set(clip.tolist())

        # The leaderboard methods' features and subsets, through Dagster: the captioner, the DFN, the text detector
        # and the flipped images in image_scores, HYPE's heads and the embedding scores in pool_features.
        methods = ["devil_in_the_details", "hype_dfn", "negclip_loss_normsim_20pct", "density_pruning",
                   "tmars_50pct", "sieve_clip_score_l14_20pct", "clip_score_l14_30pct_plus_recaptioned"]
        run_scale("tiny", methods, resources=resources, instance=instance, subsets_only=True)
        for name in methods:
            kept = np.load(root / "subset" / name / "subset.npy")
            assert 0 < len(np.unique(kept)) < len(pool), name
        devil = np.load(root / "subset" / "devil_in_the_details" / "subset.npy")
        assert len(devil) > len(np.unique(devil))  # its target-aligned pairs are upsampled
        captions = pq.read_table(root / "image_scores" / "sieve").to_pandas()
        assert len(captions) == shards_successes(root) and captions.generated_caption.str.len().gt(0).any()
        masked = pq.read_table(root / "image_scores" / "tmars").to_pandas().merge(truth[["uid", "kind"]], on="uid")
        assert masked.text_area_share[masked.kind == "text_only"].gt(0).mean() > 0.8  # the detector reads the web
        # Recaptioning: the pool's images with generated captions, a source of their own mixed into the subset.
        source_files = sorted((root / "external_sources" / "recaptioned").glob("*.parquet"))
        recaptioned = pq.ParquetDataset([str(p) for p in source_files]).read().to_pandas()
        assert len(recaptioned) == len(pool) and recaptioned.caption.str.strip().str.len().gt(0).any()
        assert ((recaptioned.status == "success") == recaptioned.caption.str.strip().str.len().gt(0)).all()
        assert set(uids_to_array(recaptioned.pool_uid.tolist()).tolist()) == set(pool.tolist())
        mixed = set(np.load(root / "subset" / "clip_score_l14_30pct_plus_recaptioned" / "subset.npy").tolist())
        generated = set(uids_to_array(recaptioned.uid.tolist()).tolist())
        assert set(clip.tolist()) <= mixed and mixed - set(clip.tolist()) <= generated
        faces = faces_in_pool(root / "pool_metadata", [root / "external_sources" / "recaptioned"])
        derived = dict(zip(recaptioned.pool_uid, recaptioned.uid))
        assert all(faces[derived[u]] == boxes for u, boxes in faces.items() if u in derived)  # blurred there too

        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("subset"), "subset_is_valid")])
        assert check, "the blocking subset check ran"
        loads = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("checkpoint"), "checkpoint_loads")])
        assert loads and loads[dg.AssetCheckKey(dg.AssetKey("checkpoint"), "checkpoint_loads")].status.value == \
            "SUCCEEDED", "every checkpoint loaded with weights_only=True and ran"
        faults = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("pool_shards"), "pool_shards_match_injected_faults")])
        assert faults, "the fault accounting check ran"

        # Materializing again reuses what exists: the pool is not downloaded twice.
        run_scale("tiny", ["basic"], resources=resources, instance=instance)
        assert latest_metadata(instance, "pool_shards", "tiny")["successes"] == shards["successes"]

        # Each leaderboard row traces back to its subset, checkpoints and pool, and the chain holds.
        row = next(r for r in json.loads((root / "leaderboard" / "leaderboard.json").read_text())["rows"]
                   if r["strategy"] == "basic")
        lineage = row["lineage"]
        assert lineage["consistent"] is True and lineage["code_revision"]
        assert lineage["subset_sha256"] == file_sha256(root / "subset" / "basic" / "subset.npy")
        assert lineage["pool_version"] == read_lineage(root / "pool_metadata")["pool_version"]
        assert {seed: c["sha256"] for seed, c in lineage["checkpoints"].items()} == {
            f"seed_{s}": file_sha256(root / "checkpoint" / "basic" / "logs" / f"seed_{s}" / "checkpoints" /
                                     "epoch_1.pt") for s in MINIATURE.seeds}
        assert lineage["subset_sha256"][:12] in latest_metadata(instance, "leaderboard", "tiny")["leaderboard"]

        # Editing one strategy's rule marks that strategy's subset, checkpoint and scores stale, and no other's.
        def status(asset, strategy):
            key = dg.MultiPartitionKey({"scale": "tiny", "strategy": strategy})
            return stale_status(instance, ALL_ASSETS, dg.AssetKey(asset), key)

        per_strategy = ("subset", "checkpoint", "eval_results")
        assert {status(a, s) for a in per_strategy for s in ("basic", "no_filter")} == {"FRESH"}
        basic = STRATEGIES["basic"]
        monkeypatch.setitem(STRATEGIES, "basic", replace(basic, where=basic.where + " AND num_words > 3"))
        dg.materialize([strategy_definitions], selection=[strategy_definitions], instance=instance)  # observes it
        assert {a: status(a, "basic") for a in per_strategy} == dict.fromkeys(per_strategy, "STALE")
        assert {status(a, "no_filter") for a in per_strategy} == {"FRESH"}

        # Materializing it again trains from scratch on the new subset (no resume from the old one's checkpoint)
        # and scores the new checkpoints; the row's lineage holds again.
        old_subset = lineage["subset_sha256"]
        run_scale("tiny", ["basic"], resources=resources, instance=instance)
        assert latest_metadata(instance, "checkpoint", "tiny|basic")["resumed_from_epoch"] == 0
        lineage = next(r for r in json.loads((root / "leaderboard" / "leaderboard.json").read_text())["rows"]
                       if r["strategy"] == "basic")["lineage"]
        assert lineage["subset_sha256"] != old_subset and lineage["consistent"] is True
        assert {status(a, "basic") for a in per_strategy} == {"FRESH"}

        # The scaling analysis ran over the measured board and the paper's numbers.
        scaling = latest_metadata(instance, "scaling_analysis", None)
        assert scaling["measured_scales"] == ["tiny"] and "data:image/png;base64," in scaling["size_vs_average"]
        assert any(c["a"] == "tiny (measured)" for c in scaling["correlations"])

        # The submission export reads back in the public leaderboard's layout.
        result = dg.materialize(ALL_ASSETS, selection=["submission"], partition_key="tiny|basic", instance=instance,
                                resources={**RESOURCES, **resources})
        assert result.success
        export = root / "submission" / "basic"
        record = json.loads((export / "submission.json").read_text())["record"]
        assert record["dataset_size"] == len(np.load(root / "subset" / "basic" / "subset.npy"))
        assert np.array_equal(np.load(export / "tiny_scale" / "samples" / "basic.npy"),
                              np.load(root / "subset" / "basic" / "subset.npy"))
        assert (export / "tiny_scale" / "results.jsonl").read_text() == \
            (root / "eval_results" / "basic" / "seed_0" / "eval_results.jsonl").read_text()


def test_paper_scale_eval_suite_fails_at_once_naming_missing_reference_tasks(tmp_path):
    from resources import EvaluationDataResource

    resources = {"storage": StorageResource(root=str(tmp_path / "data")),
                 "eval_data": EvaluationDataResource(directory=str(tmp_path / "eval"), download=False)}
    with dg.instance_for_test() as instance:
        result = dg.materialize([defs.get_assets_def("eval_suite")], partition_key="small", instance=instance,
                                resources=resources, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.step_failure_data.error.to_string()
    assert "imagenet1k" in message and "djghosh/wds_imagenet1k_test" in message and str(tmp_path / "eval") in message
    assert "djghosh/wds_fairface_test" in message  # the suite is tasklist.yml's: FairFace and UTKFace too
