"""A DataComp user's own pool: the --data_dir that the reference's download_upstream.py leaves, used as it is.

Its layout: `<data_dir>/metadata/<stem>.parquet` (and `<stem>.npz` only with --download_npz) beside
`<data_dir>/shards/`, which img2dataset writes with its own `NNNNNNNN.parquet` per shard. The stand-in here is
written the same way: the metadata in the published schema, the shards by img2dataset itself, from the loopback
synthetic web, with download_upstream.py's arguments. One scale setting (`data_dir`) points at it.
"""

from dataclasses import replace
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core import language
from datacomp_assets.core.layout import Layout
from datacomp_assets.core.published import PublishedSource, fetch_published_metadata, mirror_files
from datacomp_assets.core.scales import SCALES, load_registry
from datacomp_assets.core.strategies import PARTITIONED, STRATEGIES, SWEEPS, parse_strategies
from datacomp_assets.core.uids import load_subset, uids_to_array
from datacomp_assets.filtering.features import read_features
from datacomp_assets.world.index import write_pool_index
from datacomp_assets.world.published_mirror import write_upstream_metadata, write_upstream_shards
from datacomp_assets.world.web_server import free_port
from resources import (
    AcceleratorResource, EngineResource, PoolSourceResource, PublishedMetadataResource, StorageResource,
    SyntheticWebResource)

POOL = 60
SWEEP = "clip_score_b32_thr0.28"
METADATA_ONLY = ["no_filter", "basic", "laion2b", "text_based", SWEEP]
NPZ_RULE = "semdedup_clip_score_l14_30pct"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """Two data dirs of one pool: `full` (download_upstream.py --download_npz) and `parquet_only` (its default),
    each with the shards img2dataset wrote from its metadata folder."""
    root = tmp_path_factory.mktemp("upstream")
    web = SyntheticWebResource(port=free_port())
    index = write_pool_index(web.web_config(), POOL, web.base_url, root / "web_index", processes=1)
    dirs = {}
    for name, npz in (("full", True), ("parquet_only", False)):
        dirs[name] = root / name
        write_upstream_metadata(index["path"], index["ground_truth_path"], dirs[name], files=2, npz=npz)
    with web.serve():
        write_upstream_shards(dirs["full"], shard_size=20, timeout=2)  # the web's injected timeouts: 2 s
    (dirs["parquet_only"] / "shards").symlink_to(dirs["full"] / "shards")
    return dirs


def scale_at(data_dir: Path, tmp_path: Path):
    """`small` as a user's scale file points it at a download_upstream.py data dir (and a tiny k-means)."""
    (tmp_path / "scales.toml").write_text(f'[small]\ndata_dir = "{data_dir}"\n')
    return replace(load_registry([tmp_path / "scales.toml"])["small"], kmeans_clusters=4)


def resources_at(root: Path) -> dict:
    return {"storage": StorageResource(root=str(root)), "accelerator": AcceleratorResource(device="cpu"),
            "engine": EngineResource(),
            "pool_source": PoolSourceResource(synthetic_web=SyntheticWebResource(),
                                              published=PublishedMetadataResource(processes=1))}


def run_subsets(scale, strategies: list[str], root: Path, monkeypatch):
    from datacomp_assets.run import run_scale

    monkeypatch.setitem(SCALES, "small", scale)
    with dg.instance_for_test() as instance:
        run_scale("small", strategies, resources=resources_at(root), instance=instance, subsets_only=True)


def test_one_setting_points_a_scale_at_the_data_dir(upstream, tmp_path):
    scale = scale_at(upstream["full"], tmp_path)
    assert scale.mirror_dir == str(upstream["full"] / "metadata")
    assert scale.shards_dir == str(upstream["full"] / "shards")
    # a folder named in the same table wins over the data dir's
    (tmp_path / "mine.toml").write_text(f'[small]\ndata_dir = "{upstream["full"]}"\nshards_dir = "/elsewhere"\n')
    assert load_registry([tmp_path / "mine.toml"])["small"].shards_dir == "/elsewhere"


def test_the_data_dir_itself_as_a_mirror_reads_its_metadata_not_img2datasets_shard_tables(upstream, tmp_path):
    shard_tables = sorted((upstream["full"] / "shards").glob("*.parquet"))
    assert len(shard_tables) >= 4  # img2dataset's own tables are there, beside its tars
    expected = sorted((upstream["full"] / "metadata").glob("*.parquet"))
    assert mirror_files(upstream["full"]) == expected == mirror_files(upstream["full"] / "metadata")
    fetched = fetch_published_metadata(PublishedSource("small", mirror_dir=str(upstream["full"])), tmp_path / "f")
    assert [p.name for p in fetched] == [p.name for p in expected]
    # a data dir whose metadata lives elsewhere (--metadata_dir): its shards are still not metadata
    assert mirror_files(upstream["full"] / "shards") == []


def test_parquet_only_runs_the_metadata_rules_and_the_reshard_reads_the_shards_in_place(upstream, tmp_path,
                                                                                      monkeypatch):
    from datacomp_assets.training.reshard import reshard

    scale = scale_at(upstream["parquet_only"], tmp_path)
    run_subsets(scale, METADATA_ONLY, tmp_path / "data", monkeypatch)
    layout = Layout(tmp_path / "data")
    pool = pq.read_table(sorted((upstream["parquet_only"] / "metadata").glob("*.parquet")))
    for strategy in METADATA_ONLY:
        assert layout.subset_file("small", strategy).exists(), strategy
    # the sweep named on the command line: the published B/32 scores, thresholded literally
    kept = np.sort(load_subset(layout.subset_file("small", SWEEP)))
    passing = pool.filter(pc.greater_equal(pool["clip_b32_similarity_score"], 0.28))["uid"].to_pylist()
    assert np.array_equal(kept, np.sort(uids_to_array(passing))) and len(kept) > 0
    # pool_features computed only text_based's column: no npz was needed
    features = read_features(layout.pool_features("small"))
    assert features.column_names == ["uid", "text_concept"]
    # the metadata is the user's files, linked; the shards are read where img2dataset wrote them
    assert all(p.is_symlink() for p in layout.pool_metadata("small").glob("*.parquet"))
    assert layout.pool_shards("small") == upstream["parquet_only"] / "shards"
    subset = load_subset(layout.subset_file("small", "no_filter"))
    summary = reshard(layout.pool_shards("small"), subset, tmp_path / "train", shard_size=16, min_shards=1)
    downloaded = sum(1 for p in (upstream["full"] / "shards").glob("*.parquet")
                     for status in pq.read_table(p, columns=["status"])["status"].to_pylist() if status == "success")
    assert 0 < downloaded < POOL and summary.samples_written == downloaded
    assert summary.missing_uids == POOL - downloaded


def test_a_rule_that_needs_the_npz_fails_at_once_naming_it_and_download_npz(upstream, tmp_path, monkeypatch):
    scale = scale_at(upstream["parquet_only"], tmp_path)
    with pytest.raises(FileNotFoundError) as failed:
        run_subsets(scale, ["no_filter", "image_based", NPZ_RULE], tmp_path / "data", monkeypatch)
    message = str(failed.value)
    assert "image_based (reads in_target_cluster)" in message
    assert f"{NPZ_RULE} (reads semdedup_max_similarity)" in message and "no_filter (" not in message
    # the advice names the user's own data dir, so it works as written
    assert f"download_upstream.py --scale small --data_dir {upstream['parquet_only']} --download_npz" in message
    assert "2 of the 2 metadata files have no .npz" in message
    assert not (tmp_path / "data" / "small").exists()  # nothing was started


def test_pool_features_refuses_a_rule_needing_the_npz_before_any_caption_feature(upstream, tmp_path,
                                                                                 monkeypatch):
    from datacomp_assets.filtering.assets import pool_features
    from datacomp_assets.metadata.assets import pool_metadata
    from datacomp_assets.pool.assets import pool_index

    monkeypatch.setitem(SCALES, "small", scale_at(upstream["parquet_only"], tmp_path))
    resources = resources_at(tmp_path / "data")
    assert dg.materialize([pool_index, pool_metadata], partition_key="small", resources=resources).success
    result = dg.materialize([pool_features], partition_key="small", resources=resources, raise_on_error=False,
                            run_config={"ops": {"pool_features": {"config": {"strategies": ["image_based"]}}}})
    assert not result.success
    message = str(result.get_step_failure_events()[0].step_failure_data.error)
    assert "pool_features (small): image_based (reads in_target_cluster)" in message
    assert f"--data_dir {upstream['parquet_only']} --download_npz" in message
    assert not Layout(tmp_path / "data").caption_features("small").exists()  # fastText never ran
    # asked for nothing in particular (the UI), it computes what the parquet allows and says what it left out
    assert dg.materialize([pool_features], partition_key="small", resources=resources).success
    features = read_features(Layout(tmp_path / "data").pool_features("small"))
    assert features.column_names == ["uid", "text_concept", "caption_repeats"]


def test_with_the_npz_the_embedding_rule_runs_and_reads_only_its_columns(upstream, tmp_path, monkeypatch):
    scale = scale_at(upstream["full"], tmp_path)
    run_subsets(scale, [NPZ_RULE], tmp_path / "data", monkeypatch)
    layout = Layout(tmp_path / "data")
    assert 0 < len(load_subset(layout.subset_file("small", NPZ_RULE))) < POOL
    features = read_features(layout.pool_features("small"))
    assert features.column_names == ["uid", "semdedup_max_similarity"]


def test_the_sweeps_are_partitions_that_can_be_named_but_all_means_the_registry():
    from datacomp_assets.run import chosen_strategies
    from partitions import strategy_partitions

    assert chosen_strategies([SWEEP, "basic"]) == [SWEEP, "basic"]
    assert set(SWEEPS) <= set(PARTITIONED) == set(strategy_partitions.get_partition_keys())
    assert chosen_strategies(["all"]) == list(STRATEGIES) and SWEEP not in STRATEGIES


@pytest.mark.parametrize("name", ["..", "a..b", ".hidden", "trailing.", "a/b", "../x", "A.b"])
def test_a_strategy_name_never_reaches_outside_its_folder(name):
    with pytest.raises(ValueError, match="single dots between them"):
        parse_strategies({name: {"where": "true"}}, "mine.toml")


def test_a_dotted_strategy_name_is_taken_quoted_and_explained_unquoted():
    import tomllib

    quoted = tomllib.loads('["my_thr0.33"]\nwhere = "clip_b32_similarity_score >= {b32>=0.33}"\n')
    assert "my_thr0.33" in parse_strategies(quoted, "mine.toml")
    unquoted = tomllib.loads('[my_thr0.33]\nwhere = "true"\n')  # TOML: table "my_thr0" holding table "33"
    with pytest.raises(ValueError, match=r'must be quoted in TOML, as \["my_thr0.33"\]'):
        parse_strategies(unquoted, "mine.toml")


def test_cld3_sees_each_caption_with_its_newlines_made_spaces_as_the_reference_gives_it(monkeypatch):
    import pyarrow as pa

    seen = []

    class Recorder:
        def FindLanguage(self, text):  # noqa: N802 (gcld3's name)
            seen.append(text)
            return type("Result", (), {"language": "en"})()

    monkeypatch.setattr(language, "_cld3_identifier", lambda: Recorder())
    language.identify_languages_cld3(["a\nb", None, "c\n\nd"])
    language.identify_languages_cld3(pa.array(["e\nf", None]))
    assert seen == ["a b", "", "c  d", "e f", ""]
