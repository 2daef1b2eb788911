"""A model's scores of the pool's downloaded images with their captions, shard by shard (plain Python; no Dagster).

A score is the cosine of the model's image and caption embeddings, of the image as downloaded (the data filtering
network) or as a `prepare` step changed it (T-MARS masks its text, The Devil Is in the Details flips it), or any
other function of a shard's images and captions (SIEVE's, filtering/sieve.py). One parquet per pool shard (uid +
the score column + any extra columns), its values checked (each uid once, finite scores in range) and written under
a temporary name and renamed; a shard already scored is kept, so an interrupted run resumes, unless it is not what
was written (its manifest, the directory's `_manifest.json`, says so) or its values are wrong: then it is scored
again. Memory holds one shard's images.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from datacomp_assets.core.files import write_parquet_atomically
from datacomp_assets.core.integrity import RecordedTable, record_table, require_valid
from datacomp_assets.core.models import Scorer
from datacomp_assets.core.shards import read_downloaded

# images -> (the images to score, extra per-image columns)
Prepare = Callable[[list[Image.Image]], tuple[list[Image.Image], dict[str, np.ndarray]]]
# (shard name, its records, its images) -> (one score per image, extra per-image columns)
ShardScore = Callable[[str, list[dict], list[Image.Image]], tuple[np.ndarray, dict[str, np.ndarray]]]


def score_shards(shards_dir: str | os.PathLike, out_dir: str | os.PathLike, scorer: Scorer, column: str,
                 log: Callable[[str], None] = print, prepare: Prepare | None = None) -> dict:
    """Write `<out_dir>/<shard>.parquet` (uid, `column`, extra columns) for every downloaded shard: the cosine of
    the scorer's embeddings of each image (after `prepare`) and its caption; returns counts and timings."""
    def cosine(shard: str, records: list[dict], images: list[Image.Image]):
        images, extra = prepare(images) if prepare else (images, {})
        if not records:
            return np.empty(0, np.float32), extra
        image, text = scorer.embed(images, [r["text"] for r in records])
        return (image * text).sum(axis=1).astype(np.float32), extra

    return write_shard_scores(shards_dir, out_dir, column, cosine, log)


def write_shard_scores(shards_dir: str | os.PathLike, out_dir: str | os.PathLike, column: str, score: ShardScore,
                       log: Callable[[str], None] = print) -> dict:
    """Write `<out_dir>/<shard>.parquet` (uid, `column`, extra columns) for every downloaded shard, each from
    `score(shard, records, images)`; a shard already written is skipped. Returns counts and timings."""
    tars = sorted(Path(shards_dir).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no downloaded shards in {shards_dir}; materialize pool_shards first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scored, skipped, t0 = 0, 0, time.perf_counter()
    recorded = RecordedTable(out_dir)
    for i, tar in enumerate(tars, 1):
        target = out_dir / f"{tar.stem}.parquet"
        if target.exists():
            redo = recorded.reason_to_redo(target)
            if redo is None:
                skipped += 1
                continue
            log(f"{column}: {target}: {redo}; scoring shard {tar.name} again")  # never kept
        records, images = read_downloaded(tar)
        scores, extra = score(tar.stem, records, images)
        table = pa.table({"uid": pa.array([r["uid"] for r in records], pa.string()),
                          column: pa.array(scores, pa.float32()),
                          **{name: pa.array(values) for name, values in extra.items()}})
        require_valid(table, f"{target} (the scores of {tar})", "Not written: check the scoring model's checkpoint "
                      "(a cosine that is not a finite number in [-1, 1]) and the shard (a repeated uid).")
        write_parquet_atomically(table, target)
        scored += len(records)
        log(f"{column}: shard {i}/{len(tars)}: {len(records)} images")
    # The manifest readers check before every read (only the files written here are hashed).
    record_table(out_dir, out_dir.glob("*.parquet"), {"column": column})
    seconds = time.perf_counter() - t0
    return {"shards": len(tars), "shards_skipped": skipped, "images_scored": scored, "seconds": round(seconds, 1),
            "images_per_second": round(scored / seconds, 1) if scored and seconds else 0.0}
