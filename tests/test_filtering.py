"""Subset files and baseline strategies, each checked against an independent numpy computation."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.strategies import BUILDING_BLOCKS, STRATEGIES, SWEEPS, expected_fraction
from datacomp_assets.core.uids import (
    arrow_uids_to_array,
    sort_uids,
    UID_DTYPE,
    array_to_uids,
    load_subset,
    save_subset,
    uid_to_pair,
    uids_to_array,
)
from datacomp_assets.filtering.selection import select_uids

N_ROWS = 2000


def _random_uids(rng, n):
    return [bytes(rng.integers(0, 256, 16, dtype=np.uint8)).hex() for _ in range(n)]


# ---------------------------------------------------------------- uids


def test_uid_pair_round_trip():
    uid = "0123456789abcdef00000000000000ff"
    assert uid_to_pair(uid) == (0x0123456789ABCDEF, 0xFF)
    arr = uids_to_array([uid])
    assert arr.dtype == UID_DTYPE and tuple(arr[0]) == uid_to_pair(uid)
    assert array_to_uids(arr) == [uid]


def test_uids_to_array_matches_python_and_is_sorted():
    uids = _random_uids(np.random.default_rng(0), 1000) + ["f" * 32, "0" * 32, "0" * 32]
    arr = uids_to_array(uids)
    expected = np.array(sorted(uid_to_pair(u) for u in uids), dtype=UID_DTYPE)
    np.testing.assert_array_equal(arr, expected)
    np.testing.assert_array_equal(arr, np.sort(arr))
    assert array_to_uids(arr) == sorted(uids)  # zero-padded lowercase hex sorts like the pairs
    assert uids_to_array([u.upper() for u in uids]).tolist() == arr.tolist()
    assert len(uids_to_array([])) == 0


@pytest.mark.parametrize("bad", ["xyz", "g" * 32, "0" * 33, "0" * 31])
def test_uids_to_array_rejects_malformed(bad):
    with pytest.raises(ValueError):
        uids_to_array(["0" * 32, bad])


def test_save_and_load_subset(tmp_path):
    arr = uids_to_array(_random_uids(np.random.default_rng(1), 100))
    save_subset(arr, tmp_path / "subset.npy")
    assert [p.name for p in tmp_path.iterdir()] == ["subset.npy"]
    np.testing.assert_array_equal(load_subset(tmp_path / "subset.npy"), arr)


def test_load_subset_rejects_wrong_dtype_and_unsorted(tmp_path):
    np.save(tmp_path / "wrong.npy", np.arange(4, dtype=np.uint64))
    with pytest.raises(ValueError, match="wrong.npy"):
        load_subset(tmp_path / "wrong.npy")
    np.save(tmp_path / "unsorted.npy", np.array([(2, 0), (1, 5)], dtype=UID_DTYPE))
    with pytest.raises(ValueError, match="unsorted.npy.*not sorted"):
        load_subset(tmp_path / "unsorted.npy")
    with pytest.raises(ValueError):
        save_subset(np.array([(2, 0), (1, 5)], dtype=UID_DTYPE), tmp_path / "never.npy")


# ---------------------------------------------------------------- strategies


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A synthetic metadata dir (3 parquet files) and the same columns as numpy arrays."""
    rng = np.random.default_rng(42)
    n = N_ROWS
    words = ["a", "photo", "of", "the", "cat", "sunset", "red"]
    texts = [" ".join(rng.choice(words, rng.integers(0, 6))) for _ in range(n)]
    cols = {
        "uid": np.array(_random_uids(rng, n)),
        "text": np.array(texts),
        "original_width": rng.choice([0, 50, 199, 200, 256, 600, 601, 1200], n).astype(np.int64),
        "original_height": rng.choice([100, 199, 200, 300, 400, 800], n).astype(np.int64),
        "clip_b32_similarity_score": rng.normal(0.25, 0.05, n).astype(np.float32),
        "clip_l14_similarity_score": rng.normal(0.2, 0.06, n).astype(np.float32),
        "language": rng.choice(["en", "en", "fr", "de"], n),
        "num_words": np.array([len(t.split()) for t in texts], np.int32),
        "num_chars": np.array([len(t) for t in texts], np.int32),
        "face_bboxes": np.array([[[0.0, 0.0, float(rng.uniform(0.3, 0.8)), float(rng.uniform(0.3, 0.8))]]
                                 if rng.random() < 0.2 else [] for _ in range(n)], dtype=object),
    }
    cols["clip_b32_similarity_score"][:5] = [0.25, 0.28, 0.2499, 0.2801, 0.25]  # exact threshold ties
    # Per-sample features live in their own parquet files (as pool_features writes them), in another order.
    features = {
        "uid": cols["uid"],
        "cld3_language": rng.choice(["en", "en", "fr", "und"], n),
        "num_tokens": cols["num_words"],
        "text_concept": np.where(rng.random(n) < 0.4, "cat", None),
        "in_target_cluster": rng.random(n) < 0.5,
        "metaclip_keep_probability": rng.choice([0.0, 0.2, 1.0], n).astype(np.float32),
        "metaclip_draw": rng.random(n).astype(np.float32),
        "dfn_score": rng.normal(0.3, 0.1, n).astype(np.float32),
        "semdedup_max_similarity": rng.uniform(0.98, 1.0, n).astype(np.float32),
        "vas_score": rng.normal(0.01, 0.002, n).astype(np.float32),
        "caption_repeats": rng.choice([1, 2, 100, 101, 500], n).astype(np.int64),
        "flipped_score": rng.normal(0.2, 0.06, n).astype(np.float32),
        "tmars_score": rng.normal(0.2, 0.06, n).astype(np.float32),
        "negclip_loss": rng.normal(-0.05, 0.03, n).astype(np.float32),
        "normsim": rng.normal(0.5, 0.1, n).astype(np.float32),
        "density_pruning_keep": rng.random(n) < 0.3,
        "hype_score": rng.normal(0.0, 1.0, n).astype(np.float32),
        # SIEVE's score exists only for the images that downloaded: NaN here, null in the parquet
        "sieve_score": np.where(rng.random(n) < 0.1, np.nan, rng.uniform(0.1, 0.9, n)).astype(np.float32),
    }
    features["semdedup_max_similarity"][:200] = rng.uniform(0.9, 0.98, 200)
    out = tmp_path_factory.mktemp("pool_metadata")
    for i, rows in enumerate(np.array_split(np.arange(n), 3)):
        pq.write_table(pa.table({k: pa.array(list(v[rows]), pa.list_(pa.list_(pa.float64()))) if k == "face_bboxes"
                                 else v[rows] for k, v in cols.items()}), out / f"{i:08d}.parquet")
    feature_dir = tmp_path_factory.mktemp("pool_features")
    for i, rows in enumerate(np.array_split(rng.permutation(n), 2)):
        pq.write_table(pa.table({k: pa.array(v[rows], from_pandas=k == "sieve_score") for k, v in features.items()}),
                       feature_dir / f"{i:08d}.parquet")
    return out, feature_dir, {**cols, **features}


def _top(scores, candidates, n_keep):
    """The reference's top-fraction rule: scores at or above the ceil(m - n_keep)-th smallest candidate score."""
    m = candidates.sum()
    if n_keep >= m:
        return candidates
    threshold = np.sort(scores[candidates])[math.ceil(m * (1 - round(n_keep / m, 6))) - 1]
    return candidates & (scores >= threshold)


def _keep_mask(cols, name):
    """The rule, computed with numpy on the in-memory columns (None for random rules)."""
    w, h = cols["original_width"], cols["original_height"]
    n = len(w)
    english, b32, l14 = cols["language"] == "en", cols["clip_b32_similarity_score"], cols["clip_l14_similarity_score"]
    everything = np.ones(n, bool)
    if name == "no_filter":
        return everything
    if name == "basic":
        short, long = np.minimum(w, h), np.maximum(w, h)
        with np.errstate(divide="ignore"):
            return english & (cols["num_words"] > 2) & (cols["num_chars"] > 5) & (short >= 200) & (long / short <= 3)
    if "_thr" in name:  # not OpenAI scores: the threshold keeps the share of the pool it keeps on CommonPool
        model, thr = name.removeprefix("clip_score_").split("_thr")
        share = {"0.25": 0.30, "0.28": 0.20, "0.3": 0.10}[thr]
        return _top(cols[f"clip_{model}_similarity_score"], everything, share * n)
    if name.startswith("clip_score_"):
        model, pct = name.removeprefix("clip_score_").removesuffix("pct").split("_")
        return _top(cols[f"clip_{model}_similarity_score"], everything, int(pct) / 100 * n)
    if name == "laion2b":
        return (cols["cld3_language"] == "en") & _top(b32, everything, 0.20 * n)
    if name == "text_based":
        return english & (cols["text_concept"] != None)  # noqa: E711 (elementwise on an object array)
    if name == "image_based":
        return english & (cols["num_tokens"] > 1) & (cols["num_chars"] > 5) & cols["in_target_cluster"]
    if name == "image_based_clip_score_l14_30pct":
        return _keep_mask(cols, "image_based") & _keep_mask(cols, "clip_score_l14_30pct")
    if name == "metaclip":
        return cols["metaclip_draw"] < cols["metaclip_keep_probability"]
    if name == "dfn_30pct":
        return _top(cols["dfn_score"], everything, 0.3 * n)
    if name == "semdedup_clip_score_l14_30pct":
        return _top(l14, cols["semdedup_max_similarity"] <= np.float32(0.995), 0.3 * n)
    if name == "vas_clip_score_b32_45pct":
        return _top(cols["vas_score"], _keep_mask(cols, "clip_score_b32_45pct"), 0.3 * n)
    if name == "devil_single_modality":
        short, long = np.minimum(w, h), np.maximum(w, h)
        face_area = np.array([sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes) for boxes in cols["face_bboxes"]])
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect_ok = long / short <= 3.33
        return (english & (cols["num_words"] > 2) & (cols["num_chars"] > 5) & (cols["caption_repeats"] <= 100)
                & aspect_ok & (face_area <= 0.3) & (cols["semdedup_max_similarity"] <= np.float32(0.995)))
    if name == "devil_cross_modality":
        return _top(np.minimum(l14, cols["flipped_score"]), _keep_mask(cols, "devil_single_modality"), 0.3 * n)
    if name == "negclip_loss_30pct":
        return _top(cols["negclip_loss"], everything, 0.3 * n)
    if name == "negclip_loss_normsim_20pct":
        return _top(cols["normsim"], _keep_mask(cols, "negclip_loss_30pct"), 0.2 * n)
    if name == "tmars_50pct":
        return _top(cols["tmars_score"], everything, 0.5 * n)
    if name == "density_pruning":
        return cols["density_pruning_keep"]
    if name == "hype_30pct":
        return _top(cols["hype_score"] + l14, cols["in_target_cluster"], 0.3 * n)
    if name == "hype_dfn":
        return _keep_mask(cols, "hype_30pct") | _keep_mask(cols, "dfn_30pct")
    if name == "devil_target_aligned":
        return _keep_mask(cols, "devil_cross_modality") & cols["in_target_cluster"]
    if name.startswith("sieve_"):  # a share of the images SIEVE scored
        sieve = cols["sieve_score"].astype(np.float64)
        scored = ~np.isnan(sieve)

        def min_max(x):
            return (x - x[scored].min()) / (x[scored].max() - x[scored].min())
        if name == "sieve_20pct":
            return _top(sieve, scored, 0.2 * scored.sum())
        if name == "sieve_clip_score_l14_20pct":
            fused = 0.5 * min_max(sieve) + 0.5 * min_max(l14.astype(np.float64))
            return _top(fused, scored, 0.2 * scored.sum())
    return None


@pytest.fixture(scope="module")
def recaptioned(pool, tmp_path_factory):
    """A recaptioned source of the pool's images (all but the 5% that did not download, and one failed row), each with
    a score of its generated caption: the source's parquet as `recaptioned_source` writes it."""
    from datacomp_assets.filtering.recaption import recaptioned_uid

    _, _, cols = pool
    rng = np.random.default_rng(7)
    pool_uids = cols["uid"][rng.random(N_ROWS) < 0.95]
    table = {"uid": [recaptioned_uid(u) for u in pool_uids] + ["e" * 32],
             "status": ["success"] * len(pool_uids) + ["failed_to_download"],
             "pool_uid": [*pool_uids, cols["uid"][0]],
             "clip_l14_similarity_score": rng.normal(0.2, 0.06, len(pool_uids) + 1).astype(np.float32)}
    out = tmp_path_factory.mktemp("recaptioned")
    for i, rows in enumerate(np.array_split(np.arange(len(pool_uids) + 1), 2)):
        pq.write_table(pa.table({k: np.asarray(v)[rows] for k, v in table.items()}), out / f"{i:08d}.parquet")
    return out, {k: np.asarray(v[:-1]) for k, v in table.items()}


def _expected_from_source(cols, source, name):
    """Rules over the recaptioned source: the generated captions of the images clip_score_l14_30pct leaves out, the
    75% of them whose generated caption scores highest; the mixture adds the 30% with their alt-texts."""
    raw = _keep_mask(cols, "clip_score_l14_30pct")
    rest = ~np.isin(source["pool_uid"], cols["uid"][raw])
    recaptioned = source["uid"][_top(source["clip_l14_similarity_score"], rest, 0.75 * rest.sum())]
    uids = [*recaptioned, *(cols["uid"][raw] if name == "clip_score_l14_30pct_plus_recaptioned" else [])]
    return np.array(sorted(uid_to_pair(u) for u in uids), dtype=UID_DTYPE)


def _expected(cols, name):
    if name == "devil_in_the_details":  # a mixture: each uid as many times as the parts that keep it
        parts = [_keep_mask(cols, "devil_cross_modality"), _keep_mask(cols, "devil_target_aligned")]
        return np.array(sorted(uid_to_pair(u) for keep in parts for u in cols["uid"][keep]), dtype=UID_DTYPE)
    keep = _keep_mask(cols, name)
    if keep is None:
        return None
    return np.array(sorted(uid_to_pair(u) for u in cols["uid"][keep]), dtype=UID_DTYPE)


ALL_RULES = {**STRATEGIES, **BUILDING_BLOCKS, **SWEEPS}
DETERMINISTIC = [name for name in ALL_RULES if not ALL_RULES[name].random]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_strategy_matches_numpy(pool, recaptioned, name):
    metadata_dir, feature_dir, cols = pool
    source_dir, source = recaptioned
    got = select_uids(metadata_dir, name, feature_dirs=[feature_dir], external_dirs={"recaptioned": source_dir})
    expected = (_expected_from_source(cols, source, name) if "recaptioned" in name else _expected(cols, name))
    assert expected is not None, f"test has no reference computation for {name}"
    assert got.dtype == UID_DTYPE
    np.testing.assert_array_equal(got, expected)
    assert 0 < len(got) <= N_ROWS


@pytest.mark.parametrize("name", [n for n in ALL_RULES if n.startswith("clip_score_") and n.endswith("pct")])
def test_clip_score_fraction_keeps_f_times_n(pool, name):
    kept = len(select_uids(pool[0], name))
    assert abs(kept - expected_fraction(name) * N_ROWS) <= 0.01 * N_ROWS


@pytest.mark.parametrize("name", [n for n in ALL_RULES if ALL_RULES[n].random])
def test_random_strategy_size_subset_and_determinism(pool, name):
    metadata_dir, _, cols = pool
    got = select_uids(metadata_dir, name, seed=0)
    assert len(got) == round(N_ROWS * expected_fraction(name))
    np.testing.assert_array_equal(got, np.sort(got))
    assert np.isin(got, uids_to_array(cols["uid"])).all()
    assert len(np.unique(got)) == len(got)
    np.testing.assert_array_equal(got, select_uids(metadata_dir, name, seed=0))
    assert not np.array_equal(got, select_uids(metadata_dir, name, seed=1))


def test_nan_scores_are_never_kept(tmp_path):
    table = pa.table({"uid": [f"{i:032x}" for i in range(4)],
                      "clip_l14_similarity_score": pa.array([np.nan, 0.5, 0.1, np.nan], pa.float32())})
    pq.write_table(table, tmp_path / "0.parquet")
    assert array_to_uids(select_uids(tmp_path, "clip_score_l14_40pct")) == [f"{1:032x}"]


def test_expected_fraction():
    assert expected_fraction("clip_score_l14_30pct") == pytest.approx(0.3)
    assert expected_fraction("random_1pct") == pytest.approx(0.01)
    assert expected_fraction("no_filter") == 1.0
    assert expected_fraction("basic") is None
    assert expected_fraction("clip_score_b32_thr0.28") is None


def test_unknown_strategy_lists_known(pool):
    with pytest.raises(ValueError, match="known: .*basic"):
        select_uids(pool[0], "laion_magic")
    with pytest.raises(ValueError, match="no_filter"):
        expected_fraction("nope")


def test_missing_columns_are_named(tmp_path):
    pq.write_table(pa.table({"uid": ["0" * 32], "text": ["a b c d"]}), tmp_path / "0.parquet")
    with pytest.raises(ValueError, match="basic.*'language'.*pool_metadata"):
        select_uids(tmp_path, "basic")
    assert len(select_uids(tmp_path, "no_filter")) == 1


def test_missing_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        select_uids(tmp_path / "absent", "no_filter")


def test_reference_thresholds_apply_as_they_are_with_openai_scorers(pool):
    metadata_dir, _, cols = pool
    got = select_uids(metadata_dir, "clip_score_b32_thr0.28", reference_scorers=True)
    keep = cols["clip_b32_similarity_score"] >= np.float32(0.28)
    np.testing.assert_array_equal(got, uids_to_array(cols["uid"][keep]))


# ---------------------------------------------------------------- strategies as data

USER_STRATEGIES = '''
[big_english_cats]
description = "English captions naming a cat, the 50% with the highest DFN score"
where = "language = 'en' AND text_concept = 'cat'"
order_by = "dfn_score"
fraction = 0.5

[cats_or_top_dfn]
union = ["big_english_cats", "dfn_30pct"]

[byod_cats_twice_plus_curated]
mixture = [{from = "big_english_cats", upsample = 2}, {from = "source:curated"}]

[below_top_l14]
outside = "clip_score_l14_30pct"

[curated_outside_top_dfn]
source = "curated"
outside = "dfn_30pct"
'''


def test_strategies_declared_in_a_file_are_computed(pool, tmp_path, monkeypatch):
    from datacomp_assets.core import strategies

    metadata_dir, feature_dir, cols = pool
    (tmp_path / "mine.toml").write_text(USER_STRATEGIES)
    registry = strategies.load_registry([tmp_path / "mine.toml"])
    assert {"no_filter", "big_english_cats", "cats_or_top_dfn"} <= set(registry)
    monkeypatch.setattr(strategies, "STRATEGIES", registry)
    external = tmp_path / "curated"
    external.mkdir()
    curated = [f"{i:032x}" for i in range(5)]
    pq.write_table(pa.table({"uid": curated + ["f" * 32], "status": ["success"] * 5 + ["failed_to_download"]}),
                   external / "00000.parquet")

    def run(name):
        return select_uids(metadata_dir, name, feature_dirs=[feature_dir], external_dirs={"curated": external})

    cats = (cols["language"] == "en") & (cols["text_concept"] == "cat")
    expected_cats = _top(cols["dfn_score"], cats, 0.5 * cats.sum())
    np.testing.assert_array_equal(run("big_english_cats"), uids_to_array(cols["uid"][expected_cats]))
    either = expected_cats | _keep_mask(cols, "dfn_30pct")
    np.testing.assert_array_equal(run("cats_or_top_dfn"), uids_to_array(cols["uid"][either]))
    mixed = run("byod_cats_twice_plus_curated")  # every cat twice, every downloaded curated sample once
    expected = uids_to_array([*cols["uid"][expected_cats], *cols["uid"][expected_cats], *curated])
    np.testing.assert_array_equal(mixed, expected)
    below = ~_keep_mask(cols, "clip_score_l14_30pct")
    np.testing.assert_array_equal(run("below_top_l14"), uids_to_array(cols["uid"][below]))
    with pytest.raises(ValueError, match="'curated' has no `pool_uid` column"):
        run("curated_outside_top_dfn")  # `outside` matches a source's rows to pool images, which these are not


@pytest.mark.parametrize("text, message", [
    ("[Bad-Name]\nwhere = 'true'", "lowercase"),
    ("[x]\nwher = 'true'", "unknown settings \\['wher'\\]"),
    ("[x]\norder_by = 'dfn_score'", "need a `fraction`"),
    ("[x]\nfraction = 1.5\nrandom = true", "fraction must be in"),
    ("[x]\nintersect = ['no_filter', 'nope']", "unknown strategies \\['nope'\\]"),
    ("[x\n", "not valid TOML"),
    ("[x]\nsource = 'mine'\nunion = ['no_filter']", "`source` names an external source"),
    ("[x]\nsource = '../elsewhere'", "`source` names an external source"),
])
def test_bad_strategy_files_are_named(tmp_path, text, message):
    from datacomp_assets.core.strategies import load_registry

    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_registry([tmp_path / "bad.toml"])


def test_a_strategy_file_named_in_the_environment_becomes_a_partition(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "mine.toml").write_text(USER_STRATEGIES)
    code = ("from datacomp_assets.definitions import defs; import dagster as dg; "
            "print(sorted(defs.get_repository_def().asset_graph.get(dg.AssetKey('subset'))"
            ".partitions_def.get_partition_keys()))")
    env = {**os.environ, "DATACOMP_STRATEGIES": str(tmp_path / "mine.toml")}
    keys = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "tiny|big_english_cats" in keys and "small|byod_cats_twice_plus_curated" in keys and "tiny|basic" in keys


def test_arrow_uids_convert_like_hex_strings_and_name_a_bad_uid():
    rng = np.random.default_rng(0)
    uids = [f"{int(a):016x}{int(b):016x}" for a, b in rng.integers(0, 2**63, (100, 2), dtype=np.uint64)]
    arrow = pa.array(uids).slice(3)  # a sliced array reads its own rows
    np.testing.assert_array_equal(np.sort(arrow_uids_to_array(arrow)), uids_to_array(uids[3:]))
    with pytest.raises(ValueError, match="not a 32-char hex uid: zz"):
        arrow_uids_to_array(pa.array([uids[0], "zz" + uids[1][2:]]))
    with pytest.raises(ValueError, match="not a 32-char hex uid: abc"):
        arrow_uids_to_array(pa.array([uids[0], "abc"]))


def test_sort_uids_orders_by_low_half_when_high_halves_tie():
    arr = np.array([(2, 1), (1, 9), (1, 3), (1, 9), (0, 5)], dtype="u8,u8")
    np.testing.assert_array_equal(sort_uids(arr), np.sort(arr))


# ---------------------------------------------------------------- the rule sandbox


@pytest.mark.parametrize("field, text", [
    ("where", "true); COPY (SELECT 42) TO '{out}'; SELECT (1"),
    ("where", "true) -- the rest of the query is a comment"),
    ("where", "true); ATTACH '{out}' AS other; SELECT (1"),
    ("order_by", "dfn_score); COPY (SELECT 42) TO '{out}'; SELECT (1"),
])
def test_a_rule_that_is_more_than_one_expression_is_refused_naming_file_strategy_and_text(tmp_path, field, text):
    from datacomp_assets.core.strategies import load_registry

    out = tmp_path / "outside" / "evil.csv"
    out.parent.mkdir()
    extra = "fraction = 0.5\n" if field == "order_by" else ""
    (tmp_path / "shared.toml").write_text(f"[sneaky]\n{field} = {json.dumps(text.format(out=out))}\n{extra}")
    with pytest.raises(ValueError, match=rf"shared.toml: \[sneaky\] `{field}`") as err:
        load_registry([tmp_path / "shared.toml"])
    assert "COPY" in str(err.value) or "comment" in str(err.value) or "ATTACH" in str(err.value)
    assert not out.exists() and list(out.parent.iterdir()) == []


@pytest.mark.parametrize("rule", [
    "uid IN (SELECT content FROM read_text('/etc/passwd'))",
    "uid IN (SELECT column0 FROM read_csv('/etc/hostname'))",
    "uid IN (SELECT file FROM glob('/etc/*'))",
])
def test_a_rule_cannot_read_outside_the_pools_directories(pool, tmp_path, monkeypatch, rule):
    from datacomp_assets.core import strategies

    metadata_dir, feature_dir, _ = pool
    (tmp_path / "shared.toml").write_text(f"[reader]\nwhere = \"{rule}\"\n")
    monkeypatch.setattr(strategies, "STRATEGIES", strategies.load_registry([tmp_path / "shared.toml"]))
    with pytest.raises(ValueError, match="strategy 'reader' may read only the pool's own files"):
        select_uids(metadata_dir, "reader", feature_dirs=[feature_dir])


def test_a_column_missing_from_one_metadata_file_names_that_file(pool, tmp_path):
    metadata_dir, feature_dir, _ = pool
    copy = tmp_path / "metadata"
    copy.mkdir()
    files = sorted(metadata_dir.glob("*.parquet"))
    for path in files:
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["language"]) if path == files[0] else table, copy / path.name)
    with pytest.raises(ValueError, match=rf"{files[0].name} lacks \['language'\]"):
        select_uids(copy, "basic", feature_dirs=[feature_dir])


def test_editing_a_building_block_marks_the_strategies_built_from_it_stale(monkeypatch):
    """A method's stages are building blocks: not partitions, but part of its version."""
    from dataclasses import replace

    from datacomp_assets.core import strategies

    assert "devil_cross_modality" in BUILDING_BLOCKS and "devil_cross_modality" not in STRATEGIES
    before = {name: strategies.strategy_version(name) for name in ("devil_in_the_details", "basic")}
    block = BUILDING_BLOCKS["devil_cross_modality"]
    monkeypatch.setitem(BUILDING_BLOCKS, "devil_cross_modality", replace(block, fraction=0.2))
    assert strategies.strategy_version("devil_in_the_details") != before["devil_in_the_details"]
    assert strategies.strategy_version("basic") == before["basic"]
