"""Variance Alignment Score (VAS) as plain numpy (no Dagster).

Reference: Wang et al. 2023, "Variance Alignment Score: A Simple But Tough-to-Beat Data Selection Method
for Multimodal Contrastive Learning":

- ``Sigma_target = (1/m) sum_j t_j t_j^T`` over the unit-norm image embeddings ``t_j`` of a target set
  (VAS(ImageNet-1k): ImageNet-1k's training images; VAS(traindata): the pool itself), an uncentred
  second-moment matrix (:func:`target_covariance`).
- ``VAS_i = <Sigma_target, x_i x_i^T> = x_i^T Sigma_target x_i`` for each unit-norm pool image embedding
  ``x_i`` (:func:`vas_scores`): how much of the target's variance lies along ``x_i``. The paper keeps
  the highest-VAS samples, usually among those a CLIP-score filter has kept first.

Both functions stream their input ``chunk`` rows at a time (a 2-d array, ``np.memmap`` included, or an
iterable of 2-d blocks, e.g. one per shard), so memory is ``chunk * d`` float64 plus the ``d x d`` matrix.
Rows are L2-normalised first (a no-op for CLIP embeddings, which are stored unit-norm; it undoes float16
rounding); zero rows stay zero and score 0. Arithmetic is float64 throughout.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from datacomp_assets.filtering.image_based import row_blocks

DEFAULT_CHUNK = 16_384
"""Rows per block: 16,384 x 768 float64 is ~100 MB."""


def _unit_blocks(data, chunk: int, width: int | None = None) -> Iterator[np.ndarray]:
    """float64 blocks of at most ``chunk`` unit-norm rows, all of one width (``width`` when given)."""
    if chunk < 1:
        raise ValueError("chunk must be positive")
    for block in row_blocks(data, chunk):
        # an iterable may hand over blocks bigger than `chunk`: split them too
        for start in range(0, block.shape[0], chunk):
            x = np.array(block[start : start + chunk], dtype=np.float64)
            if width is None:
                width = x.shape[1]
            elif x.shape[1] != width:
                raise ValueError(f"embedding width {x.shape[1]} != expected width {width}")
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            np.divide(x, norms, out=x, where=norms > 0)
            yield x


def target_covariance(target_embeddings, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """``(1/m) sum_j t_j t_j^T`` over the ``m`` unit-normalised target rows; ``(d, d)`` float64, symmetric."""
    total = None
    m = 0
    for t in _unit_blocks(target_embeddings, chunk):
        part = t.T @ t
        total = part if total is None else total + part
        m += t.shape[0]
    if m == 0:
        raise ValueError("no target embeddings")
    return total / m


def vas_scores(embeddings, sigma: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """``x_i^T sigma x_i`` for each unit-normalised row ``x_i``; float32 ``(n,)``, in row order."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"sigma must be a square (d, d) matrix, got shape {sigma.shape}")
    out = [
        np.einsum("ij,ij->i", x @ sigma, x).astype(np.float32)
        for x in _unit_blocks(embeddings, chunk, width=sigma.shape[0])
    ]
    if not out:
        return np.empty(0, dtype=np.float32)
    return np.concatenate(out)
