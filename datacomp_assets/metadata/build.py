"""Compute the pool's metadata once: one parquet + npz per downloaded shard, in the reference schema.

Per sample: the reference columns (uid, url, text, original size, both CLIP similarity scores,
face_bboxes, sha256), the features filters need (fastText language and score, word/char/token counts),
and the L2-normalized image and text embeddings of both scorers under the reference's npz keys.
Shards are processed one at a time (bounded memory), and a shard already written is skipped (resume).

The paper's safety preprocessing happens here, before any filter sees the pool: samples whose caption
holds an unsafe word, and near-duplicates of evaluation images, are removed, and each removal is recorded
with its reason in `removed/<shard>.parquet` for audits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datacomp_assets.core.files import write_parquet_atomically
from datacomp_assets.core.integrity import RecordedTable, file_problems, require_valid
from datacomp_assets.core.layout import REMOVED_DIR, Asset
from datacomp_assets.core.models import Scorer
from datacomp_assets.core.schema import FULL_SCHEMA, write_metadata_shard
from datacomp_assets.core.shards import read_downloaded
from datacomp_assets.core.language import caption_stats, identify_languages, identify_languages_cld3
from datacomp_assets.metadata.safety import find_eval_duplicates, image_fingerprints, unsafe_text_mask


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
        "cld3_language": identify_languages_cld3(texts),
        "num_words": pa.array(stats["num_words"], pa.int32()),
        "num_chars": pa.array(stats["num_chars"], pa.int32()),
        "num_tokens": pa.array(stats["num_tokens"], pa.int32()),
    })
    return table, embeddings


REMOVED_SCHEMA = pa.schema([("uid", pa.string()), ("text", pa.string()), ("reason", pa.string()),
                            ("eval_similarity", pa.float32())])


def removal_reasons(records: list[dict], images: list[Image.Image], eval_fingerprints: np.ndarray | None,
                    threshold: float) -> tuple[list[str | None], np.ndarray]:
    """Per sample: why it leaves the pool ("unsafe_text", "eval_duplicate") or None; and its highest
    similarity to an evaluation image."""
    unsafe = unsafe_text_mask([r["text"] for r in records])
    similarity = np.full(len(records), -np.inf, dtype=np.float32)
    duplicate = np.zeros(len(records), dtype=bool)
    if eval_fingerprints is not None and len(images):
        duplicate, similarity = find_eval_duplicates(image_fingerprints(images), eval_fingerprints, threshold)
    reasons = ["unsafe_text" if u else "eval_duplicate" if d else None for u, d in zip(unsafe, duplicate)]
    return reasons, similarity


def write_removed(records: list[dict], reasons: list, similarity: np.ndarray, path: Path) -> int:
    rows = [i for i, r in enumerate(reasons) if r]
    table = pa.table({"uid": [records[i]["uid"] for i in rows], "text": [records[i]["text"] for i in rows],
                      "reason": [reasons[i] for i in rows], "eval_similarity": similarity[rows]},
                     schema=REMOVED_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomically(table, path)
    return len(rows)


def _reason_to_redo(stem: Path, recorded: RecordedTable) -> str | None:
    """None when a shard written before may be kept: with every column of today's schema (an older build is
    redone), and its content the one pool_metadata recorded (or, unrecorded, its values valid); else why not
    ("" when it was never written)."""
    parquet = stem.with_suffix(".parquet")
    if not (parquet.exists() and stem.with_suffix(".npz").exists()):
        return ""
    try:
        names = pq.read_schema(parquet).names
    except (OSError, pa.ArrowException):
        return file_problems(parquet)[0]  # "is not a readable parquet file (...)"
    if not set(FULL_SCHEMA.names) <= set(names):
        return "written by an older build, without today's columns"
    return recorded.reason_to_redo(parquet)


def build_pool_metadata(shards_dir: str | Path, out_dir: str | Path, scorers: list[Scorer],
                        log: Callable[[str], None] = print, eval_fingerprints: np.ndarray | None = None,
                        duplicate_threshold: float = 0.97,
                        progress: Callable[[int, str], None] | None = None) -> dict:
    """Write `<out_dir>/<shard>.parquet` and `.npz` for every shard; returns counts and timings. Each shard done
    goes to `progress(shards done, note)` if given, else to `log`."""
    tars = sorted(Path(shards_dir).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no shards in {shards_dir}; materialize pool_shards first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped, t0 = 0, 0, time.perf_counter()
    recorded = RecordedTable(out_dir)
    for i, tar in enumerate(tars):
        stem = out_dir / tar.stem
        redo = _reason_to_redo(stem, recorded)
        if redo is None:
            skipped += 1
            continue
        if redo:  # a file that is not what was written is computed again, never kept
            log(f"metadata shard {tar.stem}.parquet: {redo}; computing it again")
        records, images = read_downloaded(tar)
        reasons, similarity = removal_reasons(records, images, eval_fingerprints, duplicate_threshold)
        write_removed(records, reasons, similarity, out_dir / REMOVED_DIR / f"{tar.stem}.parquet")
        kept = [i for i, r in enumerate(reasons) if r is None]
        table, embeddings = shard_metadata([records[i] for i in kept], [images[i] for i in kept], scorers)
        require_valid(table, f"{stem}.parquet (from {tar})", f"Not written: materialize {Asset.POOL_SHARDS} and "
                      f"{Asset.SCORER_MODELS} again (a repeated uid comes from the shard, a score that is not a finite "
                      "number in [-1, 1] from a scorer).")
        write_metadata_shard(table, embeddings, stem)
        rows += table.num_rows
        note = f"{table.num_rows} rows kept, {len(records) - len(kept)} removed"
        if progress:
            progress(i + 1, note)
        else:
            log(f"metadata shard {i + 1}/{len(tars)}: {note}")
    seconds = time.perf_counter() - t0
    removed = pq.read_table(out_dir / "removed", columns=["reason"])["reason"].to_pylist()
    return {"shards": len(tars), "shards_skipped": skipped, "rows_computed": rows, "seconds": seconds,
            "removed_unsafe_text": removed.count("unsafe_text"),
            "removed_eval_duplicate": removed.count("eval_duplicate"),
            "rows_per_second": rows / seconds if seconds and rows else None}
