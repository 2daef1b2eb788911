"""Subset files and baseline strategies, each checked against an independent numpy computation."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_assets.filtering.strategies import STRATEGIES, SWEEPS, expected_fraction, select_uids
from datacomp_assets.filtering.uids import (
    UID_DTYPE,
    array_to_uids,
    load_subset,
    save_subset,
    uid_to_pair,
    uids_to_array,
)

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
    }
    cols["clip_b32_similarity_score"][:5] = [0.25, 0.28, 0.2499, 0.2801, 0.25]  # exact threshold ties
    out = tmp_path_factory.mktemp("pool_metadata")
    for i, rows in enumerate(np.array_split(np.arange(n), 3)):
        pq.write_table(pa.table({k: v[rows] for k, v in cols.items()}), out / f"{i:08d}.parquet")
    return out, cols


def _expected(cols, name):
    """The reference rule, computed with numpy on the in-memory columns (None for random rules)."""
    w, h = cols["original_width"], cols["original_height"]
    if name == "no_filter":
        keep = np.ones(len(w), bool)
    elif name == "basic":
        short, long = np.minimum(w, h), np.maximum(w, h)
        with np.errstate(divide="ignore"):
            keep = ((cols["language"] == "en") & (cols["num_words"] > 2) & (cols["num_chars"] > 5)
                    & (short >= 200) & (long / short <= 3))
    elif "_thr" in name:
        model, thr = name.removeprefix("clip_score_").split("_thr")
        keep = cols[f"clip_{model}_similarity_score"] >= np.float32(thr)
    elif name.startswith("clip_score_"):
        model, pct = name.removeprefix("clip_score_").removesuffix("pct").split("_")
        scores = cols[f"clip_{model}_similarity_score"]
        # The (1 - f) order statistic: the ceil(n * (1 - f))-th smallest score.
        threshold = np.sort(scores)[math.ceil(len(scores) * (1 - int(pct) / 100)) - 1]
        keep = scores >= threshold
    else:
        return None
    return np.array(sorted(uid_to_pair(u) for u in cols["uid"][keep]), dtype=UID_DTYPE)


ALL_RULES = {**STRATEGIES, **SWEEPS}
DETERMINISTIC = [name for name in ALL_RULES if not ALL_RULES[name].random]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_strategy_matches_numpy(pool, name):
    metadata_dir, cols = pool
    got = select_uids(metadata_dir, name)
    expected = _expected(cols, name)
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
    metadata_dir, cols = pool
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
    with pytest.raises(ValueError, match="language.*num_words"):
        select_uids(tmp_path, "basic")
    assert len(select_uids(tmp_path, "no_filter")) == 1


def test_missing_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        select_uids(tmp_path / "absent", "no_filter")
