"""Face blurring: the paper blurs every detected face in the images a model is trained on.

The boxes come from the pool metadata's `face_bboxes`. Only the subset's samples are trained on, so only theirs
are read: the metadata is streamed in batches and kept in columnar form (sorted `u8,u8` uids beside an Arrow list
column), which the resharder asks uid by uid as it writes each shard; a dict of every face of the pool took a
Python object per box.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from datacomp_assets.core.uids import (
    UID_DTYPE, UidLookup, array_to_uids, arrow_uids_to_array, isin_sorted, sort_order, sort_uids, unique_sorted)

BOXES_TYPE = pa.list_(pa.list_(pa.float64()))
BATCH_ROWS = 1 << 16


class FaceBoxes(Mapping):
    """uid -> normalized [x1, y1, x2, y2] boxes, for samples with at least one face: `uids` sorted and distinct,
    `boxes[i]` those of `uids[i]`."""

    def __init__(self, uids: np.ndarray, boxes: pa.Array):
        self.uids, self.boxes, self.lookup = uids, boxes, UidLookup(uids)

    def __getitem__(self, uid: str) -> list:
        i = self.lookup.find(uid)
        if i is None:
            raise KeyError(uid)
        return self.boxes[i].as_py()

    def __iter__(self) -> Iterator[str]:
        return iter(array_to_uids(self.uids))

    def __len__(self) -> int:
        return len(self.uids)

    def digest(self) -> str:
        """A hash of every uid and box: what training shards blurred with these faces were cut with."""
        h = hashlib.sha256(np.ascontiguousarray(self.uids).tobytes())
        boxes = pc.list_flatten(self.boxes)
        for part in (pc.list_value_length(self.boxes), pc.list_value_length(boxes), pc.list_flatten(boxes)):
            h.update(np.ascontiguousarray(part.to_numpy(zero_copy_only=False)).tobytes())
        return h.hexdigest()


def _positions(keys: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Where each of the uids `present` (all there) is in the sorted distinct `keys`."""
    at = np.searchsorted(keys["f0"], present["f0"])
    for i in np.flatnonzero(keys["f1"][at] != present["f1"]):  # high halves shared: the next few
        while keys["f1"][at[i]] != present["f1"][i]:
            at[i] += 1
    return at


def _take(keys: np.ndarray, boxes: pa.Array, order: np.ndarray) -> FaceBoxes:
    """The entries at `order` (sorted keys), the first of equal keys kept."""
    keys, boxes = keys[order], boxes.take(pa.array(order))
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return FaceBoxes(keys[first], boxes.filter(pa.array(first)))


def _batches(sql: str, where: str) -> Iterator[pa.RecordBatch]:
    import duckdb

    try:
        with duckdb.connect() as con:
            yield from con.sql(sql).to_arrow_reader(BATCH_ROWS)
    except (duckdb.Error, pa.ArrowException) as err:
        raise ValueError(f"faces: {where}: {str(err).splitlines()[0]}") from None


def _files(paths: Sequence[Path]) -> str:
    return "[" + ", ".join("'" + os.path.abspath(p).replace("'", "''") + "'" for p in paths) + "]"


def _source_aliases(directory: Path, wanted: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(uid, pool_uid) pairs of a source made from the pool's images (a `pool_uid` column), those of `wanted`
    uids only when given; a source without tables (tars alone) or without the column has none."""
    tables = sorted(Path(directory).glob("*.parquet"))
    if not tables or "pool_uid" not in pq.read_schema(tables[0]).names:
        return np.empty(0, UID_DTYPE), np.empty(0, UID_DTYPE)
    uids, pool_uids = [], []
    for batch in _batches(f"SELECT uid, pool_uid FROM read_parquet({_files(tables)}) WHERE pool_uid IS NOT NULL",
                          str(directory)):
        uid, pool_uid = (arrow_uids_to_array(batch.column(i).cast(pa.string())) for i in (0, 1))
        keep = isin_sorted(uid, wanted) if wanted is not None else slice(None)
        uids.append(uid[keep])
        pool_uids.append(pool_uid[keep])
    return (np.concatenate(uids), np.concatenate(pool_uids)) if uids else (np.empty(0, UID_DTYPE),) * 2


def faces_in_pool(metadata_dir: str | os.PathLike, source_dirs: Sequence[str | os.PathLike] = (),
                  subset: np.ndarray | None = None) -> FaceBoxes:
    """The face boxes of the pool samples with detected faces, and of the samples of sources made from the pool's
    images (a `pool_uid` column: the recaptioned source), which carry their pool image's faces. With `subset`
    (sorted `u8,u8`), only its samples': the memory is that of the subset's faces, not of the pool's."""
    wanted = unique_sorted(subset) if subset is not None else None
    aliases = [_source_aliases(Path(d), wanted) for d in source_dirs]
    alias_uids = np.concatenate([a for a, _ in aliases]) if aliases else np.empty(0, UID_DTYPE)
    alias_pool = np.concatenate([p for _, p in aliases]) if aliases else np.empty(0, UID_DTYPE)
    pool_wanted = unique_sorted(sort_uids(np.concatenate([wanted, alias_pool]))) if wanted is not None else None

    files = sorted(Path(metadata_dir).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"faces: no parquet files in {metadata_dir}")
    keys, boxes = [], []
    for batch in _batches(f"SELECT uid, face_bboxes FROM read_parquet({_files(files)}) WHERE len(face_bboxes) > 0",
                          str(metadata_dir)):
        uid = arrow_uids_to_array(batch.column(0).cast(pa.string()))
        keep = isin_sorted(uid, pool_wanted) if pool_wanted is not None else np.ones(len(uid), dtype=bool)
        keys.append(uid[keep])
        boxes.append(batch.column(1).cast(BOXES_TYPE).filter(pa.array(keep)))
    keys_all = np.concatenate(keys) if keys else np.empty(0, UID_DTYPE)
    boxes_all = pa.concat_arrays(boxes) if boxes else pa.array([], BOXES_TYPE)
    pool = _take(keys_all, boxes_all, sort_order(keys_all))

    # Each derived sample with the boxes of its pool image, when that image has faces.
    hits = np.flatnonzero(isin_sorted(alias_pool, pool.uids))
    if len(hits):
        at = _positions(pool.uids, alias_pool[hits])
        keys_all = np.concatenate([pool.uids, alias_uids[hits]])
        boxes_all = pa.concat_arrays([pool.boxes, pool.boxes.take(pa.array(at))])
        pool = _take(keys_all, boxes_all, sort_order(keys_all))
    if wanted is not None:  # the pool images read only for a derived sample's sake are not the subset's
        keep = isin_sorted(pool.uids, wanted)
        pool = FaceBoxes(pool.uids[keep], pool.boxes.filter(pa.array(keep)))
    return pool


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
