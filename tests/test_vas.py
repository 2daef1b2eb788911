"""Variance Alignment Score: target second moment and x^T Sigma x, checked against direct numpy."""

import numpy as np
import pytest

from datacomp_assets.filtering.vas import target_covariance, vas_scores

D = 24


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    pool = _unit(rng.normal(size=(500, D))).astype(np.float32)
    target = _unit(rng.normal(size=(300, D)) + 2.0 * np.eye(D)[0]).astype(np.float32)
    return pool, target


def test_equals_direct_numpy(data):
    pool, target = data
    t = _unit(target.astype(np.float64))  # the module re-normalises float32 rows in float64
    sigma_direct = sum(np.outer(row, row) for row in t) / len(t)
    sigma = target_covariance(target)
    assert sigma.shape == (D, D) and sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, sigma_direct, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, sigma.T)
    assert np.trace(sigma) == pytest.approx(1.0)  # unit rows: trace is the mean squared norm
    scores = vas_scores(pool, sigma)
    x = _unit(pool.astype(np.float64))
    direct = np.array([row @ sigma_direct @ row for row in x])
    assert scores.dtype == np.float32 and scores.shape == (len(pool),)
    np.testing.assert_allclose(scores, direct, rtol=1e-6)


def test_target_along_one_direction_ranks_that_direction_first():
    rng = np.random.default_rng(1)
    e = np.zeros(D)
    e[3] = 1.0
    target = _unit(e + 0.05 * rng.normal(size=(200, D)))  # all close to +-e3
    target[::2] *= -1  # sign does not matter: the second moment sees only the axis
    cos = np.linspace(0.0, 1.0, 11)  # pool rows at growing cosine to e3 (shuffled)
    other = _unit(rng.normal(size=(11, D)) * (1 - e))  # orthogonal to e3
    pool = cos[:, None] * e + np.sqrt(1 - cos**2)[:, None] * other
    perm = rng.permutation(11)
    scores = vas_scores(pool[perm], target_covariance(target))
    assert np.array_equal(np.argsort(-scores), np.argsort(-cos[perm]))


def test_chunking_and_blocks_do_not_change_result(data):
    pool, target = data
    sigma = target_covariance(target)
    for chunk in (1, 7, 128):
        np.testing.assert_allclose(target_covariance(target, chunk=chunk), sigma, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(vas_scores(pool, sigma, chunk=chunk), vas_scores(pool, sigma), rtol=1e-6)
    blocks = [target[:10], target[10:250], target[250:]]  # an iterable of blocks, e.g. one per shard
    np.testing.assert_allclose(target_covariance(iter(blocks), chunk=64), sigma, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(vas_scores([pool[:333], pool[333:]], sigma, chunk=100), vas_scores(pool, sigma),
                               rtol=1e-6)


def test_float16_memmap_and_renormalisation(tmp_path, data):
    pool, target = data
    sigma = target_covariance(target)
    path = tmp_path / "pool.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=pool.shape)
    mm[:] = pool
    mm.flush()
    mm = np.memmap(path, dtype=np.float16, mode="r", shape=pool.shape)
    np.testing.assert_allclose(vas_scores(mm, sigma, chunk=64), vas_scores(pool, sigma), rtol=1e-2, atol=1e-5)
    scaled = pool * 3.0  # scores use unit rows: scale does not matter
    np.testing.assert_allclose(vas_scores(scaled, sigma), vas_scores(pool, sigma), rtol=1e-6)
    with_zero = np.concatenate([np.zeros((1, D), np.float32), pool[:3]])
    assert vas_scores(with_zero, sigma)[0] == 0.0
    assert vas_scores(np.empty((0, D), np.float32), sigma).shape == (0,)


def test_vas_traindata_uses_the_pool_as_target(data):
    pool, _ = data
    scores = vas_scores(pool, target_covariance(pool))
    # mean over the pool of x^T Sigma_pool x = ||Sigma_pool||_F^2
    assert scores.mean() == pytest.approx(np.sum(target_covariance(pool) ** 2), rel=1e-5)


def test_wrong_widths_raise(data):
    pool, target = data
    sigma = target_covariance(target)
    with pytest.raises(ValueError, match="width"):
        vas_scores(pool[:, :-1], sigma)
    with pytest.raises(ValueError, match="width"):
        target_covariance([target[:5], target[5:10, :-1]])
    with pytest.raises(ValueError, match="square"):
        vas_scores(pool, sigma[:-1])
    with pytest.raises(ValueError, match="2-d"):
        target_covariance(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="no target"):
        target_covariance(np.empty((0, D), np.float32))
    with pytest.raises(ValueError, match="positive"):
        vas_scores(pool, sigma, chunk=0)
