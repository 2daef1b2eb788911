"""T-MARS's text detection and masking: PP-OCR's detector (shipped in rapidocr-onnxruntime) finds words drawn with
PIL on plain and noisy backgrounds, at 64 px and larger, and leaves shapes alone; masking fills each box with the
mean of the pixels around it (checked against a plain loop) and touches nothing else."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from datacomp_assets.filtering.text_masking import (
    MODEL_FILE,
    TextDetector,
    default_ring,
    detector_model_path,
    flipped,
    mask_text,
    masked_images,
    text_area_share,
    text_mask,
)


@pytest.fixture(scope="module")
def detector():
    return TextDetector()


def _background(rng, size, noisy, base=None):
    """A plain colour, or grain of +-30 in 2x2 blocks around one (like the synthetic web's photos); light unless
    `base` says otherwise."""
    w, h = size
    base = rng.integers(170, 230, 3) if base is None else np.array(base)
    if not noisy:
        return Image.new("RGB", size, tuple(int(v) for v in base))
    grain = rng.integers(-30, 31, ((h + 1) // 2, (w + 1) // 2, 1)).repeat(2, 0).repeat(2, 1)[:h, :w]
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8), "RGB")


def _shapes(draw, rng, size, n):
    """Filled circles and regular polygons with a dark outline, as the synthetic web draws its objects."""
    w, h = size
    grid = 1 if n == 1 else 2
    cell = min(w, h) / grid
    for c in rng.permutation(grid * grid)[:n]:
        gx, gy = divmod(int(c), grid)
        r, cx, cy = cell * rng.uniform(0.28, 0.42), gx * cell + cell / 2, gy * cell + cell / 2
        fill, width = tuple(int(v) for v in rng.integers(0, 256, 3)), max(1, min(w, h) // 60)
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=(20, 20, 20), width=width)
        else:
            m = int(rng.integers(3, 7))
            angles = rng.uniform(0, 2 * np.pi) + np.arange(m) * 2 * np.pi / m
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=fill,
                         outline=(20, 20, 20), width=width)


def _write(img, words, font_size, colour, where):
    """Draw words (one line, or one word a line where they would not fit) at `where` ("top", "bottom" or a
    point); returns the ink: the pixels the text changed."""
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=font_size)
    text = words
    if draw.multiline_textbbox((0, 0), text, font=font)[2] > img.width - 2:
        text = words.replace(" ", "\n")
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    x = (img.width - (right - left)) / 2 - left
    if where == "top":
        y = 3 - top
    elif where == "bottom":
        y = img.height - 3 - bottom
    else:
        x, y = where
    before = np.asarray(img).astype(int)
    draw.multiline_text((x, y), text, fill=colour, font=font)
    return np.abs(np.asarray(img).astype(int) - before).sum(-1) > 60


# (size, words, font size, colour, background: None for a light one, or its base colour, noisy or not, shapes
# beside the words)
TEXT_CASES = [
    ((64, 64), "RED STAR", 14, (200, 20, 20), None, False, False),
    ((64, 64), "RED STAR", 18, (30, 40, 200), None, True, False),
    ((64, 64), "SALE", 20, (0, 0, 0), (150, 60, 60), True, False),
    ((64, 64), "BLUE BOX", 12, (20, 20, 20), (150, 120, 200), True, False),
    ((64, 64), "RED STAR", 13, (210, 20, 20), None, False, True),
    ((64, 64), "GREEN", 16, (10, 120, 30), (200, 200, 220), True, True),
    ((64, 51), "OPEN", 15, (255, 255, 255), (70, 80, 90), True, False),
    ((64, 64), "YELLOW", 14, (240, 220, 30), (40, 40, 120), False, True),
    ((128, 128), "FRESH FRUIT", 22, (120, 0, 120), None, True, True),
    ((256, 192), "RED STAR", 56, (200, 20, 20), None, False, True),
]


@pytest.mark.parametrize("size,words,font_size,colour,base,noisy,shapes", TEXT_CASES)
def test_detector_finds_the_words(detector, size, words, font_size, colour, base, noisy, shapes):
    rng = np.random.default_rng(font_size)
    img = _background(rng, size, noisy, base)
    if shapes:  # the shape in one half, the words in the other
        half = Image.new("RGB", (size[0], size[1] // 2))
        half.paste(img.crop((0, size[1] // 2, size[0], size[1])))
        _shapes(ImageDraw.Draw(half), rng, half.size, 1)
        img.paste(half, (0, size[1] // 2))
    ink = _write(img, words, font_size, colour, "top" if shapes else (3, size[1] // 4))
    boxes = detector.boxes(img)
    assert boxes, "no text found"
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]
    covered = text_mask(size, boxes)
    assert (ink & covered).sum() >= 0.98 * ink.sum()  # the words' pixels are inside the boxes
    ys, xs = np.nonzero(ink)
    text_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    assert covered.sum() <= 3 * text_area  # boxes hug the words, not the whole image


def test_shapes_alone_get_no_boxes(detector):
    """Circles and polygons (1-4 per image, like the synthetic web's objects) are not text. 1,200 such images
    measured: no box on any; the web's own glyph-like objects (rings, crosses, tees side by side) do get boxes
    on about 3% of its text-free 64 px images."""
    rng = np.random.default_rng(0)
    images = []
    for size in ((64, 64), (64, 51), (256, 256)):
        for noisy in (False, True):
            for _ in range(8):
                img = _background(rng, size, noisy)
                _shapes(ImageDraw.Draw(img), rng, size, int(rng.integers(1, 5)))
                images.append(img)
    found = detector.boxes_batch(images)
    assert [b for b in found if b] == []


def test_plain_and_noisy_backgrounds_get_no_boxes(detector):
    rng = np.random.default_rng(1)
    assert detector.boxes_batch([_background(rng, (64, 64), noisy) for noisy in (False, True) * 4]) == [[]] * 8


def test_screening_pass_keeps_the_text_and_skips_the_rest():
    rng = np.random.default_rng(2)
    text = _background(rng, (64, 64), False)
    _write(text, "RED STAR", 14, (200, 20, 20), (2, 16))
    blank = _background(rng, (64, 64), True)
    full, screened = TextDetector(screen=False), TextDetector()
    assert screened.screen_side == 64 and full.screen_side is None
    found = full.boxes_batch([text, blank])
    assert found[0] and not found[1] and screened.boxes_batch([text, blank]) == found


def _surrounding_mean_by_loop(pixels, boxes, box, ring):
    """The mean of every pixel within `ring` px of the box (outside it) and inside no box, written as a loop."""
    h, w = pixels.shape[:2]
    x0, y0, x1, y1 = box
    total, count = np.zeros(3), 0
    for y in range(h):
        for x in range(w):
            near = x0 - ring <= x < x1 + ring and y0 - ring <= y < y1 + ring
            in_a_box = any(a <= x < c and b <= y < d for a, b, c, d in boxes)
            if near and not in_a_box:
                total += pixels[y, x]
                count += 1
    return tuple(round(v) for v in total / count)


@pytest.mark.parametrize("ring", [1, 2, 5])
def test_fill_is_the_mean_of_the_surrounding_ring(ring):
    rng = np.random.default_rng(ring)
    pixels = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    boxes = [(5, 6, 20, 14), (18, 12, 30, 25), (0, 30, 10, 40)]  # overlapping, and one at the image's corner
    masked = np.asarray(mask_text(Image.fromarray(pixels), boxes, ring=ring))
    for box in boxes[1:]:  # the boxes no later box overlaps
        x0, y0, x1, y1 = box
        expected = _surrounding_mean_by_loop(pixels.astype(np.float64), boxes, box, ring)
        assert (masked[y0:y1, x0:x1] == expected).all()
    outside = ~text_mask((50, 40), boxes)
    assert (masked[outside] == pixels[outside]).all()


def test_masking_leaves_no_text_and_nothing_else_changed(detector):
    rng = np.random.default_rng(3)
    img = _background(rng, (64, 64), True, (90, 150, 200))
    original = np.asarray(img).copy()
    ink = _write(img, "RED STAR", 15, (220, 20, 20), (3, 20))
    with_text = np.asarray(img).copy()
    boxes = detector.boxes(img)
    masked = np.asarray(mask_text(img, boxes))
    covered = text_mask(img.size, boxes)
    assert (masked[~covered] == with_text[~covered]).all()
    assert not (masked[ink] == with_text[ink]).all(axis=-1).any()  # no stroke pixel survives...
    for x0, y0, x1, y1 in boxes:  # ...each box is one colour, close to the background's
        region = masked[y0:y1, x0:x1].reshape(-1, 3)
        assert (region == region[0]).all()
        assert np.abs(region[0].astype(int) - original.reshape(-1, 3).mean(0)).max() < 25


def test_masked_images_and_text_area_share(detector):
    rng = np.random.default_rng(4)
    text = _background(rng, (64, 64), False)
    _write(text, "SALE", 20, (0, 0, 0), (8, 20))
    blank = _background(rng, (64, 48), True)
    masked, shares = masked_images([text, blank], detector)
    boxes = detector.boxes(text)
    assert shares.dtype == np.float32 and shares.shape == (2,)
    assert shares[0] == pytest.approx(text_mask(text.size, boxes).sum() / (64 * 64))
    assert 0.05 < shares[0] < 0.6 and shares[1] == 0.0
    assert np.array_equal(np.asarray(masked[0]), np.asarray(mask_text(text, boxes)))
    assert np.array_equal(np.asarray(masked[1]), np.asarray(blank)) and masked[1] is not blank


def test_text_area_share_counts_overlaps_once():
    assert text_area_share((10, 10), [(0, 0, 5, 10), (3, 0, 6, 10), (8, 8, 20, 20)]) == pytest.approx(0.64)
    assert text_area_share((10, 10), []) == 0.0


def test_mask_text_without_boxes_and_other_modes():
    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    out = mask_text(img, [])
    assert np.array_equal(np.asarray(out), np.asarray(img)) and out is not img
    grey = Image.new("L", (8, 8), 100)
    assert mask_text(grey, [(2, 2, 4, 4)]).mode == "RGB"
    whole = mask_text(img, [(0, 0, 4, 4)])  # nothing around it: the image's own mean
    assert (np.asarray(whole) == np.rint(np.asarray(img).reshape(-1, 3).mean(0))).all()
    assert default_ring((64, 51)) == 2 and default_ring((512, 400)) == 16


def test_flipped_mirrors_left_to_right():
    pixels = np.random.default_rng(5).integers(0, 256, (6, 9, 3)).astype(np.uint8)
    assert np.array_equal(np.asarray(flipped(Image.fromarray(pixels))), pixels[:, ::-1])


def test_the_model_ships_in_the_wheel():
    import rapidocr_onnxruntime

    path = detector_model_path()
    assert path.name == MODEL_FILE and path.is_file() and path.stat().st_size > 1_000_000
    assert Path(rapidocr_onnxruntime.__file__).parent in path.parents


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)
    with pytest.raises(ImportError, match="rapidocr-onnxruntime"):
        TextDetector()


def test_side_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        TextDetector(side=100)
