"""SemDeDup's array part (plain numpy; no Dagster): near-duplicate scores within k-means clusters.

Reference: Abbas et al. 2023, "SemDeDup: Data-efficient learning at web-scale through semantic
deduplication" (and upstream ``facebookresearch/SemDeDup``, ``semdedup.py``):

1. The pool's unit-norm CLIP image embeddings are clustered with k-means (the caller supplies the cluster
   id of every row; in this project :mod:`datacomp_assets.filtering.image_based` computes them).
2. Within a cluster, rows are ranked by cosine similarity to the cluster centroid, **least similar
   first**: in a group of near-duplicates SemDeDup keeps "the example with the lowest cosine similarity
   to the centroid" (upstream ``which_to_keep="hard"``). Ties are broken by row index (lowest first).
3. Each row's score is its highest cosine similarity to any row ranked **before** it in its cluster,
   dropped or not (upstream: the column max of the strictly upper-triangular pairwise similarity matrix). At threshold
   ``eps`` a row is dropped when that score is ``> 1 - eps``. The score does not depend on ``eps``, so one
   pass serves every threshold.

Choices where upstream leaves room:

- The centroid is the mean of the cluster's rows, normalised (for a spherical k-means that is the k-means
  centroid at convergence). A zero mean (e.g. two opposite rows) makes every similarity 0, so the
  ranking falls back to row index.
- Rows are re-normalised in float32 before any similarity, so float16 storage rounding cannot push two
  identical rows' cosine past 1; scores are clipped to ``[-1, 1]``. Hence ``eps = 0`` keeps every row.
- The first row of each cluster (nothing ranked before it) scores ``-1.0``, the lowest cosine. Upstream's
  zero-filled triangle gives 0 there and floors every score at 0; the two agree at every ``eps < 1``.

Memory: a cluster is processed whole, ``block`` rows at a time: at most ``m * d`` floats for a cluster
of ``m`` rows plus a ``block x m`` similarity block (``m x m`` when ``m <= block``). Real clusters hold
about 100-1,000 rows, so this is small; a huge cluster costs ``m * (d + block)`` floats, never ``m^2``.

Functions:

- :func:`semdedup_max_similarity` -- the score of every row (float32).
- :func:`semdedup_keep` -- keep-mask at a threshold ``eps``.
"""

from __future__ import annotations

import functools

import numpy as np

DEFAULT_CHUNK = 65_536
"""Rows gathered from the embeddings at once (whole clusters; a bigger cluster is gathered alone)."""

DEFAULT_BLOCK = 1_024
"""Rows of a cluster compared at once against the rows ranked before them."""

FIRST_IN_CLUSTER = -1.0
"""Score of a row with nothing ranked before it in its cluster."""


# ---------------------------------------------------------------- helpers


def _normalized_rows(x: np.ndarray) -> np.ndarray:
    """float32 copy of ``x`` with unit-norm rows; zero rows stay zero."""
    x = np.array(x, dtype=np.float32)  # always a copy: the caller's array (or memmap) is never written
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _cluster_bounds(cluster_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by cluster with one stable argsort: (order, starts, ends) with cluster ``c``'s rows at
    ``order[starts[c]:ends[c]]``, ascending by row index."""
    order = np.argsort(cluster_ids, kind="stable")
    breaks = np.flatnonzero(np.diff(cluster_ids[order])) + 1
    starts = np.concatenate([[0], breaks]).astype(np.int64)
    ends = np.concatenate([breaks, [cluster_ids.size]]).astype(np.int64)
    return order, starts, ends


@functools.lru_cache(maxsize=4)
def _upper(size: int) -> np.ndarray:
    """``(size, size)`` bool, True on and above the diagonal."""
    return np.triu(np.ones((size, size), dtype=bool))


def _cluster_scores(x: np.ndarray, block: int) -> np.ndarray:
    """Scores of one cluster's unit rows ``x`` (in row-index order); float32, aligned with ``x``."""
    m = x.shape[0]
    centroid = x.astype(np.float64).mean(axis=0)
    norm = np.linalg.norm(centroid)
    if norm > 0:
        centroid /= norm
    # A row-wise product-and-sum (not a matrix-vector product) gives identical rows identical
    # similarities, so exact duplicates tie and the tie goes to the lower row index.
    to_centroid = (x * centroid).sum(axis=1)
    rank = np.argsort(to_centroid, kind="stable")  # least similar to the centroid first
    xs = x[rank]
    best = np.empty(m, dtype=np.float32)
    for start in range(0, m, block):
        stop = min(start + block, m)
        sims = xs[start:stop] @ xs[:stop].T  # (stop - start, stop): these rows against every row up to them
        # Only rows ranked strictly earlier count: blank the diagonal block's upper triangle (j >= i), through one
        # cached mask (building triangle indices per cluster cost more than the product at ~128 rows a cluster).
        sims[:, start:][_upper(block)[: stop - start, : stop - start]] = -np.inf
        best[start:stop] = sims.max(axis=1)
    out = np.empty(m, dtype=np.float32)
    out[rank] = np.clip(best, FIRST_IN_CLUSTER, 1.0)  # -inf (first row) -> -1
    return out


# ---------------------------------------------------------------- public API


def semdedup_max_similarity(
    embeddings,
    cluster_ids,
    chunk: int = DEFAULT_CHUNK,
    block: int = DEFAULT_BLOCK,
) -> np.ndarray:
    """Highest cosine similarity of each row to a row ranked before it in its cluster; float32 ``(n,)``.

    ``embeddings``: ``(n, d)`` float32/float16 array of unit-norm image embeddings (``np.memmap`` works; it
    is read cluster by cluster, ``chunk`` rows at a time, in ascending row order within each gather).
    ``cluster_ids``: ``(n,)`` integer cluster of each row. See the module docstring for the ranking, the
    ``-1.0`` score of each cluster's first row and the memory bound.
    """
    if chunk < 1 or block < 1:
        raise ValueError("chunk and block must be positive")
    if getattr(embeddings, "ndim", None) != 2:
        raise ValueError(f"embeddings must be a 2-d array, got shape {getattr(embeddings, 'shape', None)}")
    cluster_ids = np.asarray(cluster_ids)
    if cluster_ids.ndim != 1 or cluster_ids.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"cluster_ids must have one id per embedding row: shape {cluster_ids.shape} "
            f"vs {embeddings.shape[0]} rows"
        )
    if not np.issubdtype(cluster_ids.dtype, np.integer):
        raise ValueError(f"cluster_ids must be integers, got {cluster_ids.dtype}")
    n = cluster_ids.size
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return out
    order, starts, ends = _cluster_bounds(cluster_ids)
    first = 0  # first cluster of the current gather
    while first < starts.size:
        # Gather whole clusters, up to `chunk` rows (at least one cluster, however large).
        last = max(first + 1, int(np.searchsorted(ends, starts[first] + chunk, side="right")))
        rows = order[starts[first] : ends[last - 1]]
        by_row = np.argsort(rows)  # read in ascending row order (friendly to a memmap)
        x = np.empty((rows.size, embeddings.shape[1]), dtype=np.float32)
        x[by_row] = _normalized_rows(embeddings[rows[by_row]])
        offset = starts[first]
        for c in range(first, last):
            part = slice(starts[c] - offset, ends[c] - offset)
            out[rows[part]] = _cluster_scores(x[part], block)
        first = last
    return out


def semdedup_keep(max_similarity, eps: float) -> np.ndarray:
    """Keep-mask at threshold ``eps``: True where ``max_similarity <= 1 - eps`` (upstream drops ``> 1 - eps``).

    ``eps = 0`` keeps every row; larger ``eps`` drops more (upstream explores about 0.01-0.1; DataComp's
    SemDeDup baseline here drops cosine > 0.95, i.e. ``eps = 0.05``).
    """
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return np.asarray(max_similarity) <= 1.0 - eps
