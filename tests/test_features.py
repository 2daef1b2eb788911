"""Per-sample features behind the filters beyond the metadata (pool_features)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_assets.filtering.features import (
    FeatureSettings, compute_pool_features, entries_from_captions, method_dirs, read_features, text_concepts,
    vocabulary_from_classnames)


def test_text_concepts_find_the_first_class_word_and_plurals():
    vocabulary = vocabulary_from_classnames(["circle", "cross", "letter T"])  # multi-word names are skipped
    assert text_concepts(["Two red Circles.", "a cross and a circle", "crossing", "", None], vocabulary) == [
        "circle", "cross", None, None, None]


def test_entries_from_captions_keep_frequent_unigrams_bigrams_and_extras():
    entries = entries_from_captions(["a red star.", "a red star", "a blue ring"], min_count=2, extra=["heart"])
    assert {"a", "red", "star", "red star", "a red", "heart", "0", "99"} <= set(entries)
    assert "blue" not in entries and "." not in entries


ANIMALS = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"]


def _pool(tmp_path, rng, n_per_shard=60, shards=2, text_embeddings=False):
    directions = np.eye(8, dtype=np.float32)
    for s in range(shards):
        labels = rng.integers(0, 8, n_per_shard)
        emb = directions[labels] + rng.normal(0, 0.05, (n_per_shard, 8)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        emb[1] = emb[0]  # an exact duplicate in every shard
        texts = [f"a photo of {ANIMALS[label]}" for label in labels]
        table = pa.table({"uid": [f"{s:016x}{i:016x}" for i in range(n_per_shard)], "text": texts,
                          "language": ["en"] * n_per_shard, "num_tokens": [len(t.split()) for t in texts],
                          "num_chars": [len(t) for t in texts]})
        (tmp_path / "meta").mkdir(exist_ok=True)
        pq.write_table(table, tmp_path / "meta" / f"{s:08d}.parquet")
        text_emb = {"l14_txt": (directions[labels] + rng.normal(0, 0.3, (n_per_shard, 8))).astype(np.float16)
                    } if text_embeddings else {}
        np.savez(tmp_path / "meta" / f"{s:08d}.npz", l14_img=emb.astype(np.float16), **text_emb)
    return directions


def test_compute_pool_features_writes_one_row_per_sample(tmp_path):
    rng = np.random.default_rng(0)
    directions = _pool(tmp_path, rng)
    settings = FeatureSettings(vocabulary={"dog": "dog"}, metaclip_entries=["photo", "bee", "cat"],
                               metaclip_t=20, clusters=8)
    summary = compute_pool_features(tmp_path / "meta", tmp_path / "features", settings,
                                    target_embeddings=directions[:2], vas_targets=directions[:2], log=lambda _: None)
    features = read_features(tmp_path / "features").to_pandas()
    meta = pq.read_table(sorted((tmp_path / "meta").glob("*.parquet")), columns=["uid", "text"]).to_pandas()
    assert sorted(features.uid) == sorted(meta.uid) and summary["rows"] == len(meta)
    assert not list((tmp_path / "features").glob("**/.*"))  # no temporary files left behind
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
    assert "dfn_score" not in merged  # scored over the images, by the image_scores asset
    # VAS: samples along a target direction score highest.
    assert merged.vas_score[merged.in_target_cluster].mean() > merged.vas_score[~merged.in_target_cluster].mean()


def test_features_whose_input_is_not_supplied_are_left_out_and_kmeans_trains_on_a_sample(tmp_path):
    """At a published pool a user may supply none of ImageNet's embeddings, VAS's targets or MetaCLIP's entries:
    the other columns are still computed, in bounded memory (k-means on a seeded sample, embeddings streamed)."""
    _pool(tmp_path, np.random.default_rng(0))
    settings = FeatureSettings(vocabulary={"dog": "dog"}, metaclip_entries=None, metaclip_t=20, clusters=8,
                               kmeans_max_points=50)
    summary = compute_pool_features(tmp_path / "meta", tmp_path / "features", settings, None, None, log=lambda _: None)
    features = read_features(tmp_path / "features")
    assert features.column_names == ["uid", "text_concept", "caption_repeats", "image_cluster",
                                     "semdedup_max_similarity", "density_pruning_keep"]
    assert features.num_rows == 120 and summary["target_clusters"] == 0
    assert len(set(features["image_cluster"].to_pylist())) > 4  # 50 sampled rows still find the 8 directions
    assert not (tmp_path / "features" / ".scratch").exists()


def test_missing_embeddings_are_named(tmp_path):
    (tmp_path / "meta").mkdir()
    pq.write_table(pa.table({"uid": ["0" * 32], "text": ["x"], "language": ["en"], "num_tokens": [1],
                             "num_chars": [1]}), tmp_path / "meta" / "00000000.parquet")
    settings = FeatureSettings(vocabulary={}, metaclip_entries=["x"], metaclip_t=1, clusters=1)
    with pytest.raises(FileNotFoundError, match="00000000.npz"):
        compute_pool_features(tmp_path / "meta", tmp_path / "f", settings, np.eye(8, dtype=np.float32), None)


def test_missing_caption_features_are_named(tmp_path):
    (tmp_path / "meta").mkdir()
    pq.write_table(pa.table({"uid": ["0" * 32], "text": ["x"]}), tmp_path / "meta" / "00000000.parquet")
    settings = FeatureSettings(vocabulary={}, metaclip_entries=["x"], metaclip_t=1, clusters=1)
    with pytest.raises(ValueError, match=r"00000000.parquet lacks the caption features \['language', 'num_tokens'"):
        compute_pool_features(tmp_path / "meta", tmp_path / "f", settings, np.eye(8, dtype=np.float32), None)


def test_image_based_keeps_what_the_reference_rule_keeps(tmp_path):
    """image_based's kept set equals an independent computation of upstream's rule
    (baselines/image_based_clustering.py and apply_filter.py): the caption filter (English, more than 1 fastText
    token, more than 5 characters), faiss L2 k-means of the filtered rows' L/14 image embeddings (20 iterations,
    seed 0, faiss' sub-sampling off), inner-product assignment, and the filtered rows whose centroid is the
    nearest centroid of some target image."""
    import faiss

    from datacomp_assets.core.uids import array_to_uids
    from datacomp_assets.filtering.selection import select_uids

    rng = np.random.default_rng(7)
    n, d, k = 600, 16, 12
    directions = rng.normal(size=(24, d)).astype(np.float32)
    emb = directions[rng.integers(0, 24, n)] + rng.normal(0, 0.3, (n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    language = rng.choice(["en", "en", "en", "de"], n)
    texts = [rng.choice(["a photo of a dog on grass", "dog", "a cat", "two red circles here"]) for _ in range(n)]
    num_tokens = np.array([len(t.split()) for t in texts])
    num_chars = np.array([len(t) for t in texts])
    uids = np.array([f"{i:032x}" for i in range(n)])
    (tmp_path / "meta").mkdir()
    for shard, rows in enumerate(np.array_split(np.arange(n), 3)):
        pq.write_table(pa.table({"uid": uids[rows], "text": [texts[i] for i in rows], "language": language[rows],
                                 "num_tokens": num_tokens[rows].astype(np.int32),
                                 "num_chars": num_chars[rows].astype(np.int32)}),
                       tmp_path / "meta" / f"{shard:08d}.parquet")
        np.savez(tmp_path / "meta" / f"{shard:08d}.npz", l14_img=emb[rows].astype(np.float16))
    targets = directions[:3] / np.linalg.norm(directions[:3], axis=1, keepdims=True)
    settings = FeatureSettings(vocabulary={}, metaclip_entries=["dog"], metaclip_t=10, clusters=k)
    compute_pool_features(tmp_path / "meta", tmp_path / "features", settings, targets, None, log=lambda _: None)
    kept = set(array_to_uids(select_uids(tmp_path / "meta", "image_based",
                                         feature_dirs=method_dirs(tmp_path / "features"))))

    stored = emb.astype(np.float16).astype(np.float32)  # what the npz holds
    passes = (language == "en") & (num_tokens > 1) & (num_chars > 5)
    assert 0 < (~passes).sum() < n  # some rows fail the caption filter, and they must not shape the clusters
    x = stored[passes] / np.linalg.norm(stored[passes], axis=1, keepdims=True)
    kmeans = faiss.Kmeans(d, k, niter=20, seed=0, spherical=False, max_points_per_centroid=10_000_000)
    kmeans.train(np.ascontiguousarray(x))
    nearest = np.argmax(np.einsum("nd,kd->nk", stored[passes], kmeans.centroids), axis=1)
    target_ids = np.unique(np.argmax(targets @ kmeans.centroids.T, axis=1))
    expected = set(uids[passes][np.isin(nearest, target_ids)])
    assert kept == expected and 0 < len(kept) < passes.sum()


def test_embedding_methods_columns_match_their_modules_and_caption_repeats_count_equal_captions(tmp_path):
    """negCLIPLoss, NormSim and HYPE read the pool's L/14 text embeddings too; each column equals its module's
    function on the whole pool, and caption repeats equal a count of the lowercased captions."""
    import pandas as pd

    from datacomp_assets.filtering import hyperbolic, negclip

    rng = np.random.default_rng(1)
    directions = _pool(tmp_path, rng, text_embeddings=True)
    files = sorted((tmp_path / "meta").glob("*.npz"))
    images = np.concatenate([np.load(f)["l14_img"] for f in files]).astype(np.float32)
    texts = np.concatenate([np.load(f)["l14_txt"] for f in files]).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    heads = hyperbolic.train_heads(images, texts, steps=20, batch_size=32, seed=0)
    hyperbolic.save_heads(heads, tmp_path / "heads.pt")
    settings = FeatureSettings(vocabulary={}, metaclip_entries=None, metaclip_t=20, clusters=8)
    compute_pool_features(tmp_path / "meta", tmp_path / "features", settings, directions[:2], None,
                          log=lambda _: None, hype_heads=tmp_path / "heads.pt")
    meta = pq.read_table(sorted((tmp_path / "meta").glob("*.parquet")), columns=["uid", "text"]).to_pandas()
    features = meta.merge(read_features(tmp_path / "features").to_pandas(), on="uid")  # back in pool order
    np.testing.assert_allclose(features.negclip_loss, negclip.negclip_loss(images, texts, batch_size=12, seed=0),
                               atol=2e-3)  # a tenth of the pool per batch; float16 storage rounds the inputs
    np.testing.assert_allclose(features.normsim, negclip.normsim(images, directions[:2]), atol=2e-3)
    expected = hyperbolic.hype_scores(hyperbolic.load_heads(tmp_path / "heads.pt"), images, texts)
    np.testing.assert_allclose(features.hype_score, expected["hype_score"], atol=1e-2)
    assert features.density_pruning_keep.sum() == round(0.3 * len(features))
    counts = meta.text.str.lower().map(meta.text.str.lower().value_counts())
    assert (features.caption_repeats.to_numpy() == counts.to_numpy()).all()
    assert pd.Series(features.caption_repeats).max() > 1  # eight captions over 120 rows: they repeat
