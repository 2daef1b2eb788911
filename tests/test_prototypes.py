"""Density-based pruning: distances, quotas and the keep mask, checked against brute force (explicit loops,
scipy's constrained least squares for upstream's quadratic program) and on what a user relies on."""

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, minimize

from datacomp_assets.filtering.prototypes import (
    DEFAULT_BALANCE,
    cluster_quotas,
    density_based_pruning,
    inter_cluster_distance,
)

D = 8


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    """Six clusters of different spreads and sizes; centroids are plain means (as image_based's k-means)."""
    rng = np.random.default_rng(0)
    centers = _unit(rng.normal(size=(6, D)))
    sizes = [40, 60, 25, 80, 35, 50]
    spreads = [0.05, 0.3, 0.15, 0.6, 0.1, 0.4]
    rows, ids = [], []
    for j, (size, spread) in enumerate(zip(sizes, spreads)):
        rows.append(_unit(centers[j] + spread * rng.normal(size=(size, D))))
        ids += [j] * size
    x, ids = np.vstack(rows).astype(np.float32), np.array(ids)
    perm = rng.permutation(len(ids))
    x, ids = x[perm], ids[perm]
    centroids = np.stack([x[ids == j].mean(axis=0) for j in range(6)]).astype(np.float32)
    eligible = rng.random(len(ids)) < 0.8  # the rows SemDeDup kept
    return x, ids, centroids, eligible


def _brute_distances(x, ids, centroids, eligible, neighbors):
    c = _unit(centroids)
    x = _unit(x)
    k = len(c)
    d_intra = np.array([np.mean([1 - x[i] @ c[j] for i in range(len(x)) if ids[i] == j and eligible[i]])
                        for j in range(k)])
    d_inter = []
    for j in range(k):
        others = sorted((1 - c[j] @ c[m] for m in range(k) if m != j))  # smallest distance first
        d_inter.append(np.mean(others[:neighbors]))
    return d_intra, np.array(d_inter)


def _brute_qp(probabilities, capacity, target, balance):
    """Upstream's pruning_qp, solved by a general-purpose constrained optimiser (no rounding)."""
    k = len(capacity)
    floor = int(target / k * balance) if balance > 0 else 1
    bounds = [(max(0, min(floor, n - 1)), n) for n in capacity]
    ideal = probabilities * target
    lb, ub = np.array(bounds, dtype=float).T
    res = minimize(lambda v: 0.5 * np.sum((v - ideal) ** 2), x0=(lb + ub) / 2, jac=lambda v: v - ideal,
                   hess=lambda v: np.eye(k), bounds=Bounds(lb, ub),
                   constraints=[LinearConstraint(np.ones((1, k)), target, target)],
                   method="trust-constr", options={"gtol": 1e-10, "xtol": 1e-12, "maxiter": 5_000})
    assert abs(res.x.sum() - target) < 1e-4
    return res.x


def test_distances_and_complexity_equal_brute_force(data):
    x, ids, centroids, eligible = data
    result = density_based_pruning(x, ids, centroids, eligible, target=100, neighbors=3)
    d_intra, d_inter = _brute_distances(x, ids, centroids, eligible, neighbors=3)
    np.testing.assert_allclose(result.d_intra, d_intra, rtol=1e-5)
    np.testing.assert_allclose(result.d_inter, d_inter, rtol=1e-5)
    np.testing.assert_allclose(result.complexity, d_intra * d_inter, rtol=1e-5)
    z = d_intra * d_inter / 0.5
    np.testing.assert_allclose(result.probabilities, np.exp(z) / np.exp(z).sum(), rtol=1e-5)
    # fewer other centroids than `neighbors`: all of them
    np.testing.assert_allclose(inter_cluster_distance(centroids, neighbors=50), _brute_distances(
        x, ids, centroids, eligible, neighbors=5)[1], rtol=1e-5)


@pytest.mark.parametrize("balance", [0.0, DEFAULT_BALANCE, 1.0])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_quotas_solve_upstreams_quadratic_program(balance, temperature):
    rng = np.random.default_rng(1)
    complexity = rng.uniform(0.01, 0.3, size=9)
    capacity = rng.integers(3, 60, size=9)
    target = int(0.4 * capacity.sum())
    quotas, probabilities = cluster_quotas(complexity, capacity, target, temperature=temperature, balance=balance)
    z = complexity / temperature
    np.testing.assert_allclose(probabilities, np.exp(z - z.max()) / np.exp(z - z.max()).sum())
    exact = _brute_qp(probabilities, capacity, target, balance)
    assert quotas.dtype == np.int64 and quotas.sum() == target
    assert np.all(quotas <= capacity) and np.all(quotas >= 0)
    assert np.all(np.abs(quotas - exact) < 1 + 1e-6)  # the QP's solution, rounded


def test_capped_clusters_pass_their_excess_to_the_others():
    complexity = np.array([1.0, 0.5, 0.5, 0.0])
    capacity = np.array([5, 100, 100, 100])
    quotas, p = cluster_quotas(complexity, capacity, target=120, temperature=0.1, balance=0.0)
    assert quotas.sum() == 120 and quotas[0] == 5  # wanted p[0] * 120 >> 5: capped
    # the excess is spread evenly (an equal shift) over the uncapped clusters, as upstream's QP does
    shift = (120 - 5 - p[1:].sum() * 120) / 3
    np.testing.assert_allclose(quotas[1:], p[1:] * 120 + shift, atol=1)


def test_more_complex_clusters_get_larger_quotas():
    complexity = np.linspace(0.02, 0.3, 8)
    capacity = np.full(8, 1_000)
    quotas, _ = cluster_quotas(complexity, capacity, target=2_000, temperature=0.05, balance=0.0)
    assert quotas.sum() == 2_000 and np.all(np.diff(quotas) > 0)
    # with upstream's floor (half the uniform share) the least complex clusters sit at the floor
    quotas, _ = cluster_quotas(complexity, capacity, target=2_000, temperature=0.05)
    floor = int(2_000 / 8 * DEFAULT_BALANCE)
    assert quotas.sum() == 2_000 and np.all(np.diff(quotas) >= 0) and quotas.min() == floor
    assert np.all(np.diff(quotas[quotas > floor]) > 0)


def test_empty_clusters_and_edge_targets():
    complexity = np.array([0.1, np.nan, 0.2])
    capacity = np.array([10, 0, 10])
    quotas, p = cluster_quotas(complexity, capacity, target=20)
    assert quotas.tolist() == [10, 0, 10] and p[1] == 0
    assert cluster_quotas(complexity, capacity, target=0)[0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="eligible rows"):
        cluster_quotas(complexity, capacity, target=21)
    # floors that cannot all be met are dropped instead of failing
    quotas, _ = cluster_quotas(np.zeros(50), np.full(50, 10), target=3, balance=0.0)
    assert quotas.sum() == 3


def test_keeps_the_quota_of_hardest_eligible_rows_per_cluster(data):
    x, ids, centroids, eligible = data
    result = density_based_pruning(x, ids, centroids, eligible, target=120)
    assert result.keep.dtype == bool and result.keep.sum() == 120
    assert not np.any(result.keep & ~eligible)
    c = _unit(centroids)
    for j in range(len(c)):
        members = [i for i in range(len(x)) if ids[i] == j and eligible[i]]
        assert result.capacity[j] == len(members)
        farthest_first = sorted(members, key=lambda i: (float(_unit(x[i : i + 1])[0] @ c[j]), i))
        expected = set(farthest_first[: result.quotas[j]])
        assert set(np.flatnonzero(result.keep & (ids == j))) == expected


def test_deterministic_and_independent_of_chunking(data, tmp_path):
    x, ids, centroids, eligible = data
    a = density_based_pruning(x, ids, centroids, eligible, target=150)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    for source, chunk in ((x, 7), (mm, 64), (iter([x[:100], x[100:]]), 33)):
        b = density_based_pruning(source, ids, centroids, eligible, target=150, chunk=chunk)
        assert np.array_equal(a.keep, b.keep) and np.array_equal(a.quotas, b.quotas)
    everything = density_based_pruning(x, ids, centroids, eligible, target=int(eligible.sum()))
    assert np.array_equal(everything.keep, eligible)


def test_rejects_bad_input(data):
    x, ids, centroids, eligible = data
    with pytest.raises(ValueError, match="eligible"):
        density_based_pruning(x, ids, centroids, eligible.astype(int), target=10)
    with pytest.raises(ValueError, match="cluster ids"):
        density_based_pruning(x, ids + 10, centroids, eligible, target=10)
    with pytest.raises(ValueError, match="rows"):
        density_based_pruning(x[:-1], ids, centroids, eligible, target=10)
