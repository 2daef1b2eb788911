"""Density-based pruning (DBP) as plain numpy (no Dagster): per-cluster quotas from concept complexity,
then the hardest samples of each cluster.

Reference: Abbas, Rusak et al., ICLR 2024, "Effective pruning of web-scale datasets based on complexity of
concept clusters" (arXiv 2401.04578), and upstream ``amro-kamal/effective_pruning`` (``prune.py``,
``compute_centroid_distances.py``, ``compute_avg_dist_to_cluster_centroid.py``). The steps, after SemDeDup
(the caller's ``eligible`` mask) and k-means of the embeddings (the caller's cluster ids and centroids,
e.g. :mod:`datacomp_assets.filtering.image_based`):

1. ``d_intra[j]``: mean cosine distance ``1 - cos(x, c_j)`` of cluster ``j``'s eligible members to its
   centroid (upstream: the mean of SemDeDup's ``distance_to_centroid`` over the deduplicated cluster).
2. ``d_inter[j]``: mean cosine distance of centroid ``j`` to its ``neighbors`` nearest other centroids
   (upstream: ``faiss.IndexFlatIP`` over the centroids, ``mean(1 - D[:, 1:])``, ``num_NNs = 20``).
3. Complexity ``C_j = d_intra[j] * d_inter[j]``; ``p = softmax(C / temperature)`` (upstream's
   ``--temperature`` default 0.5).
4. Quotas: upstream solves the quadratic program ``min ||x - p * target||^2`` subject to
   ``sum(x) = target`` and ``lb_j <= x_j <= ub_j`` (``pruning_qp``, OSQP), with ``ub_j`` the cluster's size
   and ``lb_j = min(min_samples, size_j - 1)``, ``min_samples = int(target / k * cls_bal_ratio)``
   (``--cls-bal-ratio`` default 0.5; 1 when it is 0). Its solution is ``x_j = clip(p_j * target + lam,
   lb_j, ub_j)`` for the one shift ``lam`` that makes the sum right: a capped cluster's excess is spread
   evenly over the clusters below their caps. :func:`cluster_quotas` finds ``lam`` by bisection, exactly,
   without a QP solver.
5. Within each cluster keep the quota's hardest samples: the farthest from the centroid (upstream
   ``--which-to-keep hard``, SemDeDup's clusters sorted by similarity to the centroid, least similar first).

Choices where upstream leaves room:

- Centroids are normalised before any cosine (upstream's come from a spherical k-means; the image_based
  k-means here gives plain means). A zero centroid makes every cosine 0.
- Quotas are integers that sum to ``target`` exactly: the QP solution is floored, then the remaining units
  go to the largest fractional parts (ties: lowest cluster id). Upstream rounds with ``np.rint``, which can
  miss the target by a few samples.
- Only clusters with an eligible member take part (upstream's clusters are all non-empty): they make the
  softmax and ``k`` in ``min_samples``; an empty cluster's quota is 0. When the floors ``lb`` add up to more
  than ``target`` (a tiny target over many clusters) they are dropped to 0 rather than failing.
- With one centroid there are no neighbours: ``d_inter`` is 1.
- Ties in the distance to the centroid go to the lower row index.

Memory: the embeddings are read once, ``chunk`` rows at a time (arrays, ``np.memmap``, or an iterable of
blocks); the module holds one float32 similarity per row, a sort of the eligible rows, and a
``block x k`` block of centroid similarities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datacomp_assets.filtering.image_based import row_blocks

DEFAULT_TEMPERATURE = 0.5
"""Softmax temperature over the complexities (upstream ``prune.py --temperature`` default)."""

DEFAULT_NEIGHBORS = 20
"""Nearest other centroids averaged into ``d_inter`` (upstream ``--num_NNs`` default)."""

DEFAULT_BALANCE = 0.5
"""Share of the uniform quota ``target / k`` every cluster keeps at least (upstream ``--cls-bal-ratio``)."""

DEFAULT_CHUNK = 65_536


@dataclass(frozen=True)
class DensityPruning:
    keep: np.ndarray           # bool (n,): the selected rows
    quotas: np.ndarray         # int64 (k,): rows kept per cluster; sums to the target
    capacity: np.ndarray       # int64 (k,): eligible rows per cluster
    probabilities: np.ndarray  # float64 (k,): softmax(C / temperature); 0 for clusters without eligible rows
    complexity: np.ndarray     # float64 (k,): d_intra * d_inter; NaN for clusters without eligible rows
    d_intra: np.ndarray        # float64 (k,)
    d_inter: np.ndarray        # float64 (k,)


# ---------------------------------------------------------------- distances


def _unit_rows(x) -> np.ndarray:
    x = np.array(x, dtype=np.float32)  # a copy: the caller's array is never written
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def centroid_similarity(embeddings, cluster_ids, centroids, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Cosine of each row to the (normalised) centroid of its cluster; float32 ``(n,)``.

    ``embeddings`` is read ``chunk`` rows at a time (an array, ``np.memmap``, or an iterable of blocks in row
    order); ``cluster_ids`` gives each row's cluster, an index into ``centroids``."""
    if chunk < 1:
        raise ValueError("chunk must be positive")
    cluster_ids = np.asarray(cluster_ids)
    c = _unit_rows(centroids)
    out = np.empty(cluster_ids.size, dtype=np.float32)
    start = 0
    for block in row_blocks(embeddings, chunk):
        for part in range(0, block.shape[0], chunk):
            x = _unit_rows(block[part : part + chunk])
            if x.shape[1] != c.shape[1]:
                raise ValueError(f"embedding width {x.shape[1]} != centroid width {c.shape[1]}")
            stop = start + x.shape[0]
            if stop > out.size:
                raise ValueError(f"more embedding rows than cluster ids ({out.size})")
            # row-wise product with each row's own centroid (not a full (rows x k) product)
            out[start:stop] = np.einsum("ij,ij->i", x, c[cluster_ids[start:stop]])
            start = stop
    if start != out.size:
        raise ValueError(f"{start} embedding rows for {out.size} cluster ids")
    return out


def intra_cluster_distance(similarity, cluster_ids, eligible, k: int) -> np.ndarray:
    """``d_intra``: mean ``1 - cos`` to the centroid over each cluster's eligible rows; NaN where none."""
    similarity, cluster_ids, eligible = np.asarray(similarity), np.asarray(cluster_ids), np.asarray(eligible)
    ids = cluster_ids[eligible]
    total = np.bincount(ids, weights=1.0 - similarity[eligible].astype(np.float64), minlength=k)
    count = np.bincount(ids, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def inter_cluster_distance(centroids, neighbors: int = DEFAULT_NEIGHBORS, block: int = 1_024) -> np.ndarray:
    """``d_inter``: mean ``1 - cos`` of each centroid to its ``neighbors`` most similar other centroids
    (fewer when there are fewer other centroids; 1.0 when there is none); float64 ``(k,)``."""
    if neighbors < 1 or block < 1:
        raise ValueError("neighbors and block must be positive")
    c = _unit_rows(centroids)
    k = c.shape[0]
    nearest = min(neighbors, k - 1)
    if nearest == 0:
        return np.ones(k, dtype=np.float64)
    out = np.empty(k, dtype=np.float64)
    for start in range(0, k, block):
        stop = min(start + block, k)
        sims = c[start:stop] @ c.T  # (stop - start, k)
        sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # never its own neighbour
        top = -np.partition(-sims, nearest - 1, axis=1)[:, :nearest]  # each row's largest similarities
        out[start:stop] = (1.0 - top.astype(np.float64)).mean(axis=1)
    return out


# ---------------------------------------------------------------- quotas


def cluster_quotas(
    complexity,
    capacity,
    target: int,
    temperature: float = DEFAULT_TEMPERATURE,
    balance: float = DEFAULT_BALANCE,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows to keep per cluster, and the softmax they come from: ``(quotas int64, probabilities float64)``.

    ``quotas`` solves upstream's QP (module docstring, step 4): as close to ``softmax(C / temperature) *
    target`` as the bounds allow, each within ``[min(floor, capacity - 1), capacity]`` with ``floor =
    int(target / k * balance)`` (1 when ``balance`` is 0) over the ``k`` clusters with ``capacity > 0``, and
    summing to ``target`` exactly. Clusters with ``capacity == 0`` get 0 and probability 0.
    """
    complexity = np.asarray(complexity, dtype=np.float64)
    capacity = np.asarray(capacity, dtype=np.int64)
    if complexity.shape != capacity.shape or complexity.ndim != 1:
        raise ValueError(f"complexity and capacity must be 1-d of one length: {complexity.shape} vs {capacity.shape}")
    if np.any(capacity < 0):
        raise ValueError("capacity must be >= 0")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if not 0 <= balance <= 1:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    target = int(target)
    if not 0 <= target <= capacity.sum():
        raise ValueError(f"target {target} must be between 0 and the {int(capacity.sum())} eligible rows")
    live = capacity > 0
    probabilities = np.zeros(capacity.size, dtype=np.float64)
    quotas = np.zeros(capacity.size, dtype=np.int64)
    if target == 0:
        return quotas, probabilities
    c = complexity[live]
    c = np.where(np.isfinite(c), c, np.nanmean(c) if np.isfinite(c).any() else 0.0)  # upstream: NaN -> mean
    z = (c - c.max()) / temperature
    probabilities[live] = np.exp(z) / np.exp(z).sum()

    k = int(live.sum())
    floor = int(target / k * balance) if balance > 0 else 1
    ub = capacity[live].astype(np.float64)
    lb = np.clip(np.minimum(floor, capacity[live] - 1), 0, None).astype(np.float64)
    if lb.sum() > target:  # floors that cannot all be met: drop them
        lb[:] = 0.0
    ideal = probabilities[live] * target
    # sum(clip(ideal + lam, lb, ub)) grows with lam from sum(lb) to sum(ub): bisect for the lam hitting target
    lo, hi = float(np.min(lb - ideal)), float(np.max(ub - ideal))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.clip(ideal + mid, lb, ub).sum() < target:
            lo = mid
        else:
            hi = mid
    x = np.clip(ideal + hi, lb, ub)
    whole = np.floor(x + 1e-9).astype(np.int64)  # the epsilon keeps an exact integer from flooring below
    whole = np.minimum(whole, capacity[live])
    missing = target - int(whole.sum())
    if missing > 0:  # the remaining units to the largest fractional parts, among clusters below their cap
        room = np.flatnonzero(whole < capacity[live])
        order = room[np.lexsort((room, -(x[room] - whole[room])))]
        whole[order[:missing]] += 1
    elif missing < 0:  # float rounding gave too many: take back from the smallest fractional parts above lb
        room = np.flatnonzero(whole > lb)
        order = room[np.lexsort((room, x[room] - whole[room]))]
        whole[order[:-missing]] -= 1
    quotas[live] = whole
    assert int(quotas.sum()) == target
    return quotas, probabilities


# ---------------------------------------------------------------- the whole method


def density_based_pruning(
    embeddings,
    cluster_ids,
    centroids,
    eligible,
    target: int,
    temperature: float = DEFAULT_TEMPERATURE,
    neighbors: int = DEFAULT_NEIGHBORS,
    balance: float = DEFAULT_BALANCE,
    chunk: int = DEFAULT_CHUNK,
) -> DensityPruning:
    """Keep ``target`` of the ``eligible`` rows: per-cluster quotas from complexity, the hardest rows of each.

    ``embeddings``: ``(n, d)`` embeddings (array, ``np.memmap``, or an iterable of blocks); ``cluster_ids``:
    ``(n,)`` cluster of each row, an index into ``centroids`` ``(k, d)``; ``eligible``: ``(n,)`` bool, the rows
    that may be kept (those SemDeDup kept). Returns the keep mask (a subset of ``eligible``, exactly ``target``
    rows) with the quotas and the per-cluster numbers behind them.
    """
    cluster_ids = np.asarray(cluster_ids)
    eligible = np.asarray(eligible)
    centroids = np.asarray(centroids)
    if cluster_ids.ndim != 1 or not np.issubdtype(cluster_ids.dtype, np.integer):
        raise ValueError(f"cluster_ids must be a 1-d integer array, got {cluster_ids.dtype} {cluster_ids.shape}")
    if eligible.shape != cluster_ids.shape or eligible.dtype != bool:
        raise ValueError(f"eligible must be a bool array with one entry per row, got {eligible.dtype} {eligible.shape}")
    if centroids.ndim != 2 or centroids.shape[0] == 0:
        raise ValueError(f"centroids must be a non-empty (k, d) array, got shape {centroids.shape}")
    k = centroids.shape[0]
    if cluster_ids.size and (cluster_ids.min() < 0 or cluster_ids.max() >= k):
        raise ValueError(f"cluster ids must be in [0, {k})")
    similarity = centroid_similarity(embeddings, cluster_ids, centroids, chunk)
    d_intra = intra_cluster_distance(similarity, cluster_ids, eligible, k)
    d_inter = inter_cluster_distance(centroids, neighbors)
    complexity = d_intra * d_inter
    capacity = np.bincount(cluster_ids[eligible], minlength=k).astype(np.int64)
    quotas, probabilities = cluster_quotas(complexity, capacity, target, temperature, balance)

    # Hardest first: eligible rows by cluster, then similarity to the centroid ascending, then row index.
    rows = np.flatnonzero(eligible)
    order = np.lexsort((rows, similarity[rows], cluster_ids[rows]))
    ranked_rows, ranked_clusters = rows[order], cluster_ids[rows][order]
    rank = np.arange(ranked_rows.size) - np.searchsorted(ranked_clusters, ranked_clusters, side="left")
    keep = np.zeros(cluster_ids.size, dtype=bool)
    keep[ranked_rows[rank < quotas[ranked_clusters]]] = True
    return DensityPruning(keep, quotas, capacity, probabilities, complexity, d_intra, d_inter)
