"""The array part of DataComp's image-based filter (plain numpy + faiss; no Dagster).

Upstream baseline (``baselines/image_based_clustering.py`` and ``baselines/apply_filter.py``):

1. k-means of the pool's L/14 image embeddings (unit-norm CLIP embeddings of the caption-filtered pool,
   optionally a random sample of it) into 100,000 clusters: faiss, 20 iterations, seed 0, **L2** k-means
   (not spherical: centroids are plain means and are *not* re-normalised), with faiss' own
   sub-sampling switched off (upstream sets ``max_points_per_centroid = 10_000_000``).
2. Each pool sample is assigned to the centroid with the largest **inner product** (upstream: an einsum
   and argmax; here ``faiss.IndexFlatIP`` over the centroids). Because the centroids are not unit-norm,
   this is not the same assignment as nearest-by-L2; we keep the upstream rule.
3. The target set (ImageNet-1k training images at the real scales; ImageNet-21k in the variant) is
   assigned the same way; a pool sample is kept when its centroid is one of the targets' centroids.

The caption pre-filter (English, > 1 fastText token, > 5 characters) is applied by the caller
(``features.compute_pool_features`` trains the centroids on the rows that pass it).

Functions:

- :func:`train_centroids` -- k-means, optionally on a seeded uniform sample of at most ``max_points`` rows.
- :func:`assign` -- nearest centroid by inner product, in chunks.
- :func:`target_clusters` -- unique centroid ids of the target embeddings.
- :func:`image_based_mask` -- keep-mask of the pool.
- :func:`proportional_k` -- the cluster count for a pool size (100,000 at every real scale).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

REFERENCE_K = 100_000
"""Clusters used upstream at every real scale (small to xlarge)."""

REFERENCE_POOL = 12_800_000
"""Pool size of ``small``, the smallest real scale; 100,000 clusters there is ~128 pool samples a cluster."""

MIN_K = 16
"""Floor for :func:`proportional_k` on miniature pools."""

DEFAULT_CHUNK = 65_536

# faiss' k-means silently trains on at most ``max_points_per_centroid * k`` points (default 256 per
# centroid) drawn with its own generator. Upstream disables that; so do we, and sub-sample explicitly
# (and reproducibly) through ``max_points`` instead.
_NO_FAISS_SUBSAMPLING = 10_000_000


# ---------------------------------------------------------------- helpers


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in place when ``x`` is already C-contiguous float32; zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    for start in range(0, len(x), DEFAULT_CHUNK):  # in blocks: np.linalg.norm's x * x is a copy of its input
        block = x[start:start + DEFAULT_CHUNK]
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        np.divide(block, norms, out=block, where=norms > 0)
    return x


def row_blocks(data, chunk: int) -> Iterator[np.ndarray]:
    """Yield 2-d row blocks of an array (sliced ``chunk`` rows at a time) or of an iterable of blocks."""
    if hasattr(data, "shape") and hasattr(data, "__getitem__"):
        if data.ndim != 2:
            raise ValueError(f"embeddings must be 2-d, got shape {data.shape}")
        for start in range(0, data.shape[0], chunk):
            yield np.asarray(data[start : start + chunk])
        return
    if not isinstance(data, Iterable):
        raise TypeError("expected a 2-d array or an iterable of 2-d arrays")
    for block in data:
        block = np.asarray(block)
        if block.ndim == 1:  # a single embedding
            block = block[None, :]
        if block.ndim != 2:
            raise ValueError(f"embedding blocks must be 2-d, got shape {block.shape}")
        yield block


def _sample_rows(data, max_points: int | None, seed: int, chunk: int = DEFAULT_CHUNK) -> tuple[np.ndarray, int]:
    """Collect the training rows: all of them, or a seeded uniform sample of ``max_points`` rows.

    The sample is a *bottom-k* sample: every row gets an independent uniform key from
    ``np.random.default_rng(seed)`` (drawn in row order) and the ``max_points`` rows with the smallest keys
    are kept, in their original order. That is a uniform sample without replacement, computed in one pass
    with memory bounded by ``max_points + chunk`` rows, and it does not depend on how the data is split
    into blocks (an array and any chunking of it give the same sample). Returns (rows, total row count).
    """
    if max_points is not None and max_points < 1:
        raise ValueError("max_points must be positive")
    rng = np.random.default_rng(seed)
    if max_points is not None and hasattr(data, "shape") and hasattr(data, "__getitem__") and len(data.shape) == 2 \
            and data.shape[0] > max_points:
        # An array: the same keys in one draw (a generator's draws concatenate), then only the chosen rows are read,
        # ascending, instead of every row (8 bytes a row of keys; the k-means is the same).
        n = int(data.shape[0])
        keys = rng.random(n)
        top = np.sort(np.argpartition(keys, max_points - 1)[:max_points])
        rows = np.empty((max_points, data.shape[1]), dtype=np.float32)
        for start in range(0, max_points, chunk):
            part = top[start:start + chunk]
            rows[start:start + len(part)] = np.asarray(data[part])
        return rows, n
    if max_points is None:
        blocks = [np.asarray(block, dtype=np.float32) for block in row_blocks(data, chunk)]
        if not blocks:
            raise ValueError("no embeddings to train on")
        _check_widths(blocks[0].shape[1], blocks)
        return np.concatenate(blocks), sum(len(b) for b in blocks)
    # One buffer, kept in row order: the sample so far, then the newest block's candidates. When it holds
    # more than max_points rows it is compacted in place, so memory stays at about (max_points + chunk) rows.
    rows: np.ndarray | None = None
    keys = np.empty(0, dtype=np.float64)
    n = m = 0
    for block in row_blocks(data, chunk):
        if rows is None:
            rows = np.empty((max_points + max(chunk, len(block)), block.shape[1]), dtype=np.float32)
        _check_widths(rows.shape[1], [block])
        block_keys = rng.random(len(block))
        n += len(block)
        if m >= max_points:  # only rows beating the current largest kept key can enter
            beats = block_keys < keys.max()
            block, block_keys = block[beats], block_keys[beats]
        if m + len(block) > len(rows):
            rows = np.concatenate([rows[:m], np.empty((len(block), rows.shape[1]), np.float32)])
        rows[m:m + len(block)] = block
        keys = np.concatenate([keys, block_keys])
        m += len(block)
        if m > max_points:
            top = np.sort(np.argpartition(keys, max_points - 1)[:max_points])
            for start in range(0, max_points, chunk):  # in place: top is increasing and top[i] >= i
                part = top[start:start + chunk]
                rows[start:start + len(part)] = rows[part]
            keys, m = keys[top], max_points
    if rows is None:
        raise ValueError("no embeddings to train on")
    return rows[:m], n


def _check_widths(d: int, blocks) -> None:
    for block in blocks:
        if block.shape[1] != d:
            raise ValueError(f"inconsistent embedding width: {block.shape[1]} != {d}")


# ---------------------------------------------------------------- public API


def train_centroids(
    embeddings,
    k: int,
    niter: int = 20,
    seed: int = 0,
    max_points: int | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> np.ndarray:
    """Faiss L2 k-means of the L2-normalised embeddings; returns ``(k, d)`` float32 centroids.

    ``embeddings`` is a 2-d array (``np.memmap`` works) or an iterable of 2-d blocks (for example one block
    per shard). Rows are L2-normalised first (a no-op for CLIP embeddings, which are stored unit-norm).

    Sampling: with ``max_points=None`` every row is used (an iterable is materialised in full, as
    upstream does). When there are more than ``max_points`` rows, k-means is trained on a uniform sample
    of exactly ``max_points`` rows, chosen reproducibly from ``seed`` in one streaming pass that never
    holds more than ``max_points + chunk`` rows (see :func:`_sample_rows`). This plays the role of
    upstream's ``--sample_ratio`` (which it needs "because of memory constraint"), but with a fixed size
    and a seeded draw. faiss' own hidden sub-sampling (``max_points_per_centroid``) is disabled, as
    upstream, so the rows given are the rows trained on.

    faiss k-means: ``faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=False)``; the centroids are
    plain (not re-normalised) means, as upstream.
    """
    import faiss

    if k < 1:
        raise ValueError("k must be positive")
    rows, _ = _sample_rows(embeddings, max_points, seed, chunk)  # always a fresh array
    x = _l2_normalize(rows)
    n, d = x.shape
    if n < k:
        raise ValueError(f"cannot train {k} centroids on {n} points")
    kmeans = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        spherical=False,
        verbose=False,
        max_points_per_centroid=_NO_FAISS_SUBSAMPLING,
        gpu=_faiss_gpus(faiss),  # same centroids format either way; a faiss-cpu build reports 0 GPUs
    )
    kmeans.train(x)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32).reshape(k, d)


def _faiss_gpus(faiss) -> int | bool:
    """Every GPU faiss can use (faiss-gpu on a CUDA machine), or False for the CPU."""
    count = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return count if count > 0 else False


def _ip_index(centroids: np.ndarray):
    import faiss

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError(f"centroids must be a non-empty 2-d array, got shape {c.shape}")
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    return index


def assign(embeddings, centroids: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Id of the centroid with the largest inner product, for each row; int64, shape ``(n,)``.

    Searched ``chunk`` rows at a time with ``faiss.IndexFlatIP`` (memory ~ ``chunk * (d + k)`` floats), so
    a memory-mapped pool never has to be loaded whole. ``embeddings`` may also be an iterable of blocks.
    Rows are not re-normalised: scaling a row by a positive number does not change its argmax.
    """
    if chunk < 1:
        raise ValueError("chunk must be positive")
    index = _ip_index(centroids)
    d = index.d
    out: list[np.ndarray] = []
    for block in row_blocks(embeddings, chunk):
        # an iterable may hand over blocks bigger than `chunk`: split them too
        for start in range(0, block.shape[0], chunk):
            part = np.ascontiguousarray(block[start : start + chunk], dtype=np.float32)
            if part.shape[1] != d:
                raise ValueError(f"embedding width {part.shape[1]} != centroid width {d}")
            if part.shape[0] == 0:
                continue
            _, labels = index.search(part, 1)
            out.append(labels[:, 0].astype(np.int64, copy=False))
    if not out:
        return np.empty(0, dtype=np.int64)
    return np.concatenate(out)


def target_clusters(target_embeddings, centroids: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Sorted unique ids (int64) of the centroids nearest (by inner product) to the target embeddings."""
    return np.unique(assign(target_embeddings, centroids, chunk=chunk))


def image_based_mask(pool_cluster_ids: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
    """True where a pool sample's centroid is one of the target centroids."""
    return np.isin(np.asarray(pool_cluster_ids), np.asarray(target_ids))


def proportional_k(
    pool_size: int,
    reference_k: int = REFERENCE_K,
    reference_pool: int = REFERENCE_POOL,
    floor: int = MIN_K,
) -> int:
    """Number of k-means clusters for a pool of ``pool_size`` samples.

    At every real scale (``pool_size >= reference_pool``, i.e. small 12.8M up to xlarge 12.8B) this is
    upstream's fixed ``reference_k`` = 100,000. Below that (the miniature ``tiny`` scale) the count is
    scaled to keep small's density of ~128 pool samples per cluster,
    ``round(pool_size * reference_k / reference_pool)``, with a floor of ``floor`` clusters and never more
    than ``pool_size``. For tiny's pool metadata (18,148 samples after the download and the safety steps,
    at the default web) that is 142 clusters.

    Why small and not xlarge as the reference: small is where 100,000 clusters is densest (128 samples a
    cluster; xlarge has 128,000), the scale nearest to tiny, and the density that keeps each cluster a
    meaningful group (faiss itself warns below 39 training points per centroid). Scaling from xlarge
    would give 0.16 clusters for tiny, i.e. just the floor. The floor keeps the filter from collapsing
    into "keep everything" on very small pools.
    """
    if pool_size < 1:
        raise ValueError("pool_size must be positive")
    if pool_size >= reference_pool:
        return int(reference_k)
    k = int(round(pool_size * reference_k / reference_pool))
    return int(min(pool_size, max(floor, k)))
