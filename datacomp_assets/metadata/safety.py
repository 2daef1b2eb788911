"""Pool-construction safety steps: unsafe-text removal and near-duplicates of evaluation images (faces are
blurred when training shards are cut: `training.faces`).

The paper builds CommonPool by, in order: removing samples flagged by a toxicity classifier on the
caption, removing explicit images, removing near-duplicates of every evaluation image (an image
copy-detection model, cosine >= 0.604169), and blurring detected faces. The stand-ins here:

- unsafe text: a whole-word list of placeholder tokens (`UNSAFE_WORDS`), which catches what the synthetic web plants;
- eval near-duplicates: exact cosine search with faiss over a pixel fingerprint (`image_fingerprints`, the
  recommended default, see `FINGERPRINT_THRESHOLD`) or a scorer's image embeddings (`eval_embeddings`;
  measured unfit at tiny, see below);
- faces: detected here (`metadata.build.detect_faces`), blurred by the training stage.

This module imports no Dagster.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from datacomp_assets.core.models import encode_images
from datacomp_assets.core.shards import iter_shard_samples
from datacomp_assets.world.eval_suite import TASKS

# ---------------------------------------------------------------- unsafe text

# Placeholder tokens, not a real lexicon: at real scale the paper used a toxicity classifier on the
# caption. The detector keeps its own list; the synthetic web plants words of its own choosing, and a test
# checks that every planted caption is caught (the filter does not learn its list from the generator).
UNSAFE_WORDS: tuple[str, ...] = ("nsfw", "xxx", "porn", "gore", "gory", "nude", "explicit")

# Whole words only, so "gorestore" or "Xxxl" are not flagged; compiled once for the whole pool.
_UNSAFE_PATTERN = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in UNSAFE_WORDS) + r")\b", re.IGNORECASE)


def unsafe_text_mask(texts: Iterable[str | None]) -> np.ndarray:
    """True for each caption containing an unsafe word (whole word, any case); None counts as safe."""
    return np.fromiter((bool(t) and _UNSAFE_PATTERN.search(t) is not None for t in texts), dtype=bool)


# ---------------------------------------------------------------- evaluation images

def iter_eval_images(suite_root: str | Path, tasks: Sequence[str] | None = None) -> Iterator[Image.Image]:
    """Every test image of every evaluation task (classification and retrieval), task by task."""
    for key in tasks or list(TASKS):
        task_dir = Path(suite_root) / key
        if not (task_dir / "test" / "nshards.txt").exists():
            raise FileNotFoundError(f"evaluation task {key!r} is missing from {suite_root}")
        for s in iter_shard_samples(task_dir):
            image_bytes = s.get("jpg") or s.get("webp") or s.get("png")
            if image_bytes is not None:
                yield Image.open(io.BytesIO(image_bytes)).convert("RGB")


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def eval_embeddings(suite_root: str | Path, scorer, tasks: Sequence[str] | None = None,
                    batch_size: int = 512) -> np.ndarray:
    """(n_eval_images, dim) L2-normalized float32 image embeddings of a scorer (`metadata.build.Scorer`)."""
    # Only the image tower: Scorer.embed would also embed (unneeded) captions.
    chunks = [encode_images(scorer.model, scorer.preprocess, batch, batch_size, scorer.device).numpy()
              for batch in _batched(iter_eval_images(suite_root, tasks), batch_size)]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 0), np.float32)


def eval_fingerprints(suite_root: str | Path, tasks: Sequence[str] | None = None,
                      max_shift: int | None = None, batch_size: int = 1024) -> np.ndarray:
    """`image_fingerprints` of every evaluation image and of its shifted copies (see `shifted_copies`).

    The pixel-level alternative to eval_embeddings. Shifts go on the (small) eval side, so each pool image
    is still fingerprinted once; the index grows (2*max_shift+1)^2-fold.
    """
    max_shift = FINGERPRINT_MAX_SHIFT if max_shift is None else max_shift
    variants = (v for image in iter_eval_images(suite_root, tasks) for v in shifted_copies(image, max_shift))
    chunks = [image_fingerprints(batch) for batch in _batched(variants, batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, FINGERPRINT_DIM), np.float32)


# ---------------------------------------------------------------- near-duplicate search

# The paper's threshold for its copy-detection model (on that model's embeddings; not transferable).
PAPER_COPY_DETECTION_THRESHOLD = 0.604169

# Pixel fingerprint: a 16x16 colour thumbnail, each channel mean-centred, L2-normalized (768-d).
# Colour matters: a grayscale thumbnail of the same layout in another colour is nearly identical.
FINGERPRINT_SIDE = 16
FINGERPRINT_DIM = FINGERPRINT_SIDE * FINGERPRINT_SIDE * 3
# A thumbnail is not shift-invariant (a 3 px shift of a 64 px eval image drops the cosine to ~0.7), so the
# eval side also holds copies shifted by up to FINGERPRINT_MAX_SHIFT px each way.
FINGERPRINT_MAX_SHIFT = 3
# Measured on synthetic_web renders (300 eval-style images x 9 edits, 4,900 different images): exact
# copies, JPEG q60, 1-3 px shifts, +-10% brightness, upscaling and the full-size original all score
# >= 0.985; different images of the same object in another colour/position score median 0.3-0.8 (by their
# own eval image), and ordinary pool images score median 0.6 against all eval images. The tiny world's
# simple shapes make some genuinely near-identical renders, so ~1% of ordinary images still score >= 0.98.
# 0.98 keeps every copy and flags ~1% by chance. (The tiny CLIP scorers cannot do this job: they score any
# image of the same object and colour ~0.95-0.999, i.e. they measure semantics, not copies.)
FINGERPRINT_THRESHOLD = 0.98


def image_fingerprints(images: Sequence[Image.Image], side: int = FINGERPRINT_SIDE) -> np.ndarray:
    """(n, side*side*3) float32 fingerprints whose inner product is a copy-detection cosine.

    Downscaling to a thumbnail makes the fingerprint blind to resolution, JPEG artefacts and small shifts;
    subtracting each channel's mean makes it blind to brightness changes; normalizing turns the inner
    product into a cosine, so faiss searches it like the CLIP embeddings.
    """
    out = np.zeros((len(images), side * side * 3), np.float32)
    for i, image in enumerate(images):
        thumb = np.asarray(image.convert("RGB").resize((side, side), Image.BILINEAR, reducing_gap=2.0),
                           dtype=np.float32)
        thumb = thumb - thumb.mean(axis=(0, 1), keepdims=True)
        norm = np.linalg.norm(thumb)
        out[i] = (thumb / norm).ravel() if norm > 0 else 0.0  # a flat image matches nothing
    return out


def shifted_copies(image: Image.Image, max_shift: int) -> list[Image.Image]:
    """The image translated by every (dx, dy) in [-max_shift, max_shift]^2, edges filled by replication."""
    if max_shift <= 0:
        return [image]
    arr = np.asarray(image.convert("RGB"))
    padded = np.pad(arr, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    h, w = arr.shape[:2]
    return [Image.fromarray(padded[max_shift - dy:max_shift - dy + h, max_shift - dx:max_shift - dx + w])
            for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]


def find_eval_duplicates(pool_embeddings: np.ndarray, eval_embeddings: np.ndarray, threshold: float,
                         chunk_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(is_duplicate, max_similarity) per pool row: its highest cosine to any eval image, and >= threshold.

    Both inputs must be L2-normalized rows of the same representation. Exact search (`IndexFlatIP`) over
    the eval set, which is small; the pool is searched in chunks so memory stays bounded at any scale.
    With no eval images, nothing is a duplicate and the similarity is -inf.
    """
    import faiss

    n = len(pool_embeddings)
    max_similarity = np.full(n, -np.inf, dtype=np.float32)
    if n and len(eval_embeddings):
        index = faiss.IndexFlatIP(eval_embeddings.shape[1])
        index.add(np.ascontiguousarray(eval_embeddings, dtype=np.float32))
        for start in range(0, n, chunk_size):
            chunk = np.ascontiguousarray(pool_embeddings[start:start + chunk_size], dtype=np.float32)
            similarity, _ = index.search(chunk, 1)
            max_similarity[start:start + len(chunk)] = similarity[:, 0]
    return max_similarity >= threshold, max_similarity


def calibrate_threshold(copy_similarities: np.ndarray, different_similarities: np.ndarray) -> float:
    """A threshold midway between the lowest copy/light-edit score and the highest different-image score.

    Raises if the two sets overlap: then no threshold separates them and the representation is unfit.
    """
    lowest_copy, highest_different = float(np.min(copy_similarities)), float(np.max(different_similarities))
    if lowest_copy <= highest_different:
        raise ValueError(f"copies (min {lowest_copy:.3f}) and different images (max {highest_different:.3f}) "
                         "overlap: no threshold separates them")
    return (lowest_copy + highest_different) / 2
