"""Face blurring: the paper blurs every detected face in the images a model is trained on."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image


def blur_faces(jpeg_bytes: bytes, face_bboxes: Sequence[Sequence[float]] | None, quality: int = 95) -> bytes:
    """JPEG bytes with each normalized [x1, y1, x2, y2] box Gaussian-blurred, as img2dataset blurs them.

    Like img2dataset's BoundingBoxBlurrer (after the ImageNet face-obfuscation code): each box grows by
    10% of its longer side, sigma is 10% of the longest box side, and the blurred image is blended in
    through a blurred mask so the edges do not show. No boxes: the same bytes, not re-encoded.
    """
    if face_bboxes is None or len(face_bboxes) == 0:
        return jpeg_bytes
    import cv2

    img = np.asarray(Image.open(io.BytesIO(jpeg_bytes)).convert("RGB"), dtype=np.float32) / 255.0
    height, width = img.shape[:2]
    mask = np.zeros_like(img)
    max_side = 0
    for x1, y1, x2, y2 in face_bboxes:
        box = [int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height)]
        side = max(box[2] - box[0], box[3] - box[1])
        max_side = max(max_side, side)
        grow = int(0.1 * side)
        left, top = max(0, box[0] - grow), max(0, box[1] - grow)
        right, bottom = min(width, box[2] + grow), min(height, box[3] + grow)
        mask[top:bottom, left:right] = 1.0
    sigma = max(0.1 * max_side, 1.0)
    kernel = int(2 * np.ceil(3 * sigma) + 1)  # odd, covers +-3 sigma
    blurred = cv2.GaussianBlur(img, (kernel, kernel), sigma)
    soft_mask = cv2.GaussianBlur(mask, (kernel, kernel), sigma)
    result = img * (1 - soft_mask) + blurred * soft_mask
    buf = io.BytesIO()
    Image.fromarray((result * 255.0 + 0.5).clip(0, 255).astype(np.uint8)).save(buf, format="JPEG",
                                                                                quality=quality)
    return buf.getvalue()
