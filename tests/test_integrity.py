"""Content, not size: a table of per-sample values whose bytes or values changed is named before it is read, and
materializing its writer again recomputes it (or, at a published pool, refuses the user's bad file) instead of
recording it as a new version (issue 26, rows 4, 5, 6 and 12).

The miniature: two downloaded shards of 12 images each, and stand-in models (a cosine of colour and caption
embeddings) in place of the trained CLIPs, so that pool_metadata, image_scores and subset run through Dagster in
seconds.
"""

import hashlib
import io
import json
import os
from dataclasses import replace

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datacomp_assets.core.layout import Layout
from datacomp_assets.core.lineage import (
    file_manifest, files_sha256, manifest_version, read_lineage, verified_version, write_lineage)
from datacomp_assets.core.scales import SCALES
from datacomp_assets.core.shards import write_webdataset
from datacomp_assets.core.uids import load_subset, uids_to_array
from resources import (
    AcceleratorResource, EngineResource, PoolSourceResource, PublishedMetadataResource, StorageResource,
    SyntheticWebResource)

SHARDS, PER_SHARD = 2, 12
CAPTIONS = ["a red circle on a white page", "a photo of a dog in the grass", "blue sky over the sea",
            "a green square", "two cats asleep on a sofa", "a bowl of fruit on a table"]


class StandInScorer:
    """Duck-typed `core.models.Scorer`: unit embeddings of an image's mean colour and of its caption's hash, whose
    cosine varies from sample to sample, deterministically."""

    def __init__(self, prefix, *_ignored):
        self.prefix = prefix
        self.salt = int(hashlib.sha256(prefix.encode()).hexdigest()[:8], 16)

    def embed(self, images, texts):
        image = np.array([np.asarray(im, np.float32).mean(axis=(0, 1)) / 255 - 0.5 for im in images], np.float32)
        text = np.array([np.random.default_rng([self.salt, int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)])
                         .standard_normal(3) for t in texts], np.float32)
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        return unit(image.reshape(len(images), 3)), unit(text.reshape(len(texts), 3))


def write_downloaded_shards(directory):
    """Two shards in img2dataset's layout (jpg, json, txt per sample)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for shard in range(SHARDS):
        samples = []
        for i in range(PER_SHARD):
            uid = f"{shard + 1:016x}{i + 1:016x}"
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(0, 256, 3))).save(buffer, "JPEG")
            meta = {"uid": uid, "url": f"http://images.invalid/{uid}.jpg", "original_width": 32,
                    "original_height": 32, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
            samples.append((f"{shard:04d}{i:05d}", {"jpg": buffer.getvalue(), "json": json.dumps(meta).encode(),
                                                    "txt": f"{CAPTIONS[i % len(CAPTIONS)]} {i}".encode()}))
        write_webdataset(directory / f"{shard:08d}.tar", samples)


@pytest.fixture
def pool(tmp_path, monkeypatch):
    """A tiny pool whose models are stand-ins: (layout, resources, materialize(asset, partition) -> result)."""
    import datacomp_assets.core.models as models
    import datacomp_assets.filtering.image_scores as image_scores
    import datacomp_assets.metadata.assets as metadata_assets
    from datacomp_assets.core.scorers import dfn_checkpoint
    from datacomp_assets.metadata.build import build_pool_metadata

    layout = Layout(tmp_path / "data")
    write_downloaded_shards(layout.pool_shards("tiny"))

    def metadata_from_images(context, scale, layout, accelerator, out):  # the scorer CLIPs, stood in for
        return build_pool_metadata(layout.pool_shards(scale.name), out,
                                   [StandInScorer("b32"), StandInScorer("l14")], context.log.info)

    monkeypatch.setattr(metadata_assets, "metadata_from_images", metadata_from_images)
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: (None, None, None))
    monkeypatch.setattr(models, "Scorer", StandInScorer)
    monkeypatch.setattr(image_scores, "Scorer", StandInScorer)  # imported there by name
    checkpoint = dfn_checkpoint(layout, SCALES["tiny"])  # the models' tasks key their cache on the file
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"a stand-in model")
    resources = {"storage": StorageResource(root=str(tmp_path / "data")), "engine": EngineResource(),
                 "accelerator": AcceleratorResource(device="cpu"),
                 "pool_source": PoolSourceResource(synthetic_web=SyntheticWebResource(),
                                                   published=PublishedMetadataResource())}
    return layout, resources


def materialize(resources, asset_name: str, **partition):
    """Materialize one asset (its upstream as it is on disk); the result, with `.error` the step's message."""
    from datacomp_assets.filtering.assets import image_scores, subset
    from datacomp_assets.metadata.assets import pool_metadata
    from datacomp_assets.pool.assets import pool_index

    asset = {"pool_index": pool_index, "pool_metadata": pool_metadata, "image_scores": image_scores,
             "subset": subset}[asset_name]
    key = dg.MultiPartitionKey(partition) if len(partition) > 1 else partition["scale"]
    result = dg.materialize([asset], partition_key=key, resources=resources, raise_on_error=False)
    failures = [e for e in result.all_events if e.is_step_failure]
    error = failures[0].event_specific_data.error if failures else None
    while error is not None and error.cause is not None:  # the asset's own error, under Dagster's
        error = error.cause
    result.error = error.message.strip() if error else None
    return result


def subset_uids(layout, strategy):
    return load_subset(layout.subset_file("tiny", strategy))


def metadata_file(layout, shard=0):
    return layout.pool_metadata("tiny") / f"{shard:08d}.parquet"


def rewrite(path, table):
    """Rewrite a parquet file as its writer would (pyarrow's defaults)."""
    pq.write_table(table, path)


# ---------------------------------------------------------------- the manifest: content, not size

def test_a_same_size_rewrite_is_named_and_a_touch_is_not(tmp_path):
    for name, data in [("a.parquet", b"aaaa"), ("b.parquet", b"bbbb")]:
        (tmp_path / name).write_bytes(data)
    files = sorted(tmp_path.glob("*.parquet"))
    manifest = file_manifest(files)
    write_lineage(tmp_path, {"pool_version": manifest_version(manifest), "manifest": manifest})
    os.utime(files[0], ns=(1, 1))  # the same bytes, another time: hashed again, and found the same
    assert verified_version(tmp_path) == files_sha256(files)
    (tmp_path / "b.parquet").write_bytes(b"cccc")
    with pytest.raises(ValueError, match=r"b.parquet was rewritten \(same size, sha256 \w{12}, not \w{12}\)"):
        verified_version(tmp_path)


def test_recording_again_hashes_only_the_files_whose_size_or_time_changed(tmp_path, monkeypatch):
    import datacomp_assets.core.lineage as lineage

    for name in ("a.parquet", "b.parquet"):
        (tmp_path / name).write_bytes(name.encode())
    first = file_manifest(sorted(tmp_path.glob("*.parquet")))
    (tmp_path / "b.parquet").write_bytes(b"changed!!")
    hashed = []
    monkeypatch.setattr(lineage, "file_sha256", lambda path: hashed.append(path.name) or "h")
    again = file_manifest(sorted(tmp_path.glob("*.parquet")), recorded=first)
    assert hashed == ["b.parquet"] and again["a.parquet"] == first["a.parquet"]


# ---------------------------------------------------------------- row 4: NaN image scores

@pytest.mark.parametrize("recorded", [False, True], ids=["no manifest (an older run)", "manifest"])
def test_nan_image_scores_are_refused_naming_the_file_and_scored_again(pool, recorded):
    layout, resources = pool
    assert materialize(resources, "pool_metadata", scale="tiny").success
    assert materialize(resources, "image_scores", scale="tiny", scorer="dfn").success
    scores_dir = layout.image_scores("tiny", "dfn")
    assert materialize(resources, "subset", scale="tiny", strategy="dfn_30pct").success
    before = subset_uids(layout, "dfn_30pct")
    if not recorded:
        (scores_dir / "_manifest.json").unlink()  # image_scores had no manifest before
    bad = scores_dir / "00000001.parquet"
    table = pq.read_table(bad)
    rewrite(bad, table.set_column(1, "dfn_score", pa.array([np.nan] * table.num_rows, pa.float32())))

    refused = materialize(resources, "subset", scale="tiny", strategy="dfn_30pct")
    assert not refused.success
    assert str(scores_dir) in refused.error and "00000001.parquet" in refused.error
    if not recorded:
        assert f"{PER_SHARD} dfn_score values are not finite numbers" in refused.error
    assert "Materialize image_scores (tiny|dfn) again" in refused.error

    # The advice, followed: the file is scored again, not kept.
    assert materialize(resources, "image_scores", scale="tiny", scorer="dfn").success
    assert np.isfinite(pq.read_table(bad)["dfn_score"].to_numpy()).all()
    assert materialize(resources, "subset", scale="tiny", strategy="dfn_30pct").success
    assert np.array_equal(subset_uids(layout, "dfn_30pct"), before)  # no NaN-scored sample kept


def test_an_image_scorer_that_gives_nan_writes_nothing(tmp_path):
    from datacomp_assets.filtering.image_scores import write_shard_scores

    write_downloaded_shards(tmp_path / "shards")
    with pytest.raises(ValueError, match=r"00000000.parquet .*: 12 dfn_score values are not finite numbers"):
        write_shard_scores(tmp_path / "shards", tmp_path / "out", "dfn_score",
                           lambda shard, records, images: (np.full(len(records), np.nan), {}), log=lambda _: None)
    assert not list((tmp_path / "out").glob("*.parquet"))


# ---------------------------------------------------------------- row 5: a same-size rewrite of the metadata

def test_a_same_size_swap_of_two_scores_is_named_and_pool_metadata_computes_the_file_again(pool):
    layout, resources = pool
    assert materialize(resources, "pool_metadata", scale="tiny").success
    version = read_lineage(layout.pool_metadata("tiny"))["pool_version"]
    path = metadata_file(layout)
    table = pq.read_table(path)
    scores = table["clip_l14_similarity_score"].to_numpy().copy()
    best, worst = int(scores.argmax()), int(scores.argmin())
    scores[[best, worst]] = scores[[worst, best]]
    size = path.stat().st_size
    rewrite(path, table.set_column(table.schema.get_field_index("clip_l14_similarity_score"),
                                   "clip_l14_similarity_score", pa.array(scores, pa.float32())))
    assert path.stat().st_size == size  # what the size-only manifest let through
    worst_uid = table["uid"][worst].as_py()

    refused = materialize(resources, "subset", scale="tiny", strategy="clip_score_l14_30pct")
    assert not refused.success and "00000000.parquet was rewritten (same size" in refused.error
    assert "Materialize pool_metadata (tiny) again" in refused.error

    assert materialize(resources, "pool_metadata", scale="tiny").success  # the advice, followed
    assert read_lineage(layout.pool_metadata("tiny"))["pool_version"] == version  # the file computed again
    assert materialize(resources, "subset", scale="tiny", strategy="clip_score_l14_30pct").success
    kept = subset_uids(layout, "clip_score_l14_30pct")
    assert not np.isin(uids_to_array([worst_uid]), kept).any()


# ---------------------------------------------------------------- row 6: a duplicate uid or a NaN score

def duplicate_uid(table):
    uids = table["uid"].to_pylist()
    uids[1] = uids[0]
    return table.set_column(0, "uid", pa.array(uids))


def nan_score(table):
    scores = table["clip_b32_similarity_score"].to_numpy().copy()
    scores[3] = np.nan
    return table.set_column(table.schema.get_field_index("clip_b32_similarity_score"), "clip_b32_similarity_score",
                            pa.array(scores, pa.float32()))


@pytest.mark.parametrize("recorded_by_old_code", [False, True], ids=["refused by size", "recorded by old code"])
@pytest.mark.parametrize("damage, named", [(duplicate_uid, "1 uid appears more than once (uid 0000000000000001"),
                                           (nan_score, "1 clip_b32_similarity_score values are not finite")],
                         ids=["duplicate uid", "NaN score"])
def test_a_bad_metadata_file_is_computed_again_never_recorded(pool, damage, named, recorded_by_old_code):
    layout, resources = pool
    metadata = layout.pool_metadata("tiny")
    assert materialize(resources, "pool_metadata", scale="tiny").success
    version = read_lineage(metadata)["pool_version"]
    rewrite(metadata_file(layout), damage(pq.read_table(metadata_file(layout))))
    if recorded_by_old_code:  # what following the advice did before: the bad file recorded as the pool's version
        manifest = file_manifest(sorted(metadata.glob("*.parquet")))
        write_lineage(metadata, {"pool_version": manifest_version(manifest), "manifest": manifest})

    refused = materialize(resources, "subset", scale="tiny", strategy="no_filter")
    assert not refused.success and "00000000.parquet" in refused.error
    if recorded_by_old_code:
        assert named in refused.error
    assert "Materialize pool_metadata (tiny) again" in refused.error

    assert materialize(resources, "pool_metadata", scale="tiny").success  # the advice, followed
    assert read_lineage(metadata)["pool_version"] == version
    assert materialize(resources, "subset", scale="tiny", strategy="no_filter").success
    kept = subset_uids(layout, "no_filter")
    assert len(kept) == len(np.unique(kept)) == SHARDS * PER_SHARD


def test_a_scorer_that_gives_nan_writes_no_metadata(tmp_path):
    from datacomp_assets.metadata.build import build_pool_metadata

    class Broken(StandInScorer):
        def embed(self, images, texts):
            image, text = super().embed(images, texts)
            return np.full_like(image, np.nan), text

    write_downloaded_shards(tmp_path / "shards")
    with pytest.raises(ValueError, match=r"00000000.parquet \(from .*00000000.tar\): 12 clip_l14_similarity_score "
                                         r"values are not finite numbers.*Not written"):
        build_pool_metadata(tmp_path / "shards", tmp_path / "out", [StandInScorer("b32"), Broken("l14")],
                            log=lambda _: None)
    assert not list((tmp_path / "out").glob("*.parquet"))


# ---------------------------------------------------------------- row 12: a garbage metadata parquet

def test_a_garbage_metadata_file_is_computed_again_with_no_file_deleted_by_hand(pool):
    layout, resources = pool
    assert materialize(resources, "pool_metadata", scale="tiny").success
    path = metadata_file(layout, 1)
    path.write_bytes(os.urandom(path.stat().st_size))

    refused = materialize(resources, "subset", scale="tiny", strategy="no_filter")
    assert not refused.success and "00000001.parquet was rewritten" in refused.error

    result = materialize(resources, "pool_metadata", scale="tiny")  # the advice, followed
    assert result.success, result.error
    assert pq.read_table(path).num_rows == PER_SHARD
    assert materialize(resources, "subset", scale="tiny", strategy="no_filter").success


# ---------------------------------------------------------------- a published pool: the user's files

@pytest.fixture
def published(pool, tmp_path, monkeypatch):
    """The pool as a published one: a mirror of two files in DataComp's layout (the user's), linked."""
    from datacomp_assets.world.published_mirror import write_synthetic_mirror

    layout, resources = pool
    mirror = write_synthetic_mirror(tmp_path / "mirror", rows=200, files=2, progress=None)
    monkeypatch.setitem(SCALES, "tiny", replace(SCALES["tiny"], pool_source="published",
                                                mirror_dir=str(tmp_path / "mirror")))
    assert materialize(resources, "pool_index", scale="tiny").success
    assert materialize(resources, "pool_metadata", scale="tiny").success
    return layout, resources, mirror


@pytest.mark.parametrize("damage, named", [(duplicate_uid, "1 uid appears more than once"),
                                           (nan_score, "clip_b32_similarity_score values are not finite"),
                                           (None, "is not a readable parquet file")],
                         ids=["duplicate uid", "NaN score", "garbage"])
def test_a_bad_published_file_is_refused_naming_it_and_a_restored_one_is_linked(published, damage, named):
    layout, resources, mirror = published
    metadata = layout.pool_metadata("tiny")
    version = read_lineage(metadata)["pool_version"]
    source = mirror[1]
    original = source.read_bytes()
    if damage is None:
        source.write_bytes(b"not a parquet file" * 100)
    else:
        rewrite(source, damage(pq.read_table(source)))
    assert not materialize(resources, "subset", scale="tiny", strategy="no_filter").success

    refused = materialize(resources, "pool_metadata", scale="tiny")  # the advice: it checks the file again
    assert not refused.success
    assert str(source.resolve()) in refused.error and named in refused.error
    assert "Replace it with the published file" in refused.error
    assert read_lineage(metadata)["pool_version"] == version  # not recorded

    source.write_bytes(original)  # the published file, downloaded again
    assert materialize(resources, "pool_metadata", scale="tiny").success
    assert read_lineage(metadata)["pool_version"] == version
    assert materialize(resources, "subset", scale="tiny", strategy="no_filter").success


def test_a_uid_in_two_published_files_is_named_with_both(published):
    layout, resources, mirror = published
    first = pq.read_table(mirror[0])
    second = pq.read_table(mirror[1])
    uids = second["uid"].to_pylist()
    uids[7] = first["uid"][2].as_py()
    rewrite(mirror[1], second.set_column(0, "uid", pa.array(uids)))
    refused = materialize(resources, "pool_metadata", scale="tiny")
    assert not refused.success
    assert (f"uid {first['uid'][2].as_py()} in {mirror[0].name} row 2 and {mirror[1].name} row 7"
            in refused.error)


# ---------------------------------------------------------------- the caption feature store (a published pool's)

@pytest.mark.parametrize("recorded", [True, False], ids=["manifest", "a store from before manifests"])
def test_a_changed_caption_feature_part_is_named_and_computed_again_never_read(tmp_path, recorded):
    from datacomp_assets.core.caption_features import CaptionFeatureStore
    from datacomp_assets.filtering.selection import select_uids
    from tests.test_caption_features import reference_files

    reference_files(tmp_path / "meta")
    logged = []
    store = CaptionFeatureStore(tmp_path / "store", processes=1, log=logged.append)
    kept = select_uids(tmp_path / "meta", "basic", caption_features=store)
    assert len(kept)
    part = sorted(store.group_dir("fasttext").glob("*.parquet"))[0]
    table = pq.read_table(part)
    if recorded:  # another language for every row: a rule reading it would keep none of them
        rewrite(part, table.set_column(1, "language", pa.array(["xx"] * table.num_rows)))
    else:
        (store.group_dir("fasttext") / "_manifest.json").unlink(missing_ok=True)
        rewrite(part, table.set_column(2, "language_score", pa.array([np.nan] * table.num_rows, pa.float32())))

    again = select_uids(tmp_path / "meta", "basic", caption_features=store)
    assert any(str(store.group_dir("fasttext")) in line and part.name in line and "emptying it" in line
               for line in logged)
    assert np.array_equal(again, kept)  # computed again, not read
    assert pq.read_table(part).equals(table)


# ---------------------------------------------------------------- an external source: the recaptioned one

def test_nan_scores_in_the_recaptioned_source_are_refused_and_its_writer_recaptions_the_shard(pool):
    from datacomp_assets.core.scorers import RECAPTIONED_SOURCE
    from datacomp_assets.filtering.recaption import write_recaptioned_source

    layout, resources = pool
    out = layout.external_source("tiny", RECAPTIONED_SOURCE)
    scorer = StandInScorer("l14")

    def recaption():  # recaptioned_source's body, with stand-ins for its captioner and its L/14
        return write_recaptioned_source(
            layout.pool_shards("tiny"), out, lambda uids: np.ones(len(uids), bool),
            lambda shard: lambda images: [f"a generated caption {k}" for k in range(len(images))],
            lambda images, captions: (lambda i, t: (i * t).sum(axis=1))(*scorer.embed(images, captions)),
            log=lambda _: None)

    strategy = "clip_score_l14_30pct_plus_recaptioned"
    assert materialize(resources, "pool_metadata", scale="tiny").success
    recaption()
    assert materialize(resources, "subset", scale="tiny", strategy=strategy).success
    before = subset_uids(layout, strategy)
    bad = out / "00000000.parquet"
    table = pq.read_table(bad)
    column = table.schema.get_field_index("clip_l14_similarity_score")
    rewrite(bad, table.set_column(column, "clip_l14_similarity_score",
                                  pa.array([np.nan] * table.num_rows, pa.float32())))

    refused = materialize(resources, "subset", scale="tiny", strategy=strategy)
    assert not refused.success and str(out) in refused.error and "00000000.parquet" in refused.error
    assert "Materialize recaptioned_source (tiny) again" in refused.error
    assert recaption()["shards_skipped"] == 1  # the advice, followed: the bad shard is recaptioned
    assert pq.read_table(bad).equals(table)
    assert materialize(resources, "subset", scale="tiny", strategy=strategy).success
    assert np.array_equal(subset_uids(layout, strategy), before)
