"""MERU's Lorentz-model math against numpy written from the definitions, the heads' training and files, and
HYPE's scores (blocks, memory maps, the reference-set specificities)."""

import math

import numpy as np
import pytest
import torch

from datacomp_assets.filtering.hyperbolic import (
    HEADS_FORMAT,
    HyperbolicHeads,
    dist0,
    exp_map0,
    half_aperture,
    hype_scores,
    load_heads,
    meru_loss,
    oxy_angle,
    paired_dist,
    pairwise_dist,
    pairwise_oxy_angle,
    save_heads,
    train_heads,
)

torch.set_num_threads(1)

CURVATURES = (0.5, 1.0, 2.3)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- numpy from the definitions


def _time_from_tangent(v, c):
    """Time component of exp_0(v): cosh(sqrt(c)|v|) / sqrt(c) (the hyperboloid's vertex is (1/sqrt(c), 0))."""
    return np.cosh(math.sqrt(c) * np.linalg.norm(v, axis=-1)) / math.sqrt(c)


def _full(x, c):
    """(time, space) vectors in R^{d+1} of points with space components x."""
    return np.concatenate([np.sqrt(1 / c + (x * x).sum(-1, keepdims=True)), x], axis=-1)


def _minkowski(a, b):
    """<a, b>_L = -a_0 b_0 + sum_i a_i b_i, over the last axis (broadcasting)."""
    return -a[..., 0] * b[..., 0] + (a[..., 1:] * b[..., 1:]).sum(-1)


def _dist(x, y, c):
    """Geodesic distance arccosh(-c <x, y>_L) / sqrt(c) between rows (broadcasting)."""
    inner = _minkowski(_full(x, c), _full(y, c))
    return np.arccosh(np.maximum(-c * inner, 1.0)) / math.sqrt(c)


def _exterior(x, y, c):
    """Exterior angle at x of the triangle (origin, x, y), from the hyperbolic law of cosines:
    cosh C = cosh A cosh B - sinh A sinh B cos(gamma), sides scaled by sqrt(c), gamma the interior angle at x."""
    origin = np.zeros_like(x)
    a = math.sqrt(c) * _dist(origin, x, c)
    b = math.sqrt(c) * _dist(x, y, c)
    opposite = math.sqrt(c) * _dist(origin + 0 * y, y, c)
    cos_gamma = (np.cosh(a) * np.cosh(b) - np.cosh(opposite)) / (np.sinh(a) * np.sinh(b))
    return math.pi - np.arccos(np.clip(cos_gamma, -1, 1))


def _aperture(x, c, k=0.1):
    return np.arcsin(np.minimum(2 * k / (math.sqrt(c) * np.linalg.norm(x, axis=-1)), 1.0))


def _points(rng, n, d, c):
    """Points on the hyperboloid at assorted distances from the origin (tangent norms 0.3 to 2.5)."""
    v = rng.normal(size=(n, d))
    v *= (rng.uniform(0.3, 2.5, size=(n, 1)) / np.linalg.norm(v, axis=1, keepdims=True))
    return exp_map0(torch.from_numpy(v), c).numpy()


# ---------------------------------------------------------------- the math


@pytest.mark.parametrize("c", CURVATURES)
def test_exp_map0_lands_on_the_hyperboloid_at_the_tangent_length(c):
    rng = np.random.default_rng(0)
    v = _unit(rng.normal(size=(50, 7))) * rng.uniform(0.01, 4.0, size=(50, 1))  # below MERU's sinh clamp
    x = exp_map0(torch.from_numpy(v), c).numpy()
    x_time = _time_from_tangent(v, c)
    # <x, x>_L = |x|^2 - x_time^2 = -1/c, compared as |x|^2 + 1/c = x_time^2 (no cancellation)
    np.testing.assert_allclose((x * x).sum(1) + 1 / c, x_time**2, rtol=1e-12)
    # direction kept, space norm sinh(sqrt(c)|v|)/sqrt(c), and exp_0 keeps the distance from the origin
    norm_v = np.linalg.norm(v, axis=1, keepdims=True)
    np.testing.assert_allclose(x, np.sinh(math.sqrt(c) * norm_v) / math.sqrt(c) * v / norm_v, rtol=1e-10)
    np.testing.assert_allclose(dist0(torch.from_numpy(x), c).numpy(), norm_v[:, 0], rtol=1e-9)
    np.testing.assert_allclose(_dist(np.zeros_like(x), x, c), norm_v[:, 0], rtol=1e-6)


@pytest.mark.parametrize("c", CURVATURES)
def test_pairwise_dist_is_arccosh_of_the_lorentz_inner_product(c):
    rng = np.random.default_rng(1)
    x, y = _points(rng, 20, 6, c), _points(rng, 30, 6, c)
    expected = _dist(x[:, None, :], y[None, :, :], c)
    got = pairwise_dist(torch.from_numpy(x), torch.from_numpy(y), c).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-7)
    paired = paired_dist(torch.from_numpy(x), torch.from_numpy(y[:20]), c).numpy()
    np.testing.assert_allclose(paired, np.diag(expected[:, :20]), rtol=1e-7, atol=1e-7)
    self_dist = pairwise_dist(torch.from_numpy(x), torch.from_numpy(x), c).numpy()
    np.testing.assert_allclose(self_dist, self_dist.T, atol=1e-9)
    assert np.abs(np.diag(self_dist)).max() < 1e-3  # clamped at arccosh(1 + 1e-8) ~ 1.4e-4


@pytest.mark.parametrize("c", CURVATURES)
def test_oxy_angle_is_the_exterior_angle_of_the_law_of_cosines(c):
    rng = np.random.default_rng(2)
    x, y = _points(rng, 40, 5, c), _points(rng, 40, 5, c)
    expected = _exterior(x, y, c)
    np.testing.assert_allclose(oxy_angle(torch.from_numpy(x), torch.from_numpy(y), c).numpy(), expected,
                               atol=1e-6)
    pair = pairwise_oxy_angle(torch.from_numpy(x[:8]), torch.from_numpy(y), c).numpy()
    np.testing.assert_allclose(pair, _exterior(x[:8, None, :], y[None, :, :], c), atol=1e-6)
    # y farther out on the ray through x: angle 0; y near the origin: angle pi
    v = rng.normal(size=(1, 5))
    on_x = exp_map0(torch.from_numpy(v), c)
    beyond, near_origin = exp_map0(torch.from_numpy(3 * v), c), exp_map0(torch.from_numpy(1e-3 * v), c)
    assert oxy_angle(on_x, beyond, c).item() < 1e-3
    assert oxy_angle(on_x, near_origin, c).item() > math.pi - 1e-2


@pytest.mark.parametrize("c", CURVATURES)
def test_half_aperture(c):
    rng = np.random.default_rng(3)
    x = _points(rng, 30, 4, c)
    got = half_aperture(torch.from_numpy(x), c).numpy()
    np.testing.assert_allclose(got, _aperture(x, c), atol=1e-6)
    assert np.all((got > 0) & (got < math.pi / 2))
    tiny = exp_map0(torch.full((1, 4), 1e-3, dtype=torch.float64), c)  # inside the min_radius ball: widest cone
    assert half_aperture(tiny, c).item() == pytest.approx(math.pi / 2, abs=1e-3)


# ---------------------------------------------------------------- a toy: specific texts and one generic text

D, CLUSTERS, PER_CLUSTER, GENERIC = 16, 4, 48, 48


@pytest.fixture(scope="module")
def toy():
    """Each specific text pairs with the images of one cluster; the generic text with images of every cluster."""
    rng = np.random.default_rng(0)
    centers = _unit(rng.normal(size=(CLUSTERS, D)))
    specific = _unit(centers + 0.3 * _unit(rng.normal(size=(CLUSTERS, D))))
    generic = _unit(rng.normal(size=D))
    images, texts, kind = [], [], []
    for k in range(CLUSTERS):
        images.append(_unit(centers[k] + 0.06 * rng.normal(size=(PER_CLUSTER, D))))
        texts.append(np.repeat(specific[k][None], PER_CLUSTER, axis=0))
        kind += [k] * PER_CLUSTER
    spread = rng.integers(0, CLUSTERS, GENERIC)
    images.append(_unit(centers[spread] + 0.06 * rng.normal(size=(GENERIC, D))))
    texts.append(np.repeat(generic[None], GENERIC, axis=0))
    kind += [-1] * GENERIC
    image, text = np.concatenate(images).astype(np.float32), np.concatenate(texts).astype(np.float32)
    logged = []
    heads = train_heads(image, text, steps=300, batch_size=64, lr=1e-2, seed=0, log=logged.append,
                        reference_size=128)
    return image, text, np.array(kind), heads, logged


def test_training_lowers_the_loss_and_puts_the_generic_text_near_the_origin(toy):
    image, text, kind, heads, logged = toy
    with torch.no_grad():
        before = meru_loss(HyperbolicHeads(D), image, text)
        after = meru_loss(heads, image, text)
    assert after["contrastive"].item() < 0.8 * before["contrastive"].item()
    assert logged and logged[-1].startswith("hyperbolic heads step 300/300")
    scores = hype_scores(heads, image, text)
    generic, specific = kind == -1, kind >= 0
    # HYPE's text specificity and the plain distance from the origin agree here: the generic text is lowest
    assert scores["hype_text_specificity"][generic].max() < scores["hype_text_specificity"][specific].min()
    assert scores["hype_text_origin_distance"][generic].max() < scores["hype_text_origin_distance"][specific].min()
    # paired images end up inside (or at the rim of) their texts' cones
    assert np.median(scores["hype_entailment"]) < 0.05


def test_training_is_deterministic():
    rng = np.random.default_rng(5)
    image, text = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    state = [train_heads(image, text, steps=15, batch_size=16, lr=1e-2, seed=7).state_dict() for _ in range(2)]
    other = train_heads(image, text, steps=15, batch_size=16, lr=1e-2, seed=8).state_dict()
    assert all(torch.equal(state[0][k], state[1][k]) for k in state[0])
    assert not torch.equal(state[0]["visual_proj.weight"], other["visual_proj.weight"])


def test_scores_follow_hype_definitions(toy):
    image, text, _, heads, _ = toy
    scores = hype_scores(heads, image, text)
    with torch.no_grad():
        c = heads.curvature.item()
        img = heads.encode_image(torch.from_numpy(image)).double().numpy()
        txt = heads.encode_text(torch.from_numpy(text)).double().numpy()
        ref_img = heads.encode_image(heads.reference_image).double().numpy()
        ref_txt = heads.encode_text(heads.reference_text).double().numpy()
    rows = np.arange(0, len(image), 37)
    # eps_t: mean over reference images of ext(text, ref) - aper(text); eps_i: over reference texts of
    # ext(ref, image) - aper(ref) (naver-ai/hype, hyperbolic.py)
    eps_t = [(_exterior(txt[i][None], ref_img, c) - _aperture(txt[i][None], c)).mean() for i in rows]
    eps_i = [(_exterior(ref_txt, img[i][None], c) - _aperture(ref_txt, c)).mean() for i in rows]
    np.testing.assert_allclose(scores["hype_text_specificity"][rows], eps_t, atol=2e-4)
    np.testing.assert_allclose(scores["hype_image_specificity"][rows], eps_i, atol=2e-4)
    np.testing.assert_allclose(scores["hype_entailment"], _exterior(txt, img, c) - _aperture(txt, c), atol=2e-4)
    np.testing.assert_allclose(scores["hype_distance"], _dist(img, txt, c), atol=2e-4)
    np.testing.assert_allclose(scores["hype_text_origin_distance"], _dist(0 * txt, txt, c), atol=2e-4)
    np.testing.assert_allclose(scores["hype_score"], scores["hype_image_specificity"]
                               + scores["hype_text_specificity"] - scores["hype_distance"], rtol=1e-6)
    assert all(v.dtype == np.float32 and v.shape == (len(image),) for v in scores.values())


def test_blocks_and_memory_maps_give_the_one_block_result(toy, tmp_path):
    image, text, _, heads, _ = toy
    whole = hype_scores(heads, image, text, block=len(image))
    maps = []
    for name, data in (("image", image), ("text", text)):
        m = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float16, shape=data.shape)
        m[:] = data
        maps.append(np.load(tmp_path / f"{name}.npy", mmap_mode="r"))
    for block in (1, 7, 100):
        parts = hype_scores(heads, image, text, block=block)
        for key in whole:
            np.testing.assert_allclose(parts[key], whole[key], rtol=1e-5, atol=1e-5, err_msg=key)
    stored = hype_scores(heads, maps[0], maps[1], block=50)  # float16 storage, re-normalised in the heads
    np.testing.assert_allclose(stored["hype_score"], whole["hype_score"], atol=2e-2)
    empty = hype_scores(heads, image[:0], text[:0])
    assert all(v.shape == (0,) for v in empty.values())


def test_scores_need_a_reference_set_and_equal_lengths(toy):
    image, text, _, heads, _ = toy
    with pytest.raises(ValueError, match="reference set"):
        hype_scores(HyperbolicHeads(D), image, text)
    with pytest.raises(ValueError, match="text embeddings"):
        hype_scores(heads, image, text[:-1])


# ---------------------------------------------------------------- files


class _Pickled:
    """An arbitrary object: torch.load(weights_only=True) refuses to unpickle it."""


def test_save_load_round_trip_with_weights_only(toy, tmp_path):
    image, text, _, heads, _ = toy
    path = save_heads(heads, tmp_path / "heads.pt")
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == HEADS_FORMAT and blob["config"]["d_in"] == D
    loaded = load_heads(path)
    for key, value in heads.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.reference_image.shape == heads.reference_image.shape
    original, again = hype_scores(heads, image, text), hype_scores(loaded, image, text)
    for key in original:
        np.testing.assert_array_equal(again[key], original[key])


def test_loading_other_files_fails_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a torch file")
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": HEADS_FORMAT, "payload": _Pickled()}, pickled)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint)
    broken = tmp_path / "broken.pt"
    torch.save({"format": HEADS_FORMAT, "config": {"d_in": 4}, "state_dict": {}}, broken)
    for path in (garbage, pickled, checkpoint, broken, tmp_path / "missing.pt"):
        with pytest.raises(ValueError, match="heads file") as error:
            load_heads(path)
        assert str(path) in str(error.value)
