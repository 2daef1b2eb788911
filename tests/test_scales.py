"""Scales as data: the shipped registry, a user's file, and what the graph derives from them."""

import dagster as dg
import pytest

from datacomp_assets.core.inputs import require_input
from datacomp_assets.core.layout import Layout
from datacomp_assets.core.scales import SCALES, load_registry


def write(tmp_path, text: str):
    path = tmp_path / "scales.toml"
    path.write_text(text)
    return path


def test_the_shipped_scales_are_the_papers_recipes_and_tiny():
    assert list(SCALES) == ["tiny", "small", "medium", "large", "xlarge"]
    small, xlarge = SCALES["small"], SCALES["xlarge"]
    assert (small.pool_size, small.model, small.global_batch, small.lr, small.warmup, small.epochs) == (
        12_800_000, "ViT-B-32", 4096, 5e-4, 500, 5)
    assert (xlarge.model, xlarge.global_batch, xlarge.lr, xlarge.warmup, xlarge.beta2, xlarge.precision) == (
        "ViT-L-14", 90_112, 1e-3, 10_000, 0.95, "amp_bf16")
    assert small.pool_source == "published" and small.requires_gpu and SCALES["tiny"].pool_source == "synthetic_web"


def test_a_user_points_small_at_their_files_relative_to_the_scale_file(tmp_path):
    scales = load_registry([write(tmp_path, '[small]\nmirror_dir = "mirror"\nshards_dir = "/data/shards"\n'
                                            'dfn_checkpoint = "inputs/dfn.pt"\n')])
    small = scales["small"]
    assert small.mirror_dir == str(tmp_path / "mirror") and small.shards_dir == "/data/shards"
    assert small.dfn_checkpoint == str(tmp_path / "inputs" / "dfn.pt")
    assert small.global_batch == 4096 and scales["medium"] == SCALES["medium"]


def test_the_papers_recipes_cannot_be_changed_but_a_new_scale_may_inherit_one(tmp_path):
    with pytest.raises(ValueError, match=r"\[small\] may not change \['global_batch', 'lr'\].*inherit = \"small\""):
        load_registry([write(tmp_path, "[small]\nglobal_batch = 256\nlr = 0.1\n")])
    scales = load_registry([write(tmp_path, '[small_1pct]\ninherit = "small"\npool_size = 128_000\n'
                                            "samples_seen = 128_000\n")])
    mine = scales["small_1pct"]
    assert (mine.pool_size, mine.model, mine.global_batch, mine.pool_source) == (128_000, "ViT-B-32", 4096,
                                                                               "published")


@pytest.mark.parametrize("text, message", [
    ("[rehearsal]\ninherit = \"tiny\"\npool_sise = 3\n", r"unknown settings \['pool_sise'\]"),
    ("[rehearsal]\ninherit = \"tiny\"\npool_size = \"big\"\n", "pool_size must be int, not 'big'"),
    ("[rehearsal]\ninherit = \"huge\"\n", "inherits unknown scale 'huge'"),
    ("[rehearsal]\ninherit = \"tiny\"\npool_source = \"ftp\"\n", "pool_source must be"),
    ("[\"../escape\"]\ninherit = \"tiny\"\n", "lowercase letters, digits and _"),
    ("[rehearsal]\npool_size = 3\n", "missing"),  # a new scale without `inherit` must give the whole recipe
    ("[rehearsal\n", "not valid TOML"),
])
def test_a_bad_scale_file_is_refused_naming_the_file_and_the_scale(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as error:
        load_registry([write(tmp_path, text)])
    assert str(tmp_path / "scales.toml") in str(error.value)


def test_a_missing_scale_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="DATACOMP_SCALES"):
        load_registry([tmp_path / "nowhere.toml"])


def test_the_shards_dir_of_a_scale_is_where_the_layout_finds_its_shards(tmp_path, monkeypatch):
    scales = load_registry([write(tmp_path, '[small]\nshards_dir = "shards"\n')])
    monkeypatch.setitem(SCALES, "small", scales["small"])
    assert Layout(tmp_path / "root").pool_shards("small") == tmp_path / "shards"
    assert Layout(tmp_path / "root").pool_shards("tiny") == tmp_path / "root" / "tiny" / "pool_shards"


def test_a_configured_input_that_is_missing_names_the_setting_and_the_public_source(tmp_path):
    small = load_registry([write(tmp_path, '[small]\nmetaclip_entries = "gone.json"\n')])["small"]
    with pytest.raises(FileNotFoundError, match=r"`metaclip_entries` = .*gone.json does not exist.*MetaCLIP"):
        require_input(small, "metaclip_entries")
    (tmp_path / "gone.json").write_text("[]")
    assert require_input(small, "metaclip_entries") == tmp_path / "gone.json"
    # VAS's targets default to ImageNet's embeddings.
    with pytest.raises(FileNotFoundError, match="no `vas_target_embeddings` is configured"):
        require_input(small, "vas_target_embeddings")


def test_published_scales_take_no_input_from_the_miniatures_assets_and_only_dfn_rules_read_image_scores():
    from partitions import on_synthetic_web, reading_image_scores, scale_partitions, scale_scorer_partitions
    from partitions import scale_strategy_partitions

    def upstream(mapping, key, downstream, upstream_def):
        result = mapping.get_upstream_mapped_partitions_result_for_partitions(
            downstream.subset_with_partition_keys([key]), downstream, upstream_def)
        return set(result.partitions_subset.get_partition_keys())

    assert upstream(on_synthetic_web, "tiny", scale_partitions, scale_partitions) == {"tiny"}
    assert upstream(on_synthetic_web, "small", scale_partitions, scale_partitions) == set()

    def key(scale, strategy):
        return dg.MultiPartitionKey({"scale": scale, "strategy": strategy})

    assert upstream(reading_image_scores, key("small", "dfn_30pct"), scale_strategy_partitions,
                    scale_scorer_partitions) == {dg.MultiPartitionKey({"scale": "small", "scorer": "dfn"})}
    assert upstream(reading_image_scores, key("small", "basic"), scale_strategy_partitions,
                    scale_scorer_partitions) == set()
