"""The paper-scale pool sources (published metadata, mirrors) and bring-your-own-data url lists, offline."""

import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.published import (
    MIRROR_ENV,
    MIRROR_SETTING,
    PublishedSource,
    build_mirror_from_pool,
    fetch_published_metadata,
    write_download_index,
)
from datacomp_assets.core.schema import NPZ_KEYS, POOL_METADATA_SCHEMA, write_metadata_shard
from datacomp_assets.pool.download import REFERENCE_SETTINGS
from datacomp_assets.pool.external import ExternalSource, prepare_external_index, url_uid
from datacomp_assets.world.curated import noisy_source_config
from datacomp_assets.world.web import WebConfig, sample


def _shard(first: int, rows: int) -> pa.Table:
    uids = [f"{i:032x}" for i in range(first, first + rows)]
    return pa.table({
        "uid": uids,
        "url": [f"http://example.com/{i}.jpg" for i in range(first, first + rows)],
        "text": [f"caption {i}" for i in range(first, first + rows)],
        "original_width": [256] * rows,
        "original_height": [240] * rows,
        "clip_b32_similarity_score": pa.array([0.3] * rows, pa.float32()),
        "clip_l14_similarity_score": pa.array([0.25] * rows, pa.float32()),
        "face_bboxes": [[[0.1, 0.1, 0.2, 0.2]] if i % 2 else [] for i in range(rows)],
        "sha256": [f"{i:064x}" for i in range(first, first + rows)],
        "language": ["en"] * rows,  # a feature column: the mirror must leave it out
    }).cast(pa.schema(list(POOL_METADATA_SCHEMA) + [("language", pa.string())]))


@pytest.fixture
def pool_metadata_dir(tmp_path):
    """Two shards in pool_metadata's layout: <stem>.parquet + <stem>.npz with the four embedding arrays."""
    out = tmp_path / "pool_metadata"
    out.mkdir()
    rng = np.random.default_rng(0)
    for k, (first, rows) in enumerate([(0, 3), (3, 4)]):
        embeddings = {key: rng.standard_normal((rows, 512 if key.startswith("b32") else 768)) for key in NPZ_KEYS}
        write_metadata_shard(_shard(first, rows), embeddings, out / f"{k:08d}")
    return out


@pytest.fixture
def mirror(pool_metadata_dir, tmp_path):
    mirror_dir = tmp_path / "mirror"
    build_mirror_from_pool(pool_metadata_dir, mirror_dir)
    return mirror_dir


def test_mirror_has_the_published_layout(mirror):
    parquets = sorted((mirror / "metadata").glob("*.parquet"))
    assert [p.name for p in parquets] == ["00000000.parquet", "00000001.parquet"]
    assert pq.read_schema(parquets[0]).names == POOL_METADATA_SCHEMA.names  # reference columns only
    assert all(p.with_suffix(".npz").exists() for p in parquets)


def test_fetch_from_mirror_needs_no_network(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = PublishedSource("small", mirror_dir=str(mirror), include_npz=True)
    assert source.repo_id == "mlfoundations/datacomp_small"
    files = fetch_published_metadata(source, tmp_path / "fetched")
    assert [f.name for f in files] == ["00000000.parquet", "00000001.parquet"]
    assert sum(pq.read_metadata(f).num_rows for f in files) == 7
    assert all(f.with_suffix(".npz").exists() for f in files)
    # Fetching again (a resumed run) reuses what is there.
    assert fetch_published_metadata(source, tmp_path / "fetched") == files


def test_no_mirror_and_offline_fails_at_once_naming_both_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        fetch_published_metadata(PublishedSource("small"), tmp_path / "fetched")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert MIRROR_SETTING in message and MIRROR_ENV in message
    assert "huggingface" in message
    assert "huggingface-cli download mlfoundations/datacomp_small --repo-type dataset" in message


def test_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    def must_not_download(*args, **kwargs):
        raise AssertionError("snapshot_download must not run when the Hub is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", must_not_download)
    with pytest.raises(RuntimeError, match=f"unreachable.*{MIRROR_SETTING}.*{MIRROR_ENV}"):
        fetch_published_metadata(PublishedSource("medium"), tmp_path / "fetched")


def test_mirror_missing_a_column_is_named(mirror, tmp_path):
    broken = mirror / "metadata" / "00000001.parquet"
    pq.write_table(pq.read_table(broken).drop(["sha256"]), broken)
    with pytest.raises(ValueError, match=r"00000001\.parquet.*sha256"):
        fetch_published_metadata(PublishedSource("small", mirror_dir=str(mirror)), tmp_path / "fetched")


def test_mirror_missing_npz_when_asked(mirror, tmp_path):
    (mirror / "metadata" / "00000000.npz").unlink()
    with pytest.raises(ValueError, match=r"00000000\.npz"):
        fetch_published_metadata(PublishedSource("small", mirror_dir=str(mirror), include_npz=True),
                                 tmp_path / "fetched")


def _rewrite_npz(path, keys):
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in keys}
    np.savez(path, **arrays)


def test_an_npz_trimmed_to_l14_img_is_linked_and_one_without_it_is_named(mirror, tmp_path):
    _rewrite_npz(mirror / "metadata" / "00000000.npz", ["l14_img"])  # a user who kept only L/14's images
    source = PublishedSource("small", mirror_dir=str(mirror), include_npz=True)
    files = fetch_published_metadata(source, tmp_path / "fetched")
    with np.load(files[0].with_suffix(".npz")) as npz:
        assert npz.files == ["l14_img"]
    _rewrite_npz(mirror / "metadata" / "00000001.npz", ["b32_img", "b32_txt", "l14_txt"])
    with pytest.raises(ValueError, match=r"00000001\.npz: missing embedding arrays l14_img"):
        fetch_published_metadata(source, tmp_path / "fetched_again")


def test_download_index_has_what_img2dataset_needs(mirror, tmp_path):
    files = fetch_published_metadata(PublishedSource("small", mirror_dir=str(mirror)), tmp_path / "fetched")
    summary = write_download_index(files, tmp_path / "index.parquet")
    index = pq.read_table(summary["path"])
    assert summary["rows"] == index.num_rows == 7
    settings = REFERENCE_SETTINGS
    needed = {settings["url_col"], settings["caption_col"], "face_bboxes", "sha256",
              *settings["save_additional_columns"]}
    assert needed <= set(index.column_names)
    assert index.column("uid").to_pylist() == [f"{i:032x}" for i in range(7)]
    assert index.column("face_bboxes").to_pylist()[1] == [[0.1, 0.1, 0.2, 0.2]]


def _write_url_list(path, header, rows, delimiter):
    path.write_text("\n".join(delimiter.join(r) for r in [header, *rows]) + "\n")


def test_external_index_uids_are_stable_and_unique(tmp_path):
    rows = [("http://a.org/1.jpg", "a red circle"), ("http://a.org/2.jpg", "1234"),
            ("http://a.org/1.jpg", "the same image again"), ("", "no url")]
    _write_url_list(tmp_path / "list.tsv", ("url", "caption"), rows, "\t")
    summary = prepare_external_index(ExternalSource("mine", str(tmp_path / "list.tsv")), tmp_path / "a.parquet")
    index = pq.read_table(summary["path"])
    assert index.column_names == ["uid", "url", "text"]
    assert index.column("url").to_pylist() == ["http://a.org/1.jpg", "http://a.org/2.jpg"]
    assert index.column("text").to_pylist() == ["a red circle", "1234"]  # digits stay text
    assert (summary["dropped_duplicate_url"], summary["dropped_empty_url"]) == (1, 1)
    uids = index.column("uid").to_pylist()
    assert all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uids)
    assert uids[0] == url_uid("http://a.org/1.jpg")

    # The same urls in another format and with other column names give the same uids.
    pq.write_table(pa.table({"URL": ["http://a.org/2.jpg"], "TEXT": ["x"]}), tmp_path / "list.parquet")
    source = ExternalSource("mine2", str(tmp_path / "list.parquet"), url_col="URL", caption_col="TEXT")
    assert pq.read_table(prepare_external_index(source, tmp_path / "b.parquet")["path"]).column("uid")[0].as_py() \
        == uids[1]


def test_external_index_names_missing_columns(tmp_path):
    _write_url_list(tmp_path / "list.csv", ("link", "alt"), [("http://a.org/1.jpg", "x")], ",")
    with pytest.raises(ValueError, match=r"list\.csv.*url, caption"):
        prepare_external_index(ExternalSource("mine", str(tmp_path / "list.csv")), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="input format"):
        prepare_external_index(ExternalSource("mine", str(tmp_path / "list.json")), tmp_path / "a.parquet")


def test_noisy_source_is_the_same_world_with_more_mismatches():
    web = WebConfig()
    noisy = noisy_source_config(web)
    assert noisy.noise["mismatched"] == pytest.approx(0.5) and web.noise["mismatched"] < 0.5
    # A mixture: every other kind, clean included, keeps its proportion to the others (the pool's shares
    # with the mismatched ones left out add up to more than half, so they cannot all stay as they are).
    keep = (1 - 0.5) / (1 - web.noise["mismatched"])
    assert set(noisy.noise) == set(web.noise) and sum(noisy.noise.values()) <= 1
    assert all(noisy.noise[k] == pytest.approx(v * keep) for k, v in web.noise.items() if k != "mismatched")
    kinds = [sample(i, noisy, namespace="noisy").kind for i in range(2000)]
    assert 0.45 < kinds.count("mismatched") / len(kinds) < 0.55
    assert 0.12 < kinds.count("clean") / len(kinds) < 0.24  # 30% of the pool, times keep (~0.59)


def _materialize_small_pool_index(tmp_path, mirror_dir: str):
    import dagster as dg

    from datacomp_assets.pool.assets import pool_index
    from resources import PoolSourceResource, PublishedMetadataResource, StorageResource, SyntheticWebResource

    return dg.materialize([pool_index], partition_key="small", raise_on_error=False, resources={
        "storage": StorageResource(root=str(tmp_path / "data")),
        "pool_source": PoolSourceResource(synthetic_web=SyntheticWebResource(),
                                          published=PublishedMetadataResource(published_mirror_dir=mirror_dir))})


def test_pool_index_for_small_materializes_from_a_local_mirror(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # proves no network is needed
    result = _materialize_small_pool_index(tmp_path, str(mirror))
    assert result.success
    index = pq.read_table(tmp_path / "data" / "small" / "pool_index" / "index.parquet")
    assert index.num_rows == 7 and {"uid", "url", "text", "face_bboxes", "sha256"} <= set(index.column_names)


def test_pool_index_for_small_without_mirror_offline_fails_at_once_naming_both_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    result = _materialize_small_pool_index(tmp_path, "")
    assert not result.success and time.perf_counter() - start < 30
    message = str(result.get_step_failure_events()[0].step_failure_data.error)
    assert MIRROR_SETTING in message and MIRROR_ENV in message and "huggingface.co" in message
