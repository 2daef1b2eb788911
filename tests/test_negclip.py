"""negCLIPLoss and NormSim: checked against brute force (explicit loops, scipy's logsumexp) and on the
behaviour a user relies on (generic pairs rank below specific ones; images near the target rank first)."""

import math

import numpy as np
import pytest
from scipy.special import logsumexp

from datacomp_assets.filtering import negclip
from datacomp_assets.filtering.negclip import negclip_loss, normsim

D = 16
TAU = 0.05  # larger than OpenAI's 0.01 so random embeddings give non-degenerate softmaxes


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pairs(n, seed=0, d=D):
    rng = np.random.default_rng(seed)
    v = _unit(rng.normal(size=(n, d)))
    t = _unit(v + 0.8 * rng.normal(size=(n, d)))  # texts loosely aligned with their images
    return v.astype(np.float32), t.astype(np.float32)


def _brute_force(v, t, partitions, tau):
    """The paper's formula with explicit loops: for each partition and each batch, the full similarity matrix."""
    v, t = _unit(v), _unit(t)
    n = len(v)
    out = np.zeros(n)
    for partition in partitions:
        for batch in partition:
            sims = v[batch] @ t[batch].T / tau
            for a, i in enumerate(batch):
                r = (tau / 2) * (logsumexp(sims[a, :]) + logsumexp(sims[:, a]))
                out[i] += (v[i] @ t[i]) - r
    return out / len(partitions)


def _partitions(n, batch_size, batches, seed):
    """The partitions negclip_loss draws: a permutation per partition, split into equal-size batches."""
    rng = np.random.default_rng(seed)
    return [np.array_split(rng.permutation(n), math.ceil(n / batch_size)) for _ in range(batches)]


def test_one_batch_equals_the_formula():
    v, t = _pairs(60)
    got = negclip_loss(v, t, batch_size=64, batches=1, temperature=TAU)
    assert got.dtype == np.float32 and got.shape == (60,)
    np.testing.assert_allclose(got, _brute_force(v, t, [[np.arange(60)]], TAU), rtol=0, atol=2e-5)


def test_random_partitions_equal_the_formula():
    v, t = _pairs(103, seed=1)
    got = negclip_loss(v, t, batch_size=25, batches=4, temperature=TAU, seed=7, block=6)
    parts = _partitions(103, 25, 4, seed=7)
    # every sample once per partition, batches of nearly equal size (no short last batch)
    for partition in parts:
        assert sorted(np.concatenate(partition)) == list(range(103))
        assert {len(b) for b in partition} <= {20, 21}
    np.testing.assert_allclose(got, _brute_force(v, t, parts, TAU), rtol=0, atol=2e-5)


def test_deterministic_in_the_seed_and_independent_of_block():
    v, t = _pairs(90, seed=2)
    a = negclip_loss(v, t, batch_size=20, batches=3, temperature=TAU, seed=3)
    assert np.array_equal(a, negclip_loss(v, t, batch_size=20, batches=3, temperature=TAU, seed=3))
    np.testing.assert_allclose(a, negclip_loss(v, t, batch_size=20, batches=3, temperature=TAU, seed=3, block=7),
                               rtol=0, atol=1e-6)
    assert not np.allclose(a, negclip_loss(v, t, batch_size=20, batches=3, temperature=TAU, seed=4))


def test_generic_pair_scores_below_specific_pair_of_same_clip_score():
    rng = np.random.default_rng(5)
    d = 64
    g = _unit(rng.normal(size=(1, d)))[0]  # a "generic" concept many images show
    crowd = _unit(0.7 * g + 0.3 * _unit(rng.normal(size=(30, d))))  # images near g, with their own texts
    crowd_texts = _unit(crowd + 0.5 * rng.normal(size=crowd.shape))
    basis = np.linalg.qr(rng.normal(size=(d, 4)))[0].T  # orthonormal directions, away from the crowd
    c = 0.6  # both pairs get this CLIP score
    t_generic = _unit(g[None] + 0.05 * rng.normal(size=(1, d)))[0]  # a text close to the whole crowd
    w = basis[0] - (basis[0] @ t_generic) * t_generic
    v_generic = c * t_generic + math.sqrt(1 - c**2) * w / np.linalg.norm(w)
    t_specific = basis[1]
    v_specific = c * basis[1] + math.sqrt(1 - c**2) * basis[2]
    v = np.vstack([crowd, v_generic, v_specific]).astype(np.float32)
    t = np.vstack([crowd_texts, t_generic, t_specific]).astype(np.float32)
    generic, specific = len(crowd), len(crowd) + 1
    assert float(v[generic] @ t[generic]) == pytest.approx(float(v[specific] @ t[specific]), abs=1e-5)
    scores = negclip_loss(v, t, batch_size=len(v), batches=1, temperature=0.01)
    assert scores[generic] < scores[specific] - 0.01


def test_large_similarities_do_not_overflow():
    v = _unit(np.eye(4) + 0.01).astype(np.float32)
    scores = negclip_loss(v, v, batch_size=4, batches=1, temperature=0.01)  # exp(1/0.01) overflows float32
    assert np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores, _brute_force(v, v, [[np.arange(4)]], 0.01), rtol=0, atol=1e-5)


class _Recording:
    """A memory-map-like array that records how many rows each read returned; `slices_only` refuses
    anything but `[a:b]`."""

    def __init__(self, data, slices_only=False):
        self.data, self.shape, self.ndim, self.slices_only = data, data.shape, data.ndim, slices_only
        self.reads = []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        if self.slices_only and not isinstance(key, slice):
            raise TypeError("slices only")
        out = np.array(self.data[key])
        self.reads.append(len(out))
        return out


def test_memmap_and_array_like_inputs_are_read_a_batch_at_a_time(tmp_path, monkeypatch):
    v, t = _pairs(300, seed=8)
    expected = negclip_loss(v, t, batch_size=64, batches=2, temperature=TAU)
    mv = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.float16, shape=v.shape)
    mt = np.lib.format.open_memmap(tmp_path / "t.npy", mode="w+", dtype=np.float16, shape=t.shape)
    mv[:], mt[:] = v, t
    np.testing.assert_allclose(negclip_loss(mv, mt, batch_size=64, batches=2, temperature=TAU), expected, atol=5e-3)
    rv, rt = _Recording(v), _Recording(t)
    np.testing.assert_allclose(negclip_loss(rv, rt, batch_size=64, batches=2, temperature=TAU), expected,
                               rtol=0, atol=1e-6)
    assert max(rv.reads) <= 64  # one batch per read, never the pool
    monkeypatch.setattr(negclip, "_SPAN", 32)  # slice-only arrays: one short slice per window of rows
    sv, st = _Recording(v, slices_only=True), _Recording(t, slices_only=True)
    np.testing.assert_allclose(negclip_loss(sv, st, batch_size=64, batches=2, temperature=TAU), expected,
                               rtol=0, atol=1e-6)
    assert 0 < max(sv.reads) <= 32


def test_rejects_bad_input():
    v, t = _pairs(10)
    with pytest.raises(ValueError, match="same shape"):
        negclip_loss(v, t[:9])
    with pytest.raises(ValueError, match="temperature"):
        negclip_loss(v, t, temperature=0)
    assert negclip_loss(v[:0], t[:0]).shape == (0,)


# ---------------------------------------------------------------- NormSim


def _normsim_brute(pool, target, p):
    pool, target = _unit(pool), _unit(target)
    out = []
    for x in pool:
        sims = [abs(float(x @ y)) for y in target]
        out.append(max(sims) if p == np.inf else sum(s**p for s in sims) ** (1 / p))
    return np.array(out)


@pytest.mark.parametrize("p", [np.inf, 2, 3, 1])
def test_normsim_equals_brute_force(p):
    rng = np.random.default_rng(10)
    pool = rng.normal(size=(40, D)).astype(np.float32)  # not unit-norm: normsim normalises
    target = rng.normal(size=(57, D)).astype(np.float32)
    got = normsim(pool, target, p=p, block=7, target_block=11)
    assert got.dtype == np.float32 and got.shape == (40,)
    np.testing.assert_allclose(got, _normsim_brute(pool, target, p), rtol=1e-5, atol=1e-6)


def test_normsim_ranks_images_near_the_target_first():
    rng = np.random.default_rng(11)
    e = np.eye(D)[0]
    target = _unit(e + 0.01 * rng.normal(size=(200, D)))  # target images tightly around e
    cos = np.linspace(0.0, 0.95, 12)
    other = _unit(rng.normal(size=(12, D)) * (1 - e))  # orthogonal to e
    pool = cos[:, None] * e + np.sqrt(1 - cos**2)[:, None] * other
    perm = rng.permutation(12)
    for p in (np.inf, 2):
        scores = normsim(pool[perm].astype(np.float32), target.astype(np.float32), p=p)
        assert np.array_equal(np.argsort(-scores), np.argsort(-cos[perm]))


def test_normsim_blocks_memmaps_and_iterables(tmp_path):
    rng = np.random.default_rng(12)
    pool = _unit(rng.normal(size=(120, D))).astype(np.float32)
    target = _unit(rng.normal(size=(90, D))).astype(np.float32)
    mt = np.lib.format.open_memmap(tmp_path / "t.npy", mode="w+", dtype=np.float32, shape=target.shape)
    mt[:] = target
    for p in (np.inf, 2):
        whole = normsim(pool, target, p=p)
        np.testing.assert_allclose(normsim(iter([pool[:50], pool[50:]]), mt, p=p, block=13, target_block=8),
                                   whole, rtol=1e-6)
    with pytest.raises(ValueError, match="p must be"):
        normsim(pool, target, p=0.5)
