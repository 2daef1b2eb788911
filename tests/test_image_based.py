"""Image-based filter arrays: faiss k-means + inner-product assignment, checked against numpy."""

import numpy as np
import pytest

from datacomp_assets.filtering.image_based import (
    _sample_rows,
    assign,
    image_based_mask,
    proportional_k,
    target_clusters,
    train_centroids,
)

D = 64
N_BLOBS = 8
PER_BLOB = 300
# faiss k-means starts from k random points (as upstream), so with exactly k = 8 clusters two blobs often
# share a centroid (a local minimum of k-means, not a bug). With a few centroids per blob every blob gets
# its own, and "recovery" means: every cluster lies inside one blob and no two blobs share a cluster.
K = 4 * N_BLOBS


def _blobs(seed=0, n_blobs=N_BLOBS, per_blob=PER_BLOB, d=D, spread=0.05):
    """Well-separated Gaussian blobs on the unit sphere; returns (unit rows, blob label per row)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_blobs, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_blobs), per_blob)
    x = centers[labels] + spread * rng.normal(size=(labels.size, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(labels.size)
    return x[perm].astype(np.float32), labels[perm]


@pytest.fixture(scope="module")
def blobs():
    x, labels = _blobs()
    centroids = train_centroids(x, K, seed=0)
    return x, labels, centroids


def _blob_of_cluster(ids, labels):
    """Map cluster id -> its single blob; fails if a cluster mixes blobs."""
    owner = {}
    for j in np.unique(ids):
        blobs_in = np.unique(labels[ids == j])
        assert blobs_in.size == 1, f"cluster {j} mixes blobs {blobs_in}"
        owner[int(j)] = int(blobs_in[0])
    return owner


def _brute_force(x, c):
    return np.argmax(x.astype(np.float64) @ c.astype(np.float64).T, axis=1)


def test_kmeans_recovers_blobs(blobs):
    x, labels, centroids = blobs
    assert centroids.shape == (K, D) and centroids.dtype == np.float32
    ids = assign(x, centroids)
    owner = _blob_of_cluster(ids, labels)  # each cluster lies in exactly one blob
    assert set(owner.values()) == set(range(N_BLOBS))  # every blob has clusters of its own
    # L2 k-means, not spherical: centroids are means of unit vectors, not re-normalised, so shorter
    # than 1 (a singleton cluster's centroid is its one point, of norm 1)
    norms = np.linalg.norm(centroids, axis=1)
    assert np.all(norms <= 1 + 1e-5) and np.median(norms) < 0.99


def test_chunked_assignment_matches_unchunked_and_numpy(blobs):
    x, _, _ = blobs
    rng = np.random.default_rng(1)
    # random centroids as well as trained ones: many near-competitive centroids per row
    c = rng.normal(size=(50, D)).astype(np.float32)
    data = np.concatenate([x, rng.normal(size=(1000, D)).astype(np.float32)])
    full = assign(data, c, chunk=len(data))
    assert full.dtype == np.int64 and full.shape == (len(data),)
    np.testing.assert_array_equal(full, _brute_force(data, c))
    for chunk in (1, 7, 19, 20, 1000):
        np.testing.assert_array_equal(assign(data, c, chunk=chunk), full)
    # an iterable of uneven blocks gives the same answer
    blocks = [data[:5], data[5:1500], data[1500:]]
    np.testing.assert_array_equal(assign(iter(blocks), c, chunk=64), full)
    # no rows, no ids
    assert assign(data[:0], c).shape == (0,)


def test_assignment_is_inner_product_not_l2():
    # Centroid 0 is long and points at the query; centroid 1 is short and closer in L2.
    c = np.array([[2.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    q = np.array([[0.8, 0.6]], dtype=np.float32)
    assert assign(q, c)[0] == 0  # ip: 1.6 vs 0.96; L2 would pick 1
    assert np.argmin(((q - c) ** 2).sum(1)) == 1


def test_memmap_assignment(tmp_path, blobs):
    x, _, centroids = blobs
    path = tmp_path / "emb.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    mm.flush()
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=x.shape)
    np.testing.assert_array_equal(assign(ro, centroids, chunk=333), assign(x, centroids))


def test_targets_from_two_blobs_keep_exactly_those_blobs(blobs):
    x, labels, centroids = blobs
    # targets: fresh draws around blobs 2 and 5 (same centers: same seed, different noise)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(N_BLOBS, D))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    noise_rng = np.random.default_rng(42)
    targets = np.concatenate([centers[b] + 0.05 * noise_rng.normal(size=(300, D)) for b in (2, 5)])
    targets = (targets / np.linalg.norm(targets, axis=1, keepdims=True)).astype(np.float32)

    tids = target_clusters(targets, centroids)
    pool_ids = assign(x, centroids)
    owner = _blob_of_cluster(pool_ids, labels)
    assert tids.dtype == np.int64 and np.all(np.diff(tids) > 0)
    assert set(tids.tolist()) == {j for j, o in owner.items() if o in (2, 5)}
    mask = image_based_mask(pool_ids, tids)
    assert mask.dtype == bool and mask.shape == (len(x),)
    np.testing.assert_array_equal(mask, np.isin(labels, [2, 5]))
    assert mask.sum() == 2 * PER_BLOB


def test_mask_against_python_loop():
    rng = np.random.default_rng(3)
    pool = rng.integers(0, 100, size=2000)
    tids = np.array([3, 17, 99, 150])
    expected = np.array([p in {3, 17, 99, 150} for p in pool])
    np.testing.assert_array_equal(image_based_mask(pool, tids), expected)
    assert not image_based_mask(pool, np.empty(0, dtype=np.int64)).any()


def test_kmeans_is_deterministic_for_a_seed():
    x, _ = _blobs(seed=7, n_blobs=12, per_blob=100)
    a = train_centroids(x, 20, seed=0)
    b = train_centroids(x, 20, seed=0)
    np.testing.assert_array_equal(a, b)
    c = train_centroids(x, 20, seed=1)
    assert not np.array_equal(a, c)


def test_embeddings_are_normalized_before_kmeans(blobs):
    x, _, centroids = blobs
    scales = np.random.default_rng(5).uniform(0.5, 3.0, size=(len(x), 1)).astype(np.float32)
    scaled = x * scales
    before = scaled.copy()
    np.testing.assert_allclose(train_centroids(scaled, K, seed=0), centroids, atol=1e-5)
    np.testing.assert_array_equal(scaled, before)  # the caller's array is not normalised in place
    train_centroids(scaled, K, seed=0, max_points=len(x) // 2)
    np.testing.assert_array_equal(scaled, before)


def test_max_points_sample_is_uniform_bounded_and_chunking_invariant():
    n, m = 5000, 700
    x = np.arange(n, dtype=np.float32)[:, None].repeat(3, axis=1)  # row i holds the value i
    rows, total = _sample_rows(x, m, seed=0, chunk=256)
    assert total == n and rows.shape == (m, 3)
    picked = rows[:, 0].astype(int)
    assert np.unique(picked).size == m  # without replacement
    assert np.all(np.diff(picked) > 0)  # kept in pool order
    # the same sample whatever the block sizes, array or iterable
    for chunk in (1000, n):
        np.testing.assert_array_equal(_sample_rows(x, m, seed=0, chunk=chunk)[0], rows)
    blocks = iter([x[:10], x[10:3333], x[3333:]])
    np.testing.assert_array_equal(_sample_rows(blocks, m, seed=0)[0], rows)
    # a different seed, a different sample; roughly uniform over the pool
    assert not np.array_equal(_sample_rows(x, m, seed=1)[0], rows)
    counts = np.histogram(picked, bins=5, range=(0, n))[0]
    assert counts.min() > 0.6 * m / 5
    # fewer rows than max_points: all of them
    np.testing.assert_array_equal(_sample_rows(x[:100], m, seed=0)[0], x[:100])


def test_train_with_max_points_recovers_blobs(blobs):
    x, labels, _ = blobs
    blocks = [x[i : i + 250] for i in range(0, len(x), 250)]
    c_iter = train_centroids(iter(blocks), K, seed=0, max_points=600, chunk=128)
    c_arr = train_centroids(x, K, seed=0, max_points=600, chunk=128)
    np.testing.assert_array_equal(c_iter, c_arr)
    owner = _blob_of_cluster(assign(x, c_arr), labels)
    assert set(owner.values()) == set(range(N_BLOBS))
    # the sample path differs from training on everything
    assert not np.array_equal(c_arr, train_centroids(x, K, seed=0))


def test_train_rejects_too_few_points():
    x, _ = _blobs(per_blob=2)
    with pytest.raises(ValueError):
        train_centroids(x, 100)


def test_proportional_k():
    for pool in (12_800_000, 128_000_000, 1_280_000_000, 12_800_000_000):
        assert proportional_k(pool) == 100_000
    assert proportional_k(20_000) == 156  # tiny: small's ~128 samples per cluster
    assert proportional_k(128_000) == 1_000  # upstream's debug scale
    assert proportional_k(1_000) == 16  # floor
    assert proportional_k(10) == 10  # never more clusters than samples
    with pytest.raises(ValueError):
        proportional_k(0)


def test_an_array_is_read_only_at_the_sampled_rows():
    x = np.random.default_rng(3).normal(size=(3000, 4)).astype(np.float32)

    class Recording:  # an array-like that counts the rows each read returns
        shape, ndim, reads = x.shape, 2, []

        def __getitem__(self, key):
            self.reads.append(len(x[key]))
            return x[key]

    rows, total = _sample_rows(Recording(), 400, seed=0, chunk=256)
    assert total == 3000 and sum(Recording.reads) == 400  # the sample, not the pool
    np.testing.assert_array_equal(rows, _sample_rows(iter([x[:1000], x[1000:]]), 400, seed=0)[0])
