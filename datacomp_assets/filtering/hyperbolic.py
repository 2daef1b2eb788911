"""HYPE's scores from a MERU-style hyperbolic head over frozen CLIP embeddings (torch + numpy; no Dagster).

References:

- MERU: Desai et al., ICML 2023, "Hyperbolic Image-Text Representations" (``facebookresearch/meru``,
  ``meru/lorentz.py`` and ``meru/models.py``). Points live on the upper sheet of the hyperboloid
  ``<x, x>_L = -1/c`` (curvature ``-c``); only the space components ``x`` are stored, the time component
  is ``sqrt(1/c + |x|^2)``. Encoder features are scaled by a learnable ``alpha`` (init ``sqrt(1/d)``,
  clamped ``<= 1``) and lifted with the exponential map at the origin. The loss is a contrastive
  cross-entropy over ``-d_L * logit_scale`` in both directions plus ``0.2 *`` an entailment loss
  ``relu(ext(text, image) - aper(text))``: the paired image must lie in the text's entailment cone.
- HYPE: Kim et al., ECCV 2024, "HYPE: Hyperbolic Entailment Filtering for Underspecified Images and
  Texts" (``naver-ai/hype``, ``hyperbolic.py``). Its specificities are *not* norms: with a reference set
  of image and text embeddings,
  ``eps_t(text) = mean_j [ext(text, ref_image_j) - aper(text)]`` and
  ``eps_i(image) = mean_j [ext(ref_text_j, image) - aper(ref_text_j)]``, unclamped; higher is more
  specific (its demo: "Blue sky" 0.15, "White clouds against blue sky" 0.22, "Puffy white cumulus cloud in
  bright azure summer sky" 0.29). A generic text sits near the origin, where the cone is wide, so most
  reference images fall inside it. The paper's composite is
  ``HYPE_score = eps_i + eps_t - d_L + cos(theta) + c_IN`` (``d_L``: the pair's Lorentzian distance,
  ``cos``: CLIP similarity, ``c_IN``: ImageNet-cluster score); the repository's README says the
  specificities and ``-d_L`` alone are enough for state-of-the-art DataComp results (paper Table 3).
  HYPE's reference set is a file shipped with its weights (``reference.pt``: image and text embeddings).

The deviation: HYPE trains a whole MERU ViT-L/14. Here a linear head per modality maps *frozen* CLIP
embeddings (DataComp's published L/14 ones at the real scales) into the hyperboloid, so HYPE runs from
metadata alone. At tiny the heads are trained on the curated source's embeddings (:func:`train_heads`); at
the paper's scales the user supplies a heads file (:func:`load_heads`). The reference set HYPE's
specificities need travels in the heads file (a seeded sample of the training pairs, or
:func:`set_reference`).

Public pieces: the Lorentz-model functions (:func:`exp_map0`, :func:`pairwise_dist`,
:func:`dist0`, :func:`half_aperture`, :func:`oxy_angle`, :func:`pairwise_oxy_angle`), :class:`HyperbolicHeads`,
:func:`meru_loss`, :func:`train_heads`, :func:`set_reference`, :func:`save_heads` / :func:`load_heads`
and :func:`hype_scores`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEADS_FORMAT = "datacomp-hyperbolic-heads/1"
"""Tag stored in every heads file; :func:`load_heads` refuses files without it."""

DEFAULT_BLOCK = 8192
"""Rows per block in :func:`hype_scores`: with a 1,024-row reference set a block's matrices are ~32 MB each."""

DEFAULT_REFERENCE_SIZE = 1024

MIN_RADIUS = 0.1  # MERU's K: cones are undefined within this radius of the origin
_LOGIT_SCALE_MAX = math.log(100.0)  # MERU: logits scaled at most 100x


# ---------------------------------------------------------------- Lorentz model (space components only)


def _time(x: Tensor, curv: float | Tensor) -> Tensor:
    """Time component ``sqrt(1/c + |x|^2)`` of points with space components ``x`` (last axis)."""
    return torch.sqrt(1 / curv + torch.sum(x * x, dim=-1))


def exp_map0(x: Tensor, curv: float | Tensor = 1.0, eps: float = 1e-8) -> Tensor:
    """Space components of ``exp_0(x)``: tangent vectors at the origin lifted onto the hyperboloid.

    ``sinh(sqrt(c)|x|) x / (sqrt(c)|x|)``; the sinh input is clamped at ``asinh(2**15)`` as in MERU.
    """
    rc_norm = curv**0.5 * torch.norm(x, dim=-1, keepdim=True)
    sinh_input = torch.clamp(rc_norm, min=eps, max=math.asinh(2**15))
    return torch.sinh(sinh_input) * x / torch.clamp(rc_norm, min=eps)


def pairwise_inner(x: Tensor, y: Tensor, curv: float | Tensor = 1.0) -> Tensor:
    """Lorentzian inner products ``<x_i, y_j>_L = x_i . y_j - x_time_i * y_time_j``; shape ``(B1, B2)``."""
    return x @ y.T - _time(x, curv)[:, None] * _time(y, curv)[None, :]


def pairwise_dist(x: Tensor, y: Tensor, curv: float | Tensor = 1.0, eps: float = 1e-8) -> Tensor:
    """Geodesic distances ``arccosh(-c <x_i, y_j>_L) / sqrt(c)``; shape ``(B1, B2)``.

    The arccosh input is clamped at ``1 + eps`` (rounding can push it just below 1 for equal points).
    """
    c_xyl = -curv * pairwise_inner(x, y, curv)
    return torch.acosh(torch.clamp(c_xyl, min=1 + eps)) / curv**0.5


def paired_dist(x: Tensor, y: Tensor, curv: float | Tensor = 1.0, eps: float = 1e-8) -> Tensor:
    """Distances between rows ``x_i`` and ``y_i`` (the diagonal of :func:`pairwise_dist`); shape ``(B,)``."""
    inner = torch.sum(x * y, dim=-1) - _time(x, curv) * _time(y, curv)
    return torch.acosh(torch.clamp(-curv * inner, min=1 + eps)) / curv**0.5


def dist0(x: Tensor, curv: float | Tensor = 1.0) -> Tensor:
    """Geodesic distance from the origin (the hyperboloid's vertex): ``asinh(sqrt(c)|x|) / sqrt(c)``."""
    return torch.asinh(curv**0.5 * torch.norm(x, dim=-1)) / curv**0.5


def half_aperture(x: Tensor, curv: float | Tensor = 1.0, min_radius: float = MIN_RADIUS,
                  eps: float = 1e-8) -> Tensor:
    """Half-aperture ``asin(2K / (sqrt(c)|x|))`` of the entailment cone at each ``x``; in ``(0, pi/2)``.

    Points within ``2K / sqrt(c)`` of the origin (in the space norm) get the widest cone, ``~pi/2``.
    """
    asin_input = 2 * min_radius / (torch.norm(x, dim=-1) * curv**0.5 + eps)
    return torch.asin(torch.clamp(asin_input, min=-1 + eps, max=1 - eps))


def _ext_angle(x_norm: Tensor, x_time: Tensor, y_time: Tensor, dot: Tensor, curv: float | Tensor,
               eps: float) -> Tensor:
    """MERU's exterior angle from broadcastable pieces (the hyperbolic law of cosines)."""
    c_xyl = curv * (dot - x_time * y_time)
    numer = y_time + c_xyl * x_time
    denom = torch.sqrt(torch.clamp(c_xyl**2 - 1, min=eps))
    return torch.acos(torch.clamp(numer / (x_norm * denom + eps), min=-1 + eps, max=1 - eps))


def oxy_angle(x: Tensor, y: Tensor, curv: float | Tensor = 1.0, eps: float = 1e-8) -> Tensor:
    """Exterior angle at ``x_i`` of the triangle (origin, ``x_i``, ``y_i``), row by row; in ``(0, pi)``.

    0 when ``y`` lies on the geodesic ray from the origin through ``x`` beyond ``x``; ``pi`` when ``y`` is the
    origin. ``y`` is in the entailment cone of ``x`` when this is at most :func:`half_aperture` of ``x``.
    """
    return _ext_angle(torch.norm(x, dim=-1), _time(x, curv), _time(y, curv), torch.sum(x * y, dim=-1),
                      curv, eps)


def pairwise_oxy_angle(x: Tensor, y: Tensor, curv: float | Tensor = 1.0, eps: float = 1e-8) -> Tensor:
    """:func:`oxy_angle` for every pair ``(x_i, y_j)``; shape ``(B1, B2)``."""
    return _ext_angle(torch.norm(x, dim=-1)[:, None], _time(x, curv)[:, None], _time(y, curv)[None, :],
                      x @ y.T, curv, eps)


# ---------------------------------------------------------------- the heads


def _init_projection(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        if d_in == d_out:
            layer.weight.copy_(torch.eye(d_out))  # start from CLIP's own geometry
        else:
            # seeded locally, so building a model never touches the caller's random state
            gen = torch.Generator().manual_seed(0)
            q, _ = torch.linalg.qr(torch.randn(max(d_in, d_out), min(d_in, d_out), generator=gen))
            layer.weight.copy_(q if d_out > d_in else q.T)
    return layer


class HyperbolicHeads(nn.Module):
    """One linear map per modality from unit-norm CLIP embeddings to MERU's hyperboloid.

    ``encode_*(e) = exp_map0(alpha * sqrt(d_out) * W normalize(e), c)``. The ``sqrt(d_out)`` is a fixed
    factor: MERU's ``alpha = sqrt(1/d)`` init assumes encoder features of norm ~``sqrt(d)``, whereas CLIP
    embeddings are unit-norm, so with ``W`` initialised to the identity (an orthonormal map when the widths
    differ) every point starts at tangent norm 1, as in MERU. Parameters as in ``meru/models.py``: log
    curvature (init ``log 1``, clamped to ``[log(c0/10), log(10 c0)]``), log alphas (clamped ``<= 0``), log
    logit scale (init ``log(1/0.07)``, clamped ``<= log 100``). Buffers ``reference_image`` /
    ``reference_text`` hold the CLIP embeddings of HYPE's reference set (empty until set).
    """

    def __init__(self, d_in: int, d_out: int | None = None, curv_init: float = 1.0, learn_curv: bool = True,
                 entail_weight: float = 0.2, min_radius: float = MIN_RADIUS):
        super().__init__()
        d_out = d_in if d_out is None else d_out
        self.config = {"d_in": int(d_in), "d_out": int(d_out), "curv_init": float(curv_init),
                       "learn_curv": bool(learn_curv), "entail_weight": float(entail_weight),
                       "min_radius": float(min_radius)}
        self.visual_proj = _init_projection(d_in, d_out)
        self.textual_proj = _init_projection(d_in, d_out)
        self.register_buffer("feature_scale", torch.tensor(math.sqrt(d_out)))
        self.curv = nn.Parameter(torch.tensor(curv_init).log(), requires_grad=learn_curv)
        self._curv_minmax = {"min": math.log(curv_init / 10), "max": math.log(curv_init * 10)}
        self.visual_alpha = nn.Parameter(torch.tensor(d_out**-0.5).log())
        self.textual_alpha = nn.Parameter(torch.tensor(d_out**-0.5).log())
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())
        self.register_buffer("reference_image", torch.zeros(0, d_in))
        self.register_buffer("reference_text", torch.zeros(0, d_in))

    @property
    def curvature(self) -> Tensor:
        """``c`` (the hyperboloid's curvature is ``-c``)."""
        return self.curv.exp()

    def clamp_(self) -> None:
        """MERU's clamps, applied before every training step."""
        with torch.no_grad():
            self.curv.clamp_(**self._curv_minmax)
            self.visual_alpha.clamp_(max=0.0)
            self.textual_alpha.clamp_(max=0.0)
            self.logit_scale.clamp_(max=_LOGIT_SCALE_MAX)

    def _lift(self, emb: Tensor, proj: nn.Linear, alpha: Tensor) -> Tensor:
        feats = proj(F.normalize(emb.to(proj.weight.dtype), dim=-1)) * self.feature_scale
        return exp_map0(feats * alpha.exp(), self.curvature)

    def encode_image(self, emb: Tensor) -> Tensor:
        """Space components on the hyperboloid of image embeddings ``(B, d_in)`` -> ``(B, d_out)``."""
        return self._lift(emb, self.visual_proj, self.visual_alpha)

    def encode_text(self, emb: Tensor) -> Tensor:
        """Space components on the hyperboloid of caption embeddings ``(B, d_in)`` -> ``(B, d_out)``."""
        return self._lift(emb, self.textual_proj, self.textual_alpha)


def meru_loss(heads: HyperbolicHeads, image_emb, text_emb) -> dict[str, Tensor]:
    """MERU's objective on one batch of pairs: ``contrastive + entail_weight * entailment`` (and both parts).

    Contrastive: cross-entropy over logits ``-d_L(image_i, text_j) * logit_scale``, averaged over the two
    directions. Entailment: mean of ``relu(ext(text_i, image_i) - aper(text_i))``.
    """
    image = heads.encode_image(torch.as_tensor(image_emb))
    text = heads.encode_text(torch.as_tensor(text_emb))
    curv, scale = heads.curvature, heads.logit_scale.exp()
    image_logits = -pairwise_dist(image, text, curv) * scale
    targets = torch.arange(len(image))
    contrastive = 0.5 * (F.cross_entropy(image_logits, targets) + F.cross_entropy(image_logits.T, targets))
    angle = oxy_angle(text, image, curv)
    aperture = half_aperture(text, curv, heads.config["min_radius"])
    entailment = torch.clamp(angle - aperture, min=0).mean()
    return {"loss": contrastive + heads.config["entail_weight"] * entailment,
            "contrastive": contrastive, "entailment": entailment}


# ---------------------------------------------------------------- training and the reference set


def _float_tensor(data, name: str) -> Tensor:
    x = np.asarray(data, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-d (rows, width), got shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


def set_reference(heads: HyperbolicHeads, image_emb, text_emb) -> HyperbolicHeads:
    """Store HYPE's reference set (CLIP embeddings of images and of texts; they need not be pairs)."""
    image, text = _float_tensor(image_emb, "reference images"), _float_tensor(text_emb, "reference texts")
    d_in = heads.config["d_in"]
    for what, x in (("reference images", image), ("reference texts", text)):
        if x.shape[1] != d_in or len(x) == 0:
            raise ValueError(f"{what}: need at least one row of width {d_in}, got shape {tuple(x.shape)}")
    heads.reference_image = image
    heads.reference_text = text
    return heads


def train_heads(image_emb, text_emb, steps: int = 2000, batch_size: int = 1024, lr: float = 1e-3,
                seed: int = 0, log: Callable[[str], None] | None = None, *, d_out: int | None = None,
                entail_weight: float = 0.2, curv_init: float = 1.0, weight_decay: float = 0.0,
                reference_size: int = DEFAULT_REFERENCE_SIZE, log_every: int = 100) -> HyperbolicHeads:
    """Heads trained with MERU's loss on paired CLIP embeddings (row i of each is one pair); CPU, seeded.

    AdamW with MERU's betas ``(0.9, 0.98)``; ``weight_decay`` applies to the two projections only (MERU
    exempts its scalars). Batches are drawn without replacement, a fresh permutation per epoch, from a
    ``torch.Generator`` seeded with ``seed`` (the global random state is left alone), so one seed gives
    one result on a machine. The reference set is a seeded sample of ``reference_size`` training pairs.
    The embeddings are loaded into memory whole.
    """
    image, text = _float_tensor(image_emb, "image embeddings"), _float_tensor(text_emb, "text embeddings")
    if image.shape != text.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image.shape)} vs {tuple(text.shape)}")
    n = len(image)
    if n < 2:
        raise ValueError("need at least two pairs to train")
    batch_size = min(batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    heads = HyperbolicHeads(image.shape[1], d_out, curv_init=curv_init, entail_weight=entail_weight)
    decayed = [heads.visual_proj.weight, heads.textual_proj.weight]
    scalars = [heads.curv, heads.visual_alpha, heads.textual_alpha, heads.logit_scale]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": weight_decay},
         {"params": [p for p in scalars if p.requires_grad], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98))
    order = torch.randperm(n, generator=gen)
    # One intra-op thread: these matrices are small, and on a 2-core machine two threads ran 25x slower than one
    # (50 steps of 512 pairs: 57 s against 2.2 s), waiting on each other for every elementwise op.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _optimize(heads, optimizer, image, text, order, gen, steps, batch_size, log, log_every)
    finally:
        torch.set_num_threads(threads)
    heads.clamp_()
    ref = torch.randperm(n, generator=gen)[:min(reference_size, n)].sort().values
    set_reference(heads, image[ref].numpy(), text[ref].numpy())
    return heads.eval()


def _optimize(heads, optimizer, image, text, order, gen, steps, batch_size, log, log_every) -> None:
    n, cursor = len(image), 0
    for step in range(1, steps + 1):
        if cursor + batch_size > n:  # the partial tail of an epoch is skipped: batches stay full-size
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        heads.clamp_()
        parts = meru_loss(heads, image[idx], text[idx])
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        if log is not None and (step % log_every == 0 or step == steps):
            log(f"hyperbolic heads step {step}/{steps}: loss {parts['loss'].item():.4f} "
                f"(contrastive {parts['contrastive'].item():.4f}, entailment {parts['entailment'].item():.4f}), "
                f"curvature {heads.curvature.item():.3f}")


# ---------------------------------------------------------------- files


def save_heads(heads: HyperbolicHeads, path: str | Path) -> Path:
    """Write ``{"format", "config", "state_dict"}`` (plain types and tensors: loadable with weights_only)."""
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in heads.state_dict().items()}
    torch.save({"format": HEADS_FORMAT, "config": dict(heads.config), "state_dict": state}, path)
    return path


def load_heads(path: str | Path) -> HyperbolicHeads:
    """Heads from a :func:`save_heads` file, read with ``torch.load(weights_only=True)``.

    Raises ``ValueError`` naming the file when it cannot be read that way or is not a heads file.
    """
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, not a torch file, or pickled objects weights_only refuses
        first = str(error).splitlines()[0][:300] if str(error) else ""
        raise ValueError(f"{path}: not a hyperbolic heads file readable with weights_only=True "
                         f"({type(error).__name__}: {first})") from error
    if not isinstance(blob, dict) or blob.get("format") != HEADS_FORMAT:
        raise ValueError(f"{path}: not a hyperbolic heads file (expected format {HEADS_FORMAT!r}, "
                         f"found {blob.get('format') if isinstance(blob, dict) else type(blob).__name__!r})")
    try:
        heads = HyperbolicHeads(**blob["config"])
        state = blob["state_dict"]
        # the reference set's size is the file's, not the constructor's empty default
        heads.reference_image = torch.empty_like(state["reference_image"])
        heads.reference_text = torch.empty_like(state["reference_text"])
        heads.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"{path}: malformed hyperbolic heads file ({type(error).__name__}: {error})") from error
    return heads.eval()


# ---------------------------------------------------------------- HYPE's scores


def _block(data, start: int, block: int, device: str) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(data[start:start + block], dtype=np.float32)).to(device)


def hype_scores(heads: HyperbolicHeads, image_emb, text_emb, block: int = DEFAULT_BLOCK,
                device: str = "cpu") -> dict[str, np.ndarray]:
    """HYPE's per-pair scores, ``block`` rows at a time; float32 ``(n,)`` arrays in row order.

    Arithmetic is float32 on ``device`` (the heads are moved there).

    ``image_emb`` / ``text_emb``: 2-d arrays of paired CLIP embeddings whose ``[a:b]`` slices are
    arrays (``np.memmap`` included). Returns

    - ``hype_image_specificity`` (``eps_i``): mean over reference texts ``r`` of
      ``ext(r, image) - aper(r)``; higher: the image is more specific.
    - ``hype_text_specificity`` (``eps_t``): mean over reference images ``r`` of
      ``ext(text, r) - aper(text)``; higher: the text is more specific.
    - ``hype_entailment``: ``ext(text, image) - aper(text)``, unclamped: how far the image lies outside the
      text's cone (``<= 0``: inside); lower is better.
    - ``hype_distance``: the pair's Lorentzian distance ``d_L``; lower is better.
    - ``hype_image_origin_distance`` / ``hype_text_origin_distance``: geodesic distance from the origin, the
      norm-based notion of specificity (MERU: generic concepts sit near the origin). Not HYPE's
      ``eps``: with the direction fixed, ``eps_t`` grows with it but ``eps_i`` shrinks (the cone's apex is the
      reference text, and a point farther out along one ray makes a smaller exterior angle there).
    - ``hype_score``: ``eps_i + eps_t - d_L``, HYPE's composite without its CLIP-score and ImageNet-cluster
      terms (the README's "specificities and negative Lorentzian distance"); add those in the rule that
      ranks by it (``clip_l14_similarity_score``, ``in_target_cluster``). Higher is better.
    """
    if heads.reference_image.numel() == 0 or heads.reference_text.numel() == 0:
        raise ValueError("the heads have no reference set: train them with train_heads or call set_reference")
    if block < 1:
        raise ValueError("block must be positive")
    n = image_emb.shape[0]
    if text_emb.shape[0] != n:
        raise ValueError(f"{n} image embeddings but {text_emb.shape[0]} text embeddings")
    heads = heads.to(device).eval()
    k = heads.config["min_radius"]
    names = ("hype_image_specificity", "hype_text_specificity", "hype_entailment", "hype_distance",
             "hype_image_origin_distance", "hype_text_origin_distance")
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with torch.no_grad():
        curv = heads.curvature
        ref_text = heads.encode_text(heads.reference_text)
        ref_image = heads.encode_image(heads.reference_image)
        ref_text_aperture = half_aperture(ref_text, curv, k)
        for start in range(0, n, block):
            image = heads.encode_image(_block(image_emb, start, block, device))
            text = heads.encode_text(_block(text_emb, start, block, device))
            text_aperture = half_aperture(text, curv, k)
            eps_i = (pairwise_oxy_angle(ref_text, image, curv) - ref_text_aperture[:, None]).mean(dim=0)
            eps_t = (pairwise_oxy_angle(text, ref_image, curv) - text_aperture[:, None]).mean(dim=1)
            entail = oxy_angle(text, image, curv) - text_aperture
            values = (eps_i, eps_t, entail, paired_dist(image, text, curv), dist0(image, curv), dist0(text, curv))
            for name, value in zip(names, values):
                out[name].append(value.float().cpu().numpy())
    scores = {name: np.concatenate(parts) if parts else np.empty(0, np.float32) for name, parts in out.items()}
    scores["hype_score"] = (scores["hype_image_specificity"] + scores["hype_text_specificity"]
                            - scores["hype_distance"]).astype(np.float32)
    return scores
