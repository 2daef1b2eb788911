"""negCLIPLoss and NormSim as plain numpy (no Dagster): two scores from CLIP embeddings alone.

Reference: Wang et al., NeurIPS 2024, "CLIPLoss and Norm-Based Data Selection Methods for Multimodal
Contrastive Learning" (arXiv 2405.19547), and upstream ``ypwang61/negCLIPLoss_NormSim``,
``baselines/vas2.py`` (``cal_new_clip_score``, ``cs_new_helper``, ``load_uids_with_cs_new``,
``cal_similarity_scores_norm``).

negCLIPLoss (:func:`negclip_loss`): the CLIP score minus the normalisation term of the CLIP loss, so a
pair whose image or text is similar to many *other* texts or images (a generic caption, a stock image)
ranks lower than a specific pair of the same CLIP score. For unit-norm image ``v_i`` and text ``t_i``::

    negCLIPLoss_i = <v_i, t_i> - (1/K) sum_k R_i(B_k)
    R_i(B) = (tau/2) * [ log sum_{j in B} exp(<v_i, t_j>/tau) + log sum_{j in B} exp(<v_j, t_i>/tau) ]

``B_k`` is the batch holding ``i`` in the k-th of ``K`` random partitions of the pool into batches. What
upstream does (and this module follows): the sums run over the *whole* batch, ``j = i`` included (the
softmax denominator of the CLIP loss); ``tau = 0.01`` (OpenAI CLIP's learned temperature; upstream uses
0.07 for DFN-P), batch size 32,768 (``load_uids_with_cs_new``'s default), ``K = 10`` (the ``an10`` runs at
medium; the command-line default is 1). Higher is better: upstream keeps the top fraction.

Where this module departs from upstream, and why:

- Upstream draws batches inside each metadata file (its workers take one ``.npz`` at a time, about 110k rows
  at medium) with an unseeded ``torch.randperm``. Here the batches are drawn over the whole input with
  ``np.random.default_rng(seed)``, so the score is reproducible and does not depend on how the pool is
  sharded (pass one file's rows to get upstream's per-file behaviour).
- Upstream's last batch of each file is the remainder (for 110k rows: three of 32,768 and one of about
  10k), and a smaller batch has a smaller normaliser, which lifts its members' scores. Here the
  ``ceil(n / batch_size)`` batches of a partition differ in size by at most one, so every sample is scored
  against a batch of (nearly) the same size; with ``n <= batch_size`` the one batch is the whole input.
- Rows are re-normalised in float32 first (a no-op for CLIP embeddings up to float16 rounding); zero rows
  stay zero. Log-sum-exps are computed stably (max-shifted), never ``exp(s/tau)`` raw, which overflows
  float32 once a similarity passes 0.887 at ``tau = 0.01``.

NormSim (:func:`normsim`): how close a pool image is to a target set (ImageNet-1k training images,
or the downstream tasks' training sets: the paper's "Target")::

    NormSim_p(x) = ( sum_{t in target} |<x, t>|^p )^(1/p),    NormSim_inf(x) = max_t |<x, t>|

on unit-norm image embeddings. Upstream computes ``torch.norm(x @ T.T, p, dim=1)``: a plain p-norm of the
similarity vector, absolute values included and no averaging over the target (a constant factor would not
change the ranking anyway); ``norm >= 100`` there means ``p = inf``. ``NormSim_2(x) = sqrt(m * VAS(x))`` for
a target of ``m`` rows, so ``p = 2`` is computed through the ``d x d`` second-moment matrix (one pass over
the target); other ``p`` compare every pool row with every target row, in blocks.

Memory: :func:`negclip_loss` holds one batch (``2 * batch_size * d`` floats) and a ``block x batch_size``
similarity block (two float32 buffers), never the pool; :func:`normsim` holds ``block * (d + target_block)``
floats. Compute is ``K * n * batch_size * d`` multiply-adds for negCLIPLoss and ``n * m * d`` for NormSim_inf:
upstream runs both on GPUs.
"""

from __future__ import annotations

import math

import numpy as np

from datacomp_assets.filtering.image_based import row_blocks

DEFAULT_BATCH_SIZE = 32_768
"""Upstream's batch size for negCLIPLoss (``load_uids_with_cs_new``)."""

DEFAULT_BATCHES = 10
"""Random partitions averaged (upstream's ``average_num`` in the medium runs, ``an10``)."""

DEFAULT_TEMPERATURE = 0.01
"""OpenAI CLIP's learned temperature (logit scale 100), upstream's value for OpenAI embeddings."""

DEFAULT_BLOCK = 2_048
"""Rows of a batch (negCLIPLoss) or of the pool (NormSim) compared at once."""

DEFAULT_TARGET_BLOCK = 8_192
"""Target rows compared at once by NormSim (p other than 2)."""

_SPAN = 1_024  # a slice-only array is read in spans of at most this many rows when gathering a batch


# ---------------------------------------------------------------- helpers


def _unit(x) -> np.ndarray:
    """float32 copy with unit-norm rows; zero rows stay zero."""
    x = np.array(x, dtype=np.float32)  # always a copy: the caller's array (or memmap) is never written
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _gather(array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` for ascending ``rows``: one fancy-indexed read where the array supports it (numpy,
    ``np.memmap``, ``features.ScratchArray``), else one slice of at most ``_SPAN`` rows per window of the array
    that holds a wanted row."""
    try:
        out = np.asarray(array[rows])
        if out.shape[0] == rows.size:
            return out
    except (TypeError, IndexError, KeyError, ValueError):
        pass
    parts = []
    windows = rows // _SPAN  # one slice per window of _SPAN rows that holds a wanted row
    for run in np.split(rows, np.flatnonzero(np.diff(windows)) + 1):
        span = np.asarray(array[int(run[0]) : int(run[-1]) + 1])
        parts.append(span[run - run[0]])
    return np.concatenate(parts) if parts else np.empty((0, array.shape[1]), dtype=np.float32)


def _check_pair(image_emb, text_emb) -> int:
    for name, x in (("image_emb", image_emb), ("text_emb", text_emb)):
        if len(getattr(x, "shape", ())) != 2:
            raise ValueError(f"{name} must be a 2-d array, got shape {getattr(x, 'shape', None)}")
    if tuple(image_emb.shape) != tuple(text_emb.shape):
        raise ValueError(f"image and text embeddings must have the same shape: {image_emb.shape} vs "
                         f"{text_emb.shape} (one text per image, same width)")
    return int(image_emb.shape[0])


def _batch_log_normalisers(v: np.ndarray, t: np.ndarray, temperature: float,
                           block: int) -> tuple[np.ndarray, np.ndarray]:
    """For one batch of unit rows: ``log sum_j exp(<v_i,t_j>/tau)`` (image i against every text) and
    ``log sum_j exp(<v_j,t_i>/tau)`` (text i against every image), float64, ``block`` image rows at a time.

    The text side is a running log-sum-exp over the image blocks (max and rescaled sum per column)."""
    m = v.shape[0]
    rows = np.empty(m, dtype=np.float64)
    col_max = np.full(m, -np.inf, dtype=np.float64)
    col_sum = np.zeros(m, dtype=np.float64)
    scale = np.float32(1.0 / temperature)
    for start in range(0, m, block):
        stop = min(start + block, m)
        logits = v[start:stop] @ t.T  # (stop - start, m) float32
        logits *= scale
        shifted = np.empty_like(logits)
        row_max = logits.max(axis=1, keepdims=True)
        np.exp(np.subtract(logits, row_max, out=shifted), out=shifted)
        rows[start:stop] = row_max[:, 0] + np.log(shifted.sum(axis=1, dtype=np.float64))
        new_max = np.maximum(col_max, logits.max(axis=0))
        np.exp(np.subtract(logits, new_max.astype(np.float32), out=shifted), out=shifted)
        col_sum = col_sum * np.exp(col_max - new_max) + shifted.sum(axis=0, dtype=np.float64)
        col_max = new_max
    return rows, col_max + np.log(col_sum)


# ---------------------------------------------------------------- negCLIPLoss


def negclip_loss(
    image_emb,
    text_emb,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batches: int = DEFAULT_BATCHES,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    block: int = DEFAULT_BLOCK,
) -> np.ndarray:
    """negCLIPLoss of every pair; float32 ``(n,)``, higher is better (see the module docstring).

    ``image_emb``, ``text_emb``: ``(n, d)`` float16/float32 CLIP embeddings of the same model, row ``i`` of
    each being pair ``i`` (numpy arrays, ``np.memmap``, or any array-like whose ``[a:b]`` returns an array:
    each batch's rows are read in ascending order, one batch at a time). ``batches`` random partitions into
    ``ceil(n / batch_size)`` batches of (nearly) equal size are drawn from ``np.random.default_rng(seed)``; a
    sample's normalisation term is averaged over them. The same inputs and seed give the same scores,
    whatever ``block`` (which only bounds memory: ``block x batch_size`` similarities at a time).
    """
    n = _check_pair(image_emb, text_emb)
    if batch_size < 1 or batches < 1 or block < 1:
        raise ValueError("batch_size, batches and block must be positive")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if n == 0:
        return np.empty(0, dtype=np.float32)
    rng = np.random.default_rng(seed)
    n_batches = math.ceil(n / batch_size)
    clip = np.empty(n, dtype=np.float64)
    normaliser = np.zeros(n, dtype=np.float64)
    for k in range(batches):
        order = rng.permutation(n)
        for members in np.array_split(order, n_batches):
            rows = np.sort(members)  # ascending reads are what a memory map serves best
            v, t = _unit(_gather(image_emb, rows)), _unit(_gather(text_emb, rows))
            if k == 0:  # the CLIP score does not depend on the partition: take it from the first
                clip[rows] = np.einsum("ij,ij->i", v, t, dtype=np.float64)
            image_side, text_side = _batch_log_normalisers(v, t, temperature, block)
            normaliser[rows] += image_side + text_side
    return (clip - (temperature / 2.0) * normaliser / batches).astype(np.float32)


# ---------------------------------------------------------------- NormSim


def _check_p(p: float) -> float:
    p = float(p)
    if not (p == np.inf or (np.isfinite(p) and p >= 1)):
        raise ValueError(f"p must be a number >= 1 or inf, got {p}")
    return p


def _unit_blocks(data, chunk: int, width: int | None = None):
    """float32 unit-row blocks of at most ``chunk`` rows, all of one width."""
    for block in row_blocks(data, chunk):
        for start in range(0, block.shape[0], chunk):  # an iterable may hand over bigger blocks
            x = _unit(block[start : start + chunk])
            if width is None:
                width = x.shape[1]
            elif x.shape[1] != width:
                raise ValueError(f"embedding width {x.shape[1]} != expected width {width}")
            yield x


def _normsim_2(image_emb, target_emb, block: int) -> np.ndarray:
    """``sqrt(x^T (T^T T) x)``: the 2-norm of ``T x`` through the ``d x d`` matrix, in float64."""
    second = None
    m = 0
    for t in _unit_blocks(target_emb, block):
        t = t.astype(np.float64)
        second = t.T @ t if second is None else second + t.T @ t
        m += t.shape[0]
    if m == 0:
        raise ValueError("no target embeddings")
    out = [np.sqrt(np.maximum(np.einsum("ij,ij->i", x.astype(np.float64) @ second, x), 0.0)).astype(np.float32)
           for x in _unit_blocks(image_emb, block, width=second.shape[0])]
    return np.concatenate(out) if out else np.empty(0, dtype=np.float32)


def normsim(
    image_emb,
    target_emb,
    p: float = np.inf,
    block: int = DEFAULT_BLOCK,
    target_block: int = DEFAULT_TARGET_BLOCK,
) -> np.ndarray:
    """NormSim_p of every pool image against the target images; float32 ``(n,)``, higher is closer.

    ``image_emb``: ``(n, d)`` unit-norm image embeddings (array, ``np.memmap``, or an iterable of blocks),
    read ``block`` rows at a time. ``target_emb``: ``(m, d)`` image embeddings of the target set, by the same
    model. ``p = inf`` (the paper's best) is ``max_t |<x, t>|``; any ``p >= 1`` is
    ``(sum_t |<x, t>|^p)^(1/p)``. For ``p != 2`` the target is read once per pool block, so it must be an
    array (``np.memmap`` works); ``p = 2`` reads it once and also takes an iterable.
    """
    p = _check_p(p)
    if block < 1 or target_block < 1:
        raise ValueError("block and target_block must be positive")
    if p == 2:
        return _normsim_2(image_emb, target_emb, block)
    if not (hasattr(target_emb, "shape") and hasattr(target_emb, "__getitem__")):
        raise TypeError("target_emb must be an array (it is read once per pool block) unless p == 2")
    if len(target_emb.shape) != 2 or target_emb.shape[0] == 0:
        raise ValueError(f"target_emb must be a non-empty 2-d array, got shape {target_emb.shape}")
    width = int(target_emb.shape[1])
    out = []
    for x in _unit_blocks(image_emb, block, width=width):
        acc = np.zeros(x.shape[0], dtype=np.float64)  # running max (p = inf) or sum of |s|^p
        for t in _unit_blocks(target_emb, target_block, width=width):
            sims = np.abs(x @ t.T)
            if p == np.inf:
                np.maximum(acc, sims.max(axis=1), out=acc)
            else:
                acc += (sims.astype(np.float64) ** p).sum(axis=1)
        out.append((acc if p == np.inf else acc ** (1.0 / p)).astype(np.float32))
    return np.concatenate(out) if out else np.empty(0, dtype=np.float32)
