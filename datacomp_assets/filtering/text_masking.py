"""Text in images, found and masked, for T-MARS (plain Python; no Dagster).

T-MARS (Maini et al. 2023) detects the text in each image, masks every text box with the mean colour of the
pixels around it, re-embeds the masked image and keeps the pairs whose masked image still matches the caption.
The detector here is PP-OCRv4's text detector (DB: a per-pixel text probability map, thresholded into boxes) from
the ONNX file shipped inside the `rapidocr-onnxruntime` wheel, run alone on onnxruntime's CPU provider: no text
recognition, nothing downloaded. T-MARS ran FAST on images square-padded and resized to 512 px; the tiny pool's
images are 64 px, so each image is scaled to `side` (128 by default: the smallest size that finds words of
12-20 px at 64 px reliably) on a square canvas padded with its edge pixels, and the boxes are mapped back.

Boxes are axis-aligned, in the image's pixel coordinates, half-open: (x0, y0, x1, y1) covers columns x0..x1-1
and rows y0..y1-1 (PIL's crop convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

PACKAGE = "rapidocr-onnxruntime"
MODEL_FILE = "ch_PP-OCRv4_det_infer.onnx"  # in rapidocr_onnxruntime/models/

Box = tuple[int, int, int, int]


def detector_model_path() -> Path:
    """The detection model's file inside the installed wheel (ImportError naming the package when it is missing)."""
    try:
        import rapidocr_onnxruntime
    except ImportError as e:
        raise ImportError(f"the text detector needs the {PACKAGE} package (its wheel ships the PP-OCR models); "
                          f"install the project's requirements.lock, or: pip install {PACKAGE}==1.4.4") from e
    path = Path(rapidocr_onnxruntime.__file__).parent / "models" / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{PACKAGE} is installed but its detection model {path} is missing; reinstall it")
    return path


class TextDetector:
    """PP-OCRv4's text detector: `boxes(image)` for one image, `boxes_batch(images)` for many (faster).

    `side`: the canvas (a multiple of 32) each image is scaled onto, its longest side fitting it. `screen`: first
    a pass over every image at half that size (64 px for 128), then the full pass only on the images whose text
    probability somewhere exceeds `screen_threshold`; on the synthetic web's 64 px images it costs 2.3x less CPU when
    8% hold text, finds the same text in the text-only images and misses 1 of 151 small overlaid captions that the
    full pass finds. `threads`: onnxruntime's intra-op threads (None: its default, one a core). `thresh`,
    `box_thresh`, `unclip_ratio`: the DB post-processing's pixel threshold, box score threshold and box expansion
    (rapidocr's defaults). `min_aspect`: a box is kept only when its (rotated) rectangle is at least this many
    times longer than wide: words are, while a lone glyph-like shape (a ring, a cross, a tee) is not; 0 keeps
    every box. On the synthetic web's 64 px images it cuts the text-free images given a box from 11.5% to 2.9%
    and drops 1% of the boxes of written words (a lone letter among them).
    """

    def __init__(self, side: int = 128, screen: bool = True, screen_threshold: float = 0.03,
                 batch_size: int = 64, threads: int | None = None, thresh: float = 0.3, box_thresh: float = 0.5,
                 unclip_ratio: float = 1.6, min_aspect: float = 1.5):
        if side < 32 or side % 32:
            raise ValueError(f"side must be a positive multiple of 32 (the network's stride), not {side}")
        model = detector_model_path()
        import onnxruntime as ort
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle threads sleep instead of spinning: on two shared cores, spinning threads slow whatever else runs
        # (and this detector too, by half, when the cores are busy).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.postprocess = DBPostProcess(thresh=thresh, box_thresh=box_thresh, unclip_ratio=unclip_ratio,
                                         use_dilation=True, score_mode="fast")
        self.thresh = thresh
        self.min_aspect = min_aspect
        self.side = side
        half = max(32, side // 64 * 32)
        self.screen_side = half if screen and half < side else None
        self.screen_threshold = screen_threshold
        self.batch_size = batch_size

    def boxes(self, image: Image.Image) -> list[Box]:
        """The text boxes of one image, in its pixel coordinates."""
        return self.boxes_batch([image])[0]

    def boxes_batch(self, images: Sequence[Image.Image]) -> list[list[Box]]:
        """The text boxes of each image, batched through the network."""
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        todo = list(range(len(rgb)))
        if self.screen_side:
            todo = self._screened(rgb)
        out: list[list[Box]] = [[] for _ in rgb]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            batch, scales = _canvas([rgb[i] for i in chunk], self.side)
            pred = self.session.run(None, {self.input_name: batch})[0]
            for i, p, (nw, nh) in zip(chunk, pred, scales):
                out[i] = self._boxes_from_map(p[:, :nh, :nw], rgb[i].size)
        return out

    def _screened(self, rgb: list[Image.Image]) -> list[int]:
        keep = []
        for start in range(0, len(rgb), self.batch_size):
            m = self._max_probability(rgb[start:start + self.batch_size], self.screen_side)
            keep += [start + int(j) for j in np.flatnonzero(m > self.screen_threshold)]
        return keep

    def _max_probability(self, images: list[Image.Image], side: int) -> np.ndarray:
        batch, _ = _canvas(images, side)
        pred = self.session.run(None, {self.input_name: batch})[0]
        return pred.reshape(len(images), -1).max(axis=1)

    def _boxes_from_map(self, prob: np.ndarray, size: tuple[int, int]) -> list[Box]:
        """Boxes in the image's pixels from its probability map (1, nh, nw) on the scaled image."""
        if prob.max() <= self.thresh:
            return []
        nh, nw = prob.shape[1:]
        quads, _ = self.postprocess(prob[None], (nh, nw))
        w, h = size
        sx, sy = nw / w, nh / h
        boxes = []
        for q in quads:
            long, short = sorted((np.linalg.norm(q[1] - q[0]), np.linalg.norm(q[2] - q[1])), reverse=True)
            if long < self.min_aspect * short:
                continue
            x0 = max(0, math.floor(q[:, 0].min() / sx))
            y0 = max(0, math.floor(q[:, 1].min() / sy))
            x1 = min(w, math.ceil(q[:, 0].max() / sx))
            y1 = min(h, math.ceil(q[:, 1].max() / sy))
            if x1 > x0 and y1 > y0:
                boxes.append((x0, y0, x1, y1))
        return boxes


def _canvas(images: Sequence[Image.Image], side: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A float32 NCHW batch (BGR, scaled to [-1, 1], as PaddleOCR trained it) of the images scaled so their longest
    side is `side`, each padded to side x side with its edge pixels; and each scaled image's (width, height)."""
    batch = np.empty((len(images), side, side, 3), np.uint8)
    scales = []
    for k, im in enumerate(images):
        w, h = im.size
        s = side / max(w, h)
        nw, nh = min(side, max(1, round(w * s))), min(side, max(1, round(h * s)))
        a = np.asarray(im.resize((nw, nh), Image.BILINEAR))
        batch[k] = np.pad(a, ((0, side - nh), (0, side - nw), (0, 0)), mode="edge")
        scales.append((nw, nh))
    x = batch[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)
    x *= 2 / 255.0
    x -= 1.0
    return np.ascontiguousarray(x), scales


def _clipped(boxes: Sequence[Box], w: int, h: int) -> list[Box]:
    out = []
    for x0, y0, x1, y1 in boxes:
        x0, y0, x1, y1 = max(0, int(x0)), max(0, int(y0)), min(w, int(x1)), min(h, int(y1))
        if x1 > x0 and y1 > y0:
            out.append((x0, y0, x1, y1))
    return out


def text_mask(size: tuple[int, int], boxes: Sequence[Box]) -> np.ndarray:
    """A (height, width) boolean array, True inside any box."""
    w, h = size
    covered = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in _clipped(boxes, w, h):
        covered[y0:y1, x0:x1] = True
    return covered


def text_area_share(size: tuple[int, int], boxes: Sequence[Box]) -> float:
    """The share of the image's pixels inside the union of the boxes."""
    return float(text_mask(size, boxes).mean()) if size[0] and size[1] else 0.0


def default_ring(size: tuple[int, int]) -> int:
    """The width of the border ring whose mean fills a box: 2 px at 64 px, growing with the image."""
    return max(1, round(max(size) / 32))


def surrounding_colour(pixels: np.ndarray, covered: np.ndarray, box: Box, ring: int) -> tuple[int, ...]:
    """The mean colour (rounded half to even) of the ring of pixels up to `ring` px outside the box, less any pixel
    inside a text box; when that leaves nothing, of every pixel outside the text boxes; then of the whole image."""
    h, w = covered.shape
    x0, y0, x1, y1 = box
    X0, Y0, X1, Y1 = max(0, x0 - ring), max(0, y0 - ring), min(w, x1 + ring), min(h, y1 + ring)
    around = pixels[Y0:Y1, X0:X1][~covered[Y0:Y1, X0:X1]]
    if not len(around):
        around = pixels[~covered]
    if not len(around):
        around = pixels.reshape(-1, pixels.shape[-1])
    return tuple(int(v) for v in np.rint(around.mean(axis=0, dtype=np.float64)))


def mask_text(image: Image.Image, boxes: Sequence[Box], ring: int | None = None) -> Image.Image:
    """T-MARS's masking: each box filled with the mean colour of the pixels around it (`surrounding_colour`, from
    the unmasked image). Returns a new RGB image; pixels outside the boxes are unchanged."""
    img = image if image.mode == "RGB" else image.convert("RGB")
    pixels = np.array(img)
    boxes = _clipped(boxes, *img.size)
    if not boxes:
        return img.copy()
    ring = default_ring(img.size) if ring is None else ring
    covered = text_mask(img.size, boxes)
    fills = [surrounding_colour(pixels, covered, b, ring) for b in boxes]
    out = pixels.copy()
    for (x0, y0, x1, y1), fill in zip(boxes, fills):
        out[y0:y1, x0:x1] = fill
    return Image.fromarray(out, "RGB")


def masked_images(images: Sequence[Image.Image], detector: TextDetector,
                  ring: int | None = None) -> tuple[list[Image.Image], np.ndarray]:
    """Each image with its text masked, and the share of its area inside text boxes (float32)."""
    found = detector.boxes_batch(images)
    masked = [mask_text(im, b, ring) for im, b in zip(images, found)]
    shares = np.array([text_area_share(im.size, b) for im, b in zip(images, found)], np.float32)
    return masked, shares


def flipped(image: Image.Image) -> Image.Image:
    """The image mirrored left to right (for a flipped-image CLIP score)."""
    return ImageOps.mirror(image)
