"""Pool-construction safety steps: unsafe words, eval near-duplicates, face detection and blurring."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from datacomp_assets.metadata import safety
from datacomp_assets.metadata.build import detect_faces
from datacomp_assets.training.faces import blur_faces
from datacomp_assets.world import web


def decode(jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def reencode(img: Image.Image, quality: int = 90) -> Image.Image:
    return decode(web.encode_jpeg(img, quality))


# ---------------------------------------------------------------- unsafe text

def test_unsafe_words_match_whole_words_in_any_case():
    for word in safety.UNSAFE_WORDS:
        flagged = [f"{word.upper()} a red circle", f"a blue square, {word}.", f"{word.capitalize()}-free star",
                   f"a green heart ({word}) stock image"]
        # The word inside a longer word ("gorestore", "xxxl", "pornography") is not the word.
        safe = [f"{word}store shop logo", f"size {word}l t-shirt", f"super{word} poster", f"{word}ography"]
        mask = safety.unsafe_text_mask(flagged + safe)
        assert mask.tolist() == [True] * 4 + [False] * 4, word
    assert safety.unsafe_text_mask(["a photo of a red circle", "", None]).tolist() == [False, False, False]
    assert safety.unsafe_text_mask([]).shape == (0,)


def test_unsafe_words_are_the_ones_the_web_plants():
    assert set(web.UNSAFE_WORDS) <= set(safety.UNSAFE_WORDS)
    planted = [s.text for s in (web.sample(i) for i in range(3000)) if s.kind == "unsafe"]
    clean = [s.text for s in (web.sample(i) for i in range(3000)) if s.kind == "clean"]
    assert planted and safety.unsafe_text_mask(planted).all()
    assert not safety.unsafe_text_mask(clean).any()


# ---------------------------------------------------------------- eval near-duplicates

def eval_style_image(i: int) -> Image.Image:
    """An evaluation image as the suite stores it: a square clean render at 64 px, JPEG-encoded."""
    s = web.sample(i, namespace="eval/objects", noise={})
    s = replace(s, height=s.width, count=1, style=("photo", "drawing", "painting")[i % 3])
    return reencode(web.render(s).resize((64, 64), Image.LANCZOS)), s


def shifted(img: Image.Image, dx: int, dy: int) -> Image.Image:
    """The image moved by (dx, dy) pixels, the uncovered edge filled with the corner colour."""
    return img.transform(img.size, Image.AFFINE, (1, 0, -dx, 0, 1, -dy), resample=Image.NEAREST,
                         fillcolor=img.getpixel((0, 0)))


def light_edits(img: Image.Image, s) -> list[Image.Image]:
    """Copies of an eval image (img, drawn from sample s) as the web holds them."""
    return [
        reencode(img),                                          # exact copy (re-downloaded)
        reencode(img, 60),                                      # re-encoded at JPEG quality 60
        reencode(shifted(img, 1, 0)),                           # 1 px shift of the 64 px image itself
        # The original, full-size render (as the web's eval_copy samples serve it), rolled by 0-3 px.
        *(reencode(web.render(replace(s, shift_x=dx, shift_y=dy)), 75) for dx, dy in [(0, 0), (-2, 2), (3, -3)]),
        reencode(ImageEnhance.Brightness(img).enhance(1.1)),    # slightly brighter
        reencode(ImageEnhance.Brightness(img).enhance(0.9)),    # slightly darker
        reencode(img.resize((256, 256), Image.BICUBIC)),        # upscaled copy
    ]


@pytest.fixture(scope="module")
def eval_set():
    images, samples = zip(*(eval_style_image(i) for i in range(48)))
    fingerprints = np.concatenate([safety.image_fingerprints(safety.shifted_copies(im, safety.FINGERPRINT_MAX_SHIFT))
                                   for im in images])
    return list(images), list(samples), fingerprints


def test_find_eval_duplicates_flags_copies_and_light_edits_only(eval_set):
    images, samples, eval_fp = eval_set
    copies = [edit for img, s in zip(images[:16], samples[:16]) for edit in light_edits(img, s)]
    # Different images: the same object in another colour and/or position, and ordinary pool images.
    colors = list(web.COLORS)
    different = []
    for s in samples[16:32]:
        other = colors[(colors.index(s.color) + 3) % len(colors)]
        different.append(reencode(web.render(replace(s, color=other))))
        different.append(reencode(web.render(replace(s, image_seed=s.image_seed + 1))))
    different += [reencode(web.render(web.sample(j))) for j in range(300)]
    pool = copies + different
    pool_fp = safety.image_fingerprints(pool)

    is_dup, similarity = safety.find_eval_duplicates(pool_fp, eval_fp, safety.FINGERPRINT_THRESHOLD)
    assert is_dup[:len(copies)].all(), similarity[:len(copies)].min()
    variants, ordinary = is_dup[len(copies):len(copies) + 32], is_dup[len(copies) + 32:]
    assert not ordinary.any(), np.sort(similarity[len(copies) + 32:])[-5:]
    # A recoloured/moved render can land nearly on its eval image (a small object moved a pixel or two):
    # such rare pairs are visual near-duplicates and may be flagged; measured ~1% at FINGERPRINT_THRESHOLD.
    assert variants.sum() <= 2, np.sort(similarity[len(copies):len(copies) + 32])[-5:]
    assert similarity.dtype == np.float32 and similarity.shape == (len(pool),)


def test_chunked_search_equals_unchunked(eval_set):
    _, _, eval_fp = eval_set
    pool_fp = safety.image_fingerprints([web.render(web.sample(j)) for j in range(100)])
    whole = safety.find_eval_duplicates(pool_fp, eval_fp, 0.9, chunk_size=10_000)
    chunked = safety.find_eval_duplicates(pool_fp, eval_fp, 0.9, chunk_size=7)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_allclose(whole[1], chunked[1], rtol=0, atol=1e-6)
    # Brute force agrees with faiss.
    np.testing.assert_allclose(whole[1], (pool_fp @ eval_fp.T).max(axis=1), atol=1e-5)


def test_find_eval_duplicates_with_no_eval_images():
    is_dup, similarity = safety.find_eval_duplicates(np.ones((3, 4), np.float32) / 2, np.zeros((0, 4), np.float32), 0.5)
    assert not is_dup.any() and np.isneginf(similarity).all()


def test_calibrate_threshold():
    assert safety.calibrate_threshold(np.array([0.99, 0.97]), np.array([0.5, 0.91])) == pytest.approx(0.94)
    with pytest.raises(ValueError):
        safety.calibrate_threshold(np.array([0.9]), np.array([0.95]))


def test_eval_fingerprints_read_the_suite(tmp_path):
    from datacomp_assets.evaluation.zeroshot import load_classification
    from datacomp_assets.world.eval_suite import build_suite

    counts = build_suite(tmp_path, tasks=["counting"], size_scale=0.02)
    fingerprints = safety.eval_fingerprints(tmp_path, tasks=["counting"], max_shift=1)
    assert fingerprints.shape == (counts["counting"] * 9, safety.FINGERPRINT_DIM)
    np.testing.assert_allclose(np.linalg.norm(fingerprints, axis=1), 1.0, atol=1e-5)
    images, *_ = load_classification(tmp_path / "counting")
    is_dup, _ = safety.find_eval_duplicates(safety.image_fingerprints([reencode(images[0], 60)]), fingerprints,
                                            safety.FINGERPRINT_THRESHOLD)
    assert is_dup.all()


# ---------------------------------------------------------------- faces

def synthetic_face(size: int = 200) -> Image.Image:
    """A cartoon face (skin ellipse, brows, dark eyes, nose, mouth) that OpenCV's Haar cascade detects."""
    img = Image.new("RGB", (size, size), (90, 120, 160))
    d = ImageDraw.Draw(img)
    k = size / 200

    def box(*xy):
        return [v * k for v in xy]

    d.ellipse(box(50, 30, 150, 170), fill=(225, 180, 150))
    d.rectangle(box(64, 70, 92, 76), fill=(60, 40, 30))
    d.rectangle(box(108, 70, 136, 76), fill=(60, 40, 30))
    d.ellipse(box(68, 84, 90, 98), fill=(30, 20, 20))
    d.ellipse(box(110, 84, 132, 98), fill=(30, 20, 20))
    d.polygon([(100 * k, 100 * k), (92 * k, 125 * k), (108 * k, 125 * k)], fill=(190, 140, 115))
    d.ellipse(box(80, 138, 120, 150), fill=(120, 40, 40))
    return img.filter(ImageFilter.GaussianBlur(2 * k))


def test_detect_faces_finds_a_synthetic_face():
    for size in (100, 240):
        faces = detect_faces(synthetic_face(size))
        assert len(faces) == 1
        x1, y1, x2, y2 = faces[0]
        assert 0 <= x1 < 0.3 and 0 <= y1 < 0.3 and 0.7 < x2 <= 1 and 0.7 < y2 <= 1


def test_blur_faces_blurs_inside_boxes_only():
    # A face in the left half of a wide noisy canvas; noise shows blurring plainly.
    rng = np.random.default_rng(0)
    canvas = Image.fromarray(rng.integers(0, 256, size=(200, 400, 3), dtype=np.uint8))
    canvas.paste(synthetic_face(200), (0, 0))
    jpeg = web.encode_jpeg(canvas, 95)
    boxes = detect_faces(decode(jpeg))
    assert boxes and all(x2 <= 0.5 for _, _, x2, _ in boxes)

    # Compare with a plain re-encode at the same quality, so JPEG's own changes cancel out.
    reencoded = np.asarray(reencode(decode(jpeg), 95), dtype=np.int16)
    blurred = np.asarray(decode(blur_faces(jpeg, boxes, quality=95)), dtype=np.int16)
    x1, y1, x2, y2 = (int(v) for v in np.array(boxes[0]) * [400, 200, 400, 200])
    assert np.abs(blurred[y1:y2, x1:x2] - reencoded[y1:y2, x1:x2]).mean() > 3
    # Beyond the box, its 10% margin and the blur's reach (from x=304, a JPEG block boundary): untouched.
    np.testing.assert_array_equal(blurred[:, 304:], reencoded[:, 304:])


def test_blur_faces_without_boxes_returns_the_same_bytes():
    jpeg = web.encode_jpeg(synthetic_face(64))
    assert blur_faces(jpeg, []) is jpeg
    assert blur_faces(jpeg, None) is jpeg
