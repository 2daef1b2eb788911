"""Lineage records: content hashes, atomic records, and recognising an artifact made from another input."""

import hashlib
import subprocess
from pathlib import Path

import pytest

from datacomp_assets.core.lineage import (
    code_revision, file_sha256, files_sha256, made_from_other_input, read_lineage, write_lineage)


def test_hashes_are_of_contents_in_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 3_000_000)
    b.write_bytes(b"y")
    assert file_sha256(a) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    expected = hashlib.sha256((file_sha256(a) + file_sha256(b)).encode()).hexdigest()
    assert files_sha256([a, b]) == expected != files_sha256([b, a])
    moved = tmp_path / "moved"
    moved.write_bytes(a.read_bytes())
    assert files_sha256([moved, b]) == expected  # a name is not content


def test_records_round_trip_and_say_when_the_input_changed(tmp_path):
    assert read_lineage(tmp_path) == {} and not made_from_other_input(tmp_path, "subset_sha256", "new")
    write_lineage(tmp_path / "ckpt", {"subset_sha256": "old", "complete": False})
    assert read_lineage(tmp_path / "ckpt") == {"subset_sha256": "old", "complete": False}
    assert made_from_other_input(tmp_path / "ckpt", "subset_sha256", "new")
    assert not made_from_other_input(tmp_path / "ckpt", "subset_sha256", "old")
    assert not list((tmp_path / "ckpt").glob("*.tmp"))  # written to a temporary name, then renamed


def test_a_corrupt_record_names_its_file_and_the_fix(tmp_path):
    (tmp_path / "lineage.json").write_text("{not json")
    with pytest.raises(ValueError, match="lineage.json is not valid JSON.*materialize the asset again"):
        read_lineage(tmp_path)


def test_code_revision_names_the_checked_out_commit():
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert code_revision().split("+")[0] == head[:12]


def test_a_manifest_names_what_changed_since_it_was_written(tmp_path):
    from datacomp_assets.core.lineage import file_manifest, manifest_version, verified_version

    for name, data in [("a.parquet", b"aa"), ("b.parquet", b"bbb"), ("c.parquet", b"c")]:
        (tmp_path / name).write_bytes(data)
    files = sorted(tmp_path.glob("*.parquet"))
    manifest = file_manifest(files)
    assert manifest_version(manifest) == files_sha256(files)  # the pool version it always was
    write_lineage(tmp_path, {"pool_version": manifest_version(manifest), "manifest": manifest})
    assert verified_version(tmp_path) == files_sha256(files)
    (tmp_path / "b.parquet").unlink()
    (tmp_path / "c.parquet").write_bytes(b"cc")
    (tmp_path / "d.parquet").write_bytes(b"d")
    with pytest.raises(ValueError, match=r"b.parquet is missing; d.parquet was added; c.parquet has 2 bytes, not 1"):
        verified_version(tmp_path)


def test_a_missing_metadata_file_fails_the_subset(tmp_path, monkeypatch):
    """A metadata file moved out of the pool after pool_metadata: the subset must not be computed from the rest
    and labelled with the old pool version."""
    import dagster as dg
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datacomp_assets.core.layout import Layout
    from datacomp_assets.core.lineage import file_manifest, manifest_version
    from datacomp_assets.filtering.assets import subset
    from resources import (
        EngineResource, PoolSourceResource, PublishedMetadataResource, StorageResource, SyntheticWebResource)

    layout = Layout(tmp_path / "data")
    metadata, features = layout.pool_metadata("tiny"), layout.pool_features("tiny")
    metadata.mkdir(parents=True)
    features.mkdir(parents=True)
    for shard in range(3):
        uids = [f"{shard:016x}{i:016x}" for i in range(10)]
        pq.write_table(pa.table({"uid": uids, "text": ["a photo of a cat"] * 10, "original_width": [256] * 10,
                                 "original_height": [256] * 10, "language": ["en"] * 10}),
                       metadata / f"{shard:08d}.parquet")
        pq.write_table(pa.table({"uid": uids, "dfn_score": [0.5] * 10}), features / f"{shard:08d}.parquet")
    manifest = file_manifest(sorted(metadata.glob("*.parquet")))
    write_lineage(metadata, {"pool_version": manifest_version(manifest), "manifest": manifest})
    resources = {"storage": StorageResource(root=str(tmp_path / "data")), "engine": EngineResource(),
                 "pool_source": PoolSourceResource(synthetic_web=SyntheticWebResource(),
                                                   published=PublishedMetadataResource())}
    key = dg.MultiPartitionKey({"scale": "tiny", "strategy": "no_filter"})
    assert dg.materialize([subset], partition_key=key, resources=resources).success
    assert len(np.load(layout.subset_file("tiny", "no_filter"))) == 30

    (metadata / "00000001.parquet").rename(tmp_path / "moved_away.parquet")
    result = dg.materialize([subset], partition_key=key, resources=resources, raise_on_error=False)
    assert not result.success
    message = next(e for e in result.all_events if e.is_step_failure).event_specific_data.error.to_string()
    assert "00000001.parquet is missing" in message and "Materialize pool_metadata (tiny) again" in message
    assert len(np.load(layout.subset_file("tiny", "no_filter"))) == 30  # the old subset stands
