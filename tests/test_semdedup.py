"""SemDeDup scores: duplicates ranked by distance to the centroid, checked against a brute-force loop."""

import numpy as np
import pytest

from datacomp_assets.filtering.semdedup import FIRST_IN_CLUSTER, semdedup_keep, semdedup_max_similarity

D = 32


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_force(x, ids):
    """Independent O(n^2) reference: for each row, scan every row of its cluster that ranks before it."""
    x = _unit(x).astype(np.float64)
    out = np.full(len(x), FIRST_IN_CLUSTER)
    for c in np.unique(ids):
        members = np.flatnonzero(ids == c)
        centroid = x[members].mean(axis=0)
        centroid /= np.linalg.norm(centroid)
        key = {int(i): (float(x[i] @ centroid), int(i)) for i in members}
        for i in members:
            earlier = [j for j in members if key[int(j)] < key[int(i)]]
            if earlier:
                out[i] = max(float(x[i] @ x[j]) for j in earlier)
    return np.clip(out, -1.0, 1.0)


def _planted(seed=0, n=300, k=5, d=D, n_dups=60):
    """Random unit rows in k clusters, with near-duplicates (cosine ~0.999) of random rows appended."""
    rng = np.random.default_rng(seed)
    base = _unit(rng.normal(size=(n, d)))
    ids = rng.integers(0, k, size=n)
    src = rng.integers(0, n, size=n_dups)
    dups = base[src] + 0.005 * rng.normal(size=(n_dups, d))  # noise of norm ~0.03
    x = _unit(np.concatenate([base, dups]))
    ids = np.concatenate([ids, ids[src]]).astype(np.int64)
    perm = rng.permutation(len(x))
    return x[perm], ids[perm]


def _centroid_cos(x):
    c = x.astype(np.float64).mean(0)
    return x.astype(np.float64) @ (c / np.linalg.norm(c))


def test_exact_duplicates_one_survivor_per_group():
    rng = np.random.default_rng(1)
    core = _unit(rng.normal(size=(2, D)))
    distinct = _unit(rng.normal(size=(6, D)))  # random directions in 32-d: pairwise cosine well below 0.95
    # core[0] is repeated 3 times and core[1] twice, interleaved with distinct rows, all in one cluster
    x = np.stack([distinct[0], core[0], core[1], distinct[1], core[0], distinct[2], core[1], core[0],
                  *distinct[3:]])
    score = semdedup_max_similarity(x, np.zeros(len(x), dtype=np.int64))
    assert score.dtype == np.float32 and score.shape == (len(x),)
    keep = semdedup_keep(score, 0.05)
    for group in ([1, 4, 7], [2, 6]):
        assert keep[group].sum() == 1, "exactly one copy of each duplicate group survives"
        assert keep[group[0]], "identical rows tie on distance to the centroid; the lowest row index wins"
        assert np.all(score[group[1:]] == pytest.approx(1.0, abs=1e-6))
    assert keep.sum() == len(x) - 3  # every distinct row survives
    # the row farthest from the centroid is ranked first in its cluster
    assert score[np.argmin(_centroid_cos(x))] == FIRST_IN_CLUSTER


def test_farthest_near_duplicate_survives():
    """Near-duplicates (not identical): the survivor is the copy with the lowest cosine to the centroid."""
    rng = np.random.default_rng(2)
    center = _unit(rng.normal(size=(1, D)))[0]
    others = _unit(center + 0.5 * rng.normal(size=(20, D)))
    a = _unit(center + 0.5 * rng.normal(size=(1, D)))[0]
    # three copies of `a`, nudged by different amounts towards the cluster centre, in shuffled row order
    copies = _unit(a + np.array([[0.03], [0.0], [0.015]]) * center)
    x = np.concatenate([others[:7], copies[:1], others[7:14], copies[1:], others[14:]])
    rows = np.array([7, 15, 16])
    assert np.all(copies @ copies.T > 0.999)
    score = semdedup_max_similarity(x, np.zeros(len(x), dtype=np.int64))
    keep = semdedup_keep(score, 0.01)
    farthest = rows[np.argmin(_centroid_cos(x)[rows])]
    assert farthest == 15  # the un-nudged copy
    assert keep[rows].sum() == 1 and keep[farthest]
    assert keep.sum() == len(x) - 2


def test_eps_zero_keeps_all_distinct_rows():
    x, ids = _planted(seed=3)
    score = semdedup_max_similarity(x, ids)
    assert semdedup_keep(score, 0.0).all()
    assert np.all(score <= 1.0) and np.all(score >= -1.0)


def test_matches_brute_force_with_planted_duplicates():
    x, ids = _planted(seed=4)
    expected = _brute_force(x, ids)
    for kwargs in ({}, {"chunk": 50, "block": 7}, {"chunk": 1, "block": 1}):
        got = semdedup_max_similarity(x, ids, **kwargs)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    keep = semdedup_keep(got, 0.01)
    assert keep.sum() == (expected <= 0.99).sum()
    assert 0 < (~keep).sum() <= 60  # the planted near-duplicates, and nothing else, are dropped
    assert (~keep).sum() >= 50


def test_cluster_boundaries_are_respected():
    rng = np.random.default_rng(5)
    x = _unit(rng.normal(size=(10, D)))
    x[7] = x[2]  # identical rows...
    ids = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], dtype=np.int64)  # ...in different clusters
    keep = semdedup_keep(semdedup_max_similarity(x, ids), 0.05)
    assert keep.all()
    ids[7] = 0  # now they share a cluster: one goes
    keep = semdedup_keep(semdedup_max_similarity(x, ids), 0.05)
    assert keep.sum() == 9 and not (keep[2] and keep[7])


def test_arbitrary_cluster_ids_and_singletons():
    x, ids = _planted(seed=6, n=80, n_dups=10)
    relabelled = np.array([-5, 10**12, 3, 7, 0])[ids]  # negative, huge, unordered ids
    np.testing.assert_allclose(semdedup_max_similarity(x, relabelled), semdedup_max_similarity(x, ids))
    singletons = semdedup_max_similarity(x, np.arange(len(x)))
    assert np.all(singletons == FIRST_IN_CLUSTER)
    assert semdedup_max_similarity(np.empty((0, D), np.float32), np.empty(0, np.int64)).shape == (0,)


def test_float16_and_memmap(tmp_path):
    x, ids = _planted(seed=7, n=120, n_dups=20)
    x16 = x.astype(np.float16)
    exact = x16.copy()
    exact[5] = exact[9]  # an exact float16 duplicate: its cosine must not round above 1
    path = tmp_path / "emb.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=exact.shape)
    mm[:] = exact
    mm.flush()
    mm = np.memmap(path, dtype=np.float16, mode="r", shape=exact.shape)
    from_memmap = semdedup_max_similarity(mm, ids, chunk=16)
    np.testing.assert_array_equal(from_memmap, semdedup_max_similarity(exact, ids))
    assert semdedup_keep(from_memmap, 0.0).all()
    np.testing.assert_allclose(semdedup_max_similarity(x16, ids), _brute_force(x16.astype(np.float32), ids),
                               atol=1e-5)


def test_invalid_input():
    x = _unit(np.random.default_rng(8).normal(size=(5, D)))
    with pytest.raises(ValueError, match="one id per embedding row"):
        semdedup_max_similarity(x, np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="2-d"):
        semdedup_max_similarity(x[0], np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        semdedup_max_similarity(x, np.zeros(5))
    with pytest.raises(ValueError, match="positive"):
        semdedup_max_similarity(x, np.zeros(5, dtype=np.int64), chunk=0)
    with pytest.raises(ValueError, match="eps"):
        semdedup_keep(np.zeros(5, np.float32), -0.1)
