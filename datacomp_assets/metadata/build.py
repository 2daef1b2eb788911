"""Compute the pool's metadata once: one parquet + npz per downloaded shard, in the reference schema.

Per sample: the reference columns (uid, url, text, original size, both CLIP similarity scores,
face_bboxes, sha256), the features filters need (fastText language and score, word/char/token counts),
and the L2-normalized image and text embeddings of both scorers under the reference's npz keys.
Shards are processed one at a time (bounded memory), and a shard already written is skipped (resume).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from datacomp_assets.metadata.language import caption_stats, identify_languages
from datacomp_assets.metadata.schema import write_metadata_shard
from datacomp_assets.pool.shards import iter_webdataset


@dataclass
class Scorer:
    """A CLIP model that embeds images and captions (prefix `b32` or `l14`, as in the reference's keys)."""

    prefix: str
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: str = "cpu"

    @torch.no_grad()
    def embed(self, images: list[Image.Image], texts: list[str], batch_size: int = 512):
        img, txt = [], []
        for i in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(im) for im in images[i:i + batch_size]]).to(self.device)
            img.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
            t = self.tokenizer(texts[i:i + batch_size]).to(self.device)
            txt.append(torch.nn.functional.normalize(self.model.encode_text(t).float(), dim=-1).cpu())
        return torch.cat(img).numpy(), torch.cat(txt).numpy()


_face_detector = None


def detect_faces(img: Image.Image) -> list[list[float]]:
    """Faces as normalized [x1, y1, x2, y2], with OpenCV's bundled frontal-face Haar cascade."""
    global _face_detector
    import cv2

    if _face_detector is None:
        _face_detector = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    gray = np.asarray(img.convert("L"))
    h, w = gray.shape
    if min(h, w) < 24:  # below the cascade's window
        return []
    boxes = _face_detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5)
    return [[x / w, y / h, (x + bw) / w, (y + bh) / h] for x, y, bw, bh in np.asarray(boxes).reshape(-1, 4)]


def read_downloaded(tar_path: Path) -> tuple[list[dict], list[Image.Image]]:
    """The successfully downloaded samples of one img2dataset shard: their json record and image."""
    records, images = [], []
    for _, files in iter_webdataset(tar_path):
        if "jpg" not in files or "json" not in files:
            continue
        meta = json.loads(files["json"])
        meta["text"] = files.get("txt", b"").decode("utf-8", errors="replace")
        records.append(meta)
        images.append(Image.open(io.BytesIO(files["jpg"])).convert("RGB"))
    return records, images


def shard_metadata(records: list[dict], images: list[Image.Image], scorers: list[Scorer]):
    """(table, embeddings) for one shard's samples."""
    texts = [r["text"] for r in records]
    languages, language_scores = identify_languages(texts)
    stats = caption_stats(texts)
    embeddings, scores = {}, {}
    for scorer in scorers:
        img, txt = scorer.embed(images, texts)
        embeddings[f"{scorer.prefix}_img"], embeddings[f"{scorer.prefix}_txt"] = img, txt
        scores[scorer.prefix] = (img * txt).sum(axis=1).astype(np.float32)
    n = len(records)
    empty = np.full(n, np.nan, dtype=np.float32)
    table = pa.table({
        "uid": [r["uid"] for r in records],
        "url": [r.get("url") for r in records],
        "text": texts,
        "original_width": pa.array([r.get("original_width") for r in records], pa.int64()),
        "original_height": pa.array([r.get("original_height") for r in records], pa.int64()),
        "clip_b32_similarity_score": scores.get("b32", empty),
        "clip_l14_similarity_score": scores.get("l14", empty),
        "face_bboxes": pa.array([detect_faces(im) for im in images], pa.list_(pa.list_(pa.float64()))),
        "sha256": [r.get("sha256") for r in records],
        "language": languages,
        "language_score": pa.array(language_scores, pa.float32()),
        "num_words": pa.array(stats["num_words"], pa.int32()),
        "num_chars": pa.array(stats["num_chars"], pa.int32()),
        "num_tokens": pa.array(stats["num_tokens"], pa.int32()),
    })
    return table, embeddings


def build_pool_metadata(shards_dir: str | Path, out_dir: str | Path, scorers: list[Scorer],
                        log: Callable[[str], None] = print) -> dict:
    """Write `<out_dir>/<shard>.parquet` and `.npz` for every shard; returns counts and timings."""
    tars = sorted(Path(shards_dir).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no shards in {shards_dir}; materialize pool_shards first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped, t0 = 0, 0, time.perf_counter()
    for i, tar in enumerate(tars):
        stem = out_dir / tar.stem
        if stem.with_suffix(".parquet").exists() and stem.with_suffix(".npz").exists():
            skipped += 1
            continue
        records, images = read_downloaded(tar)
        table, embeddings = shard_metadata(records, images, scorers)
        write_metadata_shard(table, embeddings, stem)
        rows += table.num_rows
        log(f"metadata shard {i + 1}/{len(tars)}: {table.num_rows} rows")
    seconds = time.perf_counter() - t0
    return {"shards": len(tars), "shards_skipped": skipped, "rows_computed": rows, "seconds": seconds,
            "rows_per_second": rows / seconds if seconds and rows else None}
