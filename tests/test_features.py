"""Per-sample features behind the filters beyond the metadata (pool_features)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_assets.filtering.features import (
    FeatureSettings, compute_pool_features, entries_from_captions, text_concepts, vocabulary_from_classnames)


def test_text_concepts_find_the_first_class_word_and_plurals():
    vocabulary = vocabulary_from_classnames(["circle", "cross", "letter T"])  # multi-word names are skipped
    assert text_concepts(["Two red Circles.", "a cross and a circle", "crossing", "", None], vocabulary) == [
        "circle", "cross", None, None, None]


def test_entries_from_captions_keep_frequent_unigrams_bigrams_and_extras():
    entries = entries_from_captions(["a red star.", "a red star", "a blue ring"], min_count=2, extra=["heart"])
    assert {"a", "red", "star", "red star", "a red", "heart", "0", "99"} <= set(entries)
    assert "blue" not in entries and "." not in entries


ANIMALS = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"]


def _pool(tmp_path, rng, n_per_shard=60, shards=2):
    directions = np.eye(8, dtype=np.float32)
    for s in range(shards):
        labels = rng.integers(0, 8, n_per_shard)
        emb = directions[labels] + rng.normal(0, 0.05, (n_per_shard, 8)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        emb[1] = emb[0]  # an exact duplicate in every shard
        table = pa.table({"uid": [f"{s:016x}{i:016x}" for i in range(n_per_shard)],
                          "text": [f"a photo of {ANIMALS[label]}" for label in labels]})
        (tmp_path / "meta").mkdir(exist_ok=True)
        pq.write_table(table, tmp_path / "meta" / f"{s:08d}.parquet")
        np.savez(tmp_path / "meta" / f"{s:08d}.npz", l14_img=emb.astype(np.float16))
    return directions


def test_compute_pool_features_writes_one_row_per_sample(tmp_path):
    rng = np.random.default_rng(0)
    directions = _pool(tmp_path, rng)
    settings = FeatureSettings(vocabulary={"dog": "dog"}, metaclip_entries=["photo", "bee", "cat"],
                               metaclip_t=20, clusters=8)
    summary = compute_pool_features(tmp_path / "meta", tmp_path / "features", settings,
                                    target_embeddings=directions[:2], dfn_scores={f"{0:016x}{0:016x}": 0.5},
                                    log=lambda _: None)
    features = pq.read_table(tmp_path / "features").to_pandas()
    meta = pq.read_table(sorted((tmp_path / "meta").glob("*.parquet")), columns=["uid", "text"]).to_pandas()
    assert sorted(features.uid) == sorted(meta.uid) and summary["rows"] == len(meta)
    assert not list((tmp_path / "features").glob(".*"))  # no temporary files left behind
    merged = meta.merge(features, on="uid")
    assert (merged.text_concept.notna() == merged.text.str.endswith("dog")).all()
    # Two of eight well-separated directions are targets: about a quarter of the pool is in their clusters.
    assert 0.1 < merged.in_target_cluster.mean() < 0.45 and summary["target_clusters"] >= 2
    assert (merged.semdedup_max_similarity > 0.999).sum() >= 2  # the planted duplicates
    # MetaCLIP: "photo" matches every caption (a head entry: p = 10 / 120), "bee" is a tail entry (p = 1).
    bee = merged.text.str.endswith("bee")
    assert bee.sum() <= 20 and merged.metaclip_keep_probability[bee].eq(1).all()
    assert merged.metaclip_keep_probability[~bee & ~merged.text.str.endswith("cat")].round(4).eq(
        round(20 / 120, 4)).all()
    assert merged.dfn_score.notna().sum() == 1
    # VAS: samples along a target direction score highest.
    assert merged.vas_score[merged.in_target_cluster].mean() > merged.vas_score[~merged.in_target_cluster].mean()


def test_missing_embeddings_are_named(tmp_path):
    (tmp_path / "meta").mkdir()
    pq.write_table(pa.table({"uid": ["0" * 32], "text": ["x"]}), tmp_path / "meta" / "00000000.parquet")
    settings = FeatureSettings(vocabulary={}, metaclip_entries=["x"], metaclip_t=1, clusters=1)
    with pytest.raises(FileNotFoundError, match="00000000.npz"):
        compute_pool_features(tmp_path / "meta", tmp_path / "f", settings, np.eye(8, dtype=np.float32))
