"""Pool shards are checked against img2dataset's counts, nothing is reset before its replacement is complete, and
lineage names files relative to the data root (issue 26, rows 9, 10 and 11)."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.layout import Layout, seed_name
from datacomp_assets.core.lineage import file_sha256, files_sha256, read_lineage, write_lineage
from datacomp_assets.core.scales import SCALES, scale_version
from datacomp_assets.core.strategies import strategy_version
from datacomp_assets.core.shards import write_webdataset
from datacomp_assets.core.uids import save_subset, uids_to_array
from datacomp_assets.training.reshard import reshard
from datacomp_assets.world.web import encode_jpeg, render, sample
from tests.miniature import MINIATURE

PER_SHARD = 40


def write_img2dataset_shards(directory: Path, shards: int = 3) -> list[str]:
    """Shards as img2dataset leaves them (NNNNNNNN.tar of jpg/json/txt members beside NNNNNNNN_stats.json);
    returns the uids, in order."""
    directory.mkdir(parents=True)
    uids = []
    for k in range(shards):
        samples = [sample(i) for i in range(k * PER_SHARD, (k + 1) * PER_SHARD)]
        write_webdataset(directory / f"{k:08d}.tar", (
            (f"{k:04d}{s.index:05d}", {"jpg": encode_jpeg(render(s).resize((16, 16))),
                                       "json": json.dumps({"uid": s.uid}).encode(), "txt": s.text.encode()})
            for s in samples))
        (directory / f"{k:08d}_stats.json").write_text(json.dumps(
            {"count": PER_SHARD, "successes": PER_SHARD, "failed_to_download": 0, "failed_to_resize": 0}))
        uids += [s.uid for s in samples]
    return uids


def samples_in(tar_path: Path) -> int:
    with tarfile.open(tar_path) as tar:
        return len({m.name.partition(".")[0] for m in tar.getmembers()})


def cut_at_member_boundary(tar_path: Path, keep: int) -> None:
    """Cut the file where the header of its (keep+1)-th sample begins: the first `keep` samples stay whole."""
    with tarfile.open(tar_path) as tar:
        keys = []
        for member in tar.getmembers():
            stem = member.name.partition(".")[0]
            if stem not in keys:
                keys.append(stem)
            if len(keys) == keep + 1:
                os.truncate(tar_path, member.offset)
                return
    raise AssertionError(f"{tar_path} holds no more than {keep} samples")


def cut_mid_member(tar_path: Path) -> None:
    with tarfile.open(tar_path) as tar:
        middle = tar.getmembers()[len(tar.getmembers()) // 2]
    os.truncate(tar_path, middle.offset_data + middle.size // 2)


# ------------------------------------------------------------------ row 9: a shard cut at a member boundary

@pytest.fixture
def small_pool(tmp_path, monkeypatch):
    """A three-shard pool downloaded from the synthetic web through pool_index and pool_shards."""
    from datacomp_assets.pool.assets import pool_index, pool_shards
    from resources import (
        DownloaderResource, EngineResource, PoolSourceResource, PublishedMetadataResource, StorageResource,
        SyntheticWebResource)
    from datacomp_assets.world.web_server import free_port

    monkeypatch.setitem(SCALES, "tiny", replace(MINIATURE, pool_size=60, shard_size=20))
    resources = {
        "storage": StorageResource(root=str(tmp_path / "data")),
        "downloader": DownloaderResource(processes=1, threads=8),
        "engine": EngineResource(),
        "pool_source": PoolSourceResource(synthetic_web=SyntheticWebResource(port=free_port()),
                                          published=PublishedMetadataResource()),
    }
    assert dg.materialize([pool_index, pool_shards], partition_key="tiny", resources=resources).success
    return Layout(tmp_path / "data"), resources


def test_a_pool_shard_cut_at_a_member_boundary_fails_its_check_by_name_and_the_next_run_fetches_it(small_pool):
    from datacomp_assets.pool.assets import pool_shards, pool_shards_complete
    from partitions import scale_partitions

    layout, resources = small_pool
    shards = layout.pool_shards("tiny")
    cut, kept = shards / "00000001.tar", shards / "00000000.tar"
    whole = samples_in(cut)
    kept_mtime = kept.stat().st_mtime_ns
    cut_at_member_boundary(cut, keep=whole - 5)

    check_job = dg.define_asset_job("check", selection=dg.AssetSelection.checks(pool_shards_complete),
                                    partitions_def=scale_partitions)
    defs = dg.Definitions(assets=[pool_shards], asset_checks=[pool_shards_complete], resources=resources,
                          jobs=[check_job])
    # (the check alone, on the shards as they are: a partitioned check-only run takes its partition as a tag)
    checked = defs.resolve_job_def("check").execute_in_process(tags={"dagster/partition": "tiny"},
                                                               raise_on_error=False)
    [evaluation] = checked.get_asset_check_evaluations()
    assert not evaluation.passed
    assert f"{cut} holds {whole - 5} of the {whole} samples its 00000001_stats.json counts" in evaluation.description
    assert "Materialize pool_shards again" in evaluation.description  # and that advice works:

    again = dg.materialize([pool_shards, pool_shards_complete], partition_key="tiny", resources=resources)
    assert again.success and all(e.passed for e in again.get_asset_check_evaluations())
    assert samples_in(cut) == whole
    assert kept.stat().st_mtime_ns == kept_mtime  # only the damaged shard was fetched again


def test_reshard_names_a_pool_shard_cut_at_a_member_boundary(tmp_path):
    """Training must not silently use fewer samples: the shard is named with what it lacks."""
    uids = write_img2dataset_shards(tmp_path / "pool")
    cut_at_member_boundary(tmp_path / "pool" / "00000001.tar", keep=25)
    with pytest.raises(ValueError, match=r"00000001\.tar holds 25 of the 40 samples its 00000001_stats\.json counts"
                                         r".*Materialize pool_shards again"):
        reshard(tmp_path / "pool", uids_to_array(uids), tmp_path / "train", shard_size=10)
    assert not (tmp_path / "train").exists() and not list(tmp_path.glob(".train.*"))


def test_a_shard_cut_between_the_members_of_its_last_sample_is_not_whole(tmp_path):
    """The sample count alone would pass a tar cut after its last sample's image; its missing end blocks do not."""
    from datacomp_assets.core.shards import shard_problem

    write_img2dataset_shards(tmp_path / "pool", shards=1)
    tar_path = tmp_path / "pool" / "00000000.tar"
    assert shard_problem(tar_path) is None
    with tarfile.open(tar_path) as tar:
        last_json = [m for m in tar.getmembers() if m.name.endswith(".json")][-1]
    os.truncate(tar_path, last_json.offset)  # the last sample keeps its jpg, loses its json and txt
    assert shard_problem(tar_path) == "is cut short after its last member (it lacks the end-of-archive blocks)"


# ------------------------------------------------------------------ row 10: a shard cut mid-member

def test_reshard_names_a_pool_shard_cut_mid_member(tmp_path):
    uids = write_img2dataset_shards(tmp_path / "pool")
    cut_mid_member(tmp_path / "pool" / "00000002.tar")
    with pytest.raises(ValueError, match=r"00000002\.tar is cut short mid-member.*Materialize pool_shards again"):
        reshard(tmp_path / "pool", uids_to_array(uids), tmp_path / "train", shard_size=10)


def test_a_failed_reshard_leaves_the_checkpoints_record_as_it_was(tmp_path):
    """A finished checkpoint's lineage.json is replaced only by the record of a finished retraining."""
    from datacomp_assets.training.assets import checkpoint
    from resources import AcceleratorResource, EngineResource, StorageResource

    layout = Layout(tmp_path / "data")
    uids = write_img2dataset_shards(layout.pool_shards("tiny"))
    cut_mid_member(layout.pool_shards("tiny") / "00000001.tar")
    metadata = layout.pool_metadata("tiny")
    metadata.mkdir(parents=True)
    pq.write_table(pa.table({"uid": uids, "face_bboxes": pa.array([[] for _ in uids],
                                                                  pa.list_(pa.list_(pa.float64())))}),
                   metadata / "00000000.parquet")
    subset = layout.subset_file("tiny", "no_filter")
    subset.parent.mkdir(parents=True)
    save_subset(np.sort(uids_to_array(uids)), subset)
    write_lineage(subset.parent, {"subset_sha256": file_sha256(subset), "pool_version": "v1"})
    record = write_lineage(layout.checkpoint_dir("tiny", "no_filter"), {
        "subset_sha256": file_sha256(subset), "pool_version": "v1", "complete": True,
        "checkpoints": {"seed_0": {"path": "tiny/checkpoint/no_filter/logs/seed_0/checkpoints/epoch_10.pt",
                                   "sha256": "ab" * 32}}})
    before = record.read_bytes()

    result = dg.materialize(
        [checkpoint], partition_key=dg.MultiPartitionKey({"scale": "tiny", "strategy": "no_filter"}),
        resources={"storage": StorageResource(root=str(tmp_path / "data")),
                   "accelerator": AcceleratorResource(device="cpu"), "engine": EngineResource()},
        raise_on_error=False)
    assert not result.success
    assert record.read_bytes() == before
    failure = next(e for e in result.all_events if e.is_step_failure).event_specific_data.error
    assert "00000001.tar is cut short mid-member" in failure.to_string()


# ------------------------------------------------------------------ row 11: lineage relative to the data root

def finished_tree(root: Path, record_path) -> Layout:
    """The records and files the board reads for tiny/basic (subset, checkpoints, scores), each checkpoint's path
    recorded as `record_path(layout, path)` says."""
    layout, scale = Layout(root), SCALES["tiny"]
    subset = layout.subset_file("tiny", "basic")
    subset.parent.mkdir(parents=True)
    save_subset(np.sort(uids_to_array([f"{i:032x}" for i in range(5)])), subset)
    write_lineage(subset.parent, {"subset_sha256": file_sha256(subset), "strategy_version": strategy_version("basic")})
    checkpoints = {}
    for seed in scale.seeds:
        path = layout.seed_checkpoint("tiny", "basic", seed, scale.epochs)
        path.parent.mkdir(parents=True)
        path.write_bytes(bytes(range(256)) * 100 + bytes([seed]))
        checkpoints[seed_name(seed)] = {"path": record_path(layout, path), "sha256": file_sha256(path)}
        results = layout.results_file("tiny", "basic", seed)
        results.parent.mkdir(parents=True)
        results.write_text('{"key": "objects", "metrics": {"main_metric": 0.5}}\n')
    write_lineage(layout.checkpoint_dir("tiny", "basic"), {"subset_sha256": file_sha256(subset),
                                                         "scale_version": scale_version(scale),
                                                         "checkpoints": checkpoints})
    write_lineage(layout.eval_results_dir("tiny", "basic"), {
        "checkpoints": {name: c["sha256"] for name, c in checkpoints.items()},
        "results_sha256": files_sha256(layout.results_file("tiny", "basic", s) for s in scale.seeds)})
    return layout


def a_copy_is_checked_against_its_own_files(tmp_path: Path, original: Layout) -> None:
    """Copy `tmp_path/original` to `tmp_path/copy` and delete a checkpoint there: the copy's board sees it, the
    original's does not."""
    from datacomp_assets.leaderboard.assets import lineage_of

    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    copy = Layout(tmp_path / "copy")
    assert lineage_of(copy, "tiny", "basic")["consistent"] is True
    scale = SCALES["tiny"]
    copy.seed_checkpoint("tiny", "basic", scale.seeds[-1], scale.epochs).unlink()
    assert lineage_of(copy, "tiny", "basic")["consistent"] is False
    assert lineage_of(original, "tiny", "basic")["consistent"] is True


def test_a_copied_tree_is_checked_against_its_own_files(tmp_path):
    from datacomp_assets.core.lineage import path_in_record
    from datacomp_assets.leaderboard.assets import lineage_of

    original = finished_tree(tmp_path / "original", lambda layout, path: path_in_record(path, layout.root))
    record = read_lineage(original.checkpoint_dir("tiny", "basic"))["checkpoints"]["seed_0"]["path"]
    epochs = SCALES["tiny"].epochs
    assert record == f"tiny/checkpoint/basic/logs/seed_0/checkpoints/epoch_{epochs}.pt"  # relative to the data root
    a_copy_is_checked_against_its_own_files(tmp_path, original)

    (tmp_path / "original").rename(tmp_path / "moved")  # a moved tree holds by its own files
    assert lineage_of(Layout(tmp_path / "moved"), "tiny", "basic")["consistent"] is True


def test_an_old_record_with_absolute_paths_is_read_against_the_copys_own_files(tmp_path):
    """Records written before paths were relative name the original's files: a copy reads them in its own tree."""
    from datacomp_assets.leaderboard.assets import lineage_of

    original = finished_tree(tmp_path / "original", lambda layout, path: str(path))  # as the old writer did
    assert lineage_of(original, "tiny", "basic")["consistent"] is True
    a_copy_is_checked_against_its_own_files(tmp_path, original)
