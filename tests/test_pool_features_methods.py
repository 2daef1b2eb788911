"""pool_features method by method: each its own table, kept while its inputs are unchanged, computed through the
engine with the same values in one process as in two."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from datacomp_assets.filtering import hyperbolic, negclip, prototypes, semdedup
from datacomp_assets.filtering.features import (
    METHODS, SEMDEDUP_CENTROIDS, SEMDEDUP_CLUSTERS, FeatureSettings, compute_pool_features, method_dirs,
    read_features)
from tests.test_features import _pool

SETTINGS = FeatureSettings(vocabulary={"dog": "dog"}, metaclip_entries=["photo", "bee", "cat"], metaclip_t=20,
                           clusters=8)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    directions = _pool(root, np.random.default_rng(3), n_per_shard=90, shards=3, text_embeddings=True)
    files = sorted((root / "meta").glob("*.npz"))
    images = np.concatenate([np.load(f)["l14_img"] for f in files]).astype(np.float32)
    texts = np.concatenate([np.load(f)["l14_txt"] for f in files]).astype(np.float32)
    heads = hyperbolic.train_heads(images, texts / np.linalg.norm(texts, axis=1, keepdims=True), steps=10,
                                   batch_size=32, seed=0)
    hyperbolic.save_heads(heads, root / "heads.pt")
    np.save(root / "targets.npy", directions[:2])
    return root, directions, images, texts


def compute(pool, out, settings=SETTINGS, log=None, **kwargs):
    root, directions = pool[0], pool[1]
    return compute_pool_features(root / "meta", out, settings, root / "targets.npy", kwargs.pop("vas", directions[:3]),
                                 log=log or (lambda _: None), hype_heads=root / "heads.pt", **kwargs)


def tables(out) -> dict:
    return {(d.name, p.name): pq.read_table(p) for d in method_dirs(out) for p in sorted(d.glob("*.parquet"))}


def test_two_processes_write_every_table_the_one_process_writes(pool, tmp_path):
    compute(pool, tmp_path / "one", processes=1)
    summary = compute(pool, tmp_path / "two", processes=2)
    one, two = tables(tmp_path / "one"), tables(tmp_path / "two")
    assert {d for d, _ in one} == set(METHODS) and len(one) == 3 * len(METHODS)
    assert one.keys() == two.keys()
    for key, table in one.items():
        assert two[key].equals(table), key
    assert summary["methods_kept"] == "none" and not (tmp_path / "two" / ".scratch").exists()


def test_the_columns_equal_their_kernels_on_the_whole_pool(pool, tmp_path):
    root, _, images, texts = pool
    compute(pool, tmp_path / "f", processes=2)
    features = read_features(tmp_path / "f").to_pandas()
    stored = images.astype(np.float16)
    np.testing.assert_allclose(features.negclip_loss, negclip.negclip_loss(stored, texts.astype(np.float16),
                                                                           batch_size=27, seed=0), atol=1e-5)
    clusters = np.load(tmp_path / "f" / "semdedup" / SEMDEDUP_CLUSTERS)
    centroids = np.load(tmp_path / "f" / "semdedup" / SEMDEDUP_CENTROIDS)
    scores = semdedup.semdedup_max_similarity(stored, clusters)
    np.testing.assert_array_equal(features.semdedup_max_similarity, scores)  # cluster batches change nothing
    eligible = scores <= SETTINGS.density_pruning_semdedup
    expected = prototypes.density_based_pruning(stored, clusters, centroids, eligible,
                                                target=min(int(eligible.sum()), round(0.3 * len(stored)))).keep
    np.testing.assert_array_equal(features.density_pruning_keep, expected)


def test_a_rerun_keeps_every_method_and_a_changed_input_recomputes_its_method_alone(pool, tmp_path):
    out = tmp_path / "f"
    compute(pool, out)
    before = {key: p.stat().st_mtime_ns for key, p in
              ((d.name + "/" + p.name, p) for d in method_dirs(out) for p in d.glob("*.parquet"))}
    lines = []
    summary = compute(pool, out, log=lines.append)
    assert summary["methods_computed"] == "none" and "nothing to compute" in lines[0]
    assert summary["methods_kept"] == ", ".join(METHODS)
    # VAS's targets change: only VAS runs again
    summary = compute(pool, out, vas=pool[1][3:5], log=lines.append)
    assert summary["methods_computed"] == "vas" and "vas (its inputs changed (vas_targets))" in lines[-2]
    after = {d.name + "/" + p.name: p.stat().st_mtime_ns for d in method_dirs(out) for p in d.glob("*.parquet")}
    assert {k for k in before if before[k] != after[k]} == {k for k in before if k.startswith("vas/")}
    # a file changed by hand is named and its method computed again
    victim = out / "normsim" / "00000001.parquet"
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    summary = compute(pool, out, vas=pool[1][3:5], log=lines.append)
    assert summary["methods_computed"] == "normsim" and "00000001.parquet" in lines[-2]


def test_only_the_methods_asked_for_run_and_the_pool_is_backfilled_method_by_method(pool, tmp_path):
    out = tmp_path / "f"
    out.mkdir()
    (out / "00000000.parquet").write_bytes(b"the single-folder layout of before")
    asked = FeatureSettings(**{**SETTINGS.__dict__, "columns": frozenset({"density_pruning_keep"})})
    summary = compute(pool, out, asked)
    assert summary["methods_computed"] == "semdedup, density_pruning"  # and what it reads
    assert [d.name for d in method_dirs(out)] == ["semdedup", "density_pruning"]
    assert not (out / "00000000.parquet").exists()  # the old layout is removed, never joined
    asked = FeatureSettings(**{**SETTINGS.__dict__, "columns": frozenset({"negclip_loss", "semdedup_max_similarity"})})
    summary = compute(pool, out, asked)
    assert (summary["methods_computed"], summary["methods_kept"]) == ("negclip", "semdedup")
    assert {d.name for d in method_dirs(out)} == {"semdedup", "density_pruning", "negclip"}


def test_subset_joins_the_methods_of_this_pool_and_refuses_a_stale_one_it_would_read(pool, tmp_path):
    from datacomp_assets.core.layout import Layout
    from datacomp_assets.filtering.assets import pool_feature_dirs

    layout = Layout(tmp_path / "data")
    out = layout.pool_features("tiny")
    asked = FeatureSettings(**{**SETTINGS.__dict__, "columns": frozenset({"semdedup_max_similarity", "text_concept"})})
    compute(pool, out, asked, metadata_version="v1")
    reads = {"semdedup_max_similarity"}
    assert pool_feature_dirs(layout, "tiny", reads, "v1") == [out / "semdedup", out / "text_concept"]
    with pytest.raises(ValueError, match=r"semdedup was computed from other metadata than the pool's; "
                                         r"semdedup_max_similarity would be read from it\. Materialize pool_features"):
        pool_feature_dirs(layout, "tiny", reads, "v2")
    assert pool_feature_dirs(layout, "tiny", {"clip_b32_similarity_score"}, "v2") == []  # not read: not joined
    (out / "text_concept" / "_manifest.json").unlink()  # a run cut short before it recorded the method
    with pytest.raises(ValueError, match=r"text_concept was not recorded \(a run cut short\)"):
        pool_feature_dirs(layout, "tiny", {"text_concept"}, "v1")
    (out / "00000000.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="single-folder layout of before, which is no longer read"):
        pool_feature_dirs(layout, "tiny", reads, "v1")
