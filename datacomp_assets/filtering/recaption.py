"""Recaptioning (Nguyen et al., NeurIPS 2023, "Improving multimodal datasets with image captioning"): the pool's
images with captions a captioner writes, as a bring-your-own-data source beside the pool (plain Python; no Dagster).

Each pool image still in the pool (the safety steps' removals stay removed) becomes one sample of the source: the
same image bytes, one caption sampled by the captioner (nucleus sampling, top-p 0.9, as SIEVE samples), and a uid of
its own derived from the pool uid, so that a subset can hold an image with its alt-text and, separately, with a
generated caption. `pool_uid` records which pool image it is. `clip_l14_similarity_score` is the L/14 cosine of the
image and the generated caption, so a rule over the source can filter generated captions as the paper does. A caption
that decodes to nothing is written with the status `empty_caption`, so no rule keeps it.

One tar and one parquet per pool shard, each written under a temporary name and renamed; a shard already written is
kept, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from datacomp_assets.core.files import temporary_sibling, write_parquet_atomically
from datacomp_assets.core.integrity import RecordedTable, record_table, require_valid
from datacomp_assets.core.scorers import RECAPTIONED_SOURCE
from datacomp_assets.core.shards import iter_webdataset, write_webdataset

# (images) -> one generated caption per image
Captioner = Callable[[list[Image.Image]], list[str]]
# (images, captions) -> the cosine of each image and its caption
PairScore = Callable[[list[Image.Image], list[str]], np.ndarray]


def recaptioned_uid(pool_uid: str) -> str:
    """The source's uid of a pool image: stable, and never one of the pool's (a different hash of a different text)."""
    return hashlib.blake2b(f"{RECAPTIONED_SOURCE}:{pool_uid}".encode(), digest_size=16).hexdigest()


def write_recaptioned_source(shards_dir: str | os.PathLike, out_dir: str | os.PathLike,
                             in_pool: Callable[[list[str]], np.ndarray],
                             caption: Callable[[str], Captioner], score: PairScore,
                             log: Callable[[str], None] = print) -> dict:
    """Write `<out_dir>/<shard>.tar` and `.parquet` for every pool shard: its downloaded images that `in_pool` (uids
    -> a mask) keeps, each with `caption(shard)`'s caption for it (a per-shard captioner, so a resumed run writes the
    captions an uninterrupted one would have) and `score`. Returns counts and timings."""
    tars = sorted(Path(shards_dir).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no downloaded shards in {shards_dir}; materialize pool_shards first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = skipped = empty = 0
    t0 = time.perf_counter()
    recorded = RecordedTable(out_dir)
    for i, tar in enumerate(tars, 1):
        table_path = out_dir / f"{tar.stem}.parquet"
        if table_path.exists():  # the parquet is written last: its presence means the shard is complete
            redo = recorded.reason_to_redo(table_path)
            if redo is None:
                skipped += 1
                continue
            log(f"recaptioned: {table_path}: {redo}; recaptioning shard {tar.name} again")  # never kept
        pool_uids, alt_texts, jpgs = _downloaded_in_pool(tar, in_pool)
        images = [Image.open(io.BytesIO(jpg)).convert("RGB") for jpg in jpgs]
        captions = caption(tar.stem)(images) if images else []
        scores = score(images, captions) if images else np.empty(0, np.float32)
        uids = [recaptioned_uid(u) for u in pool_uids]
        keys = [f"{tar.stem}{k:05d}" for k in range(len(uids))]
        samples = ((key, {"jpg": jpg, "txt": text.encode(),
                          "json": json.dumps({"uid": uid, "pool_uid": pool_uid, "caption": text}).encode()})
                   for key, jpg, text, uid, pool_uid in zip(keys, jpgs, captions, uids, pool_uids))
        tmp = temporary_sibling(out_dir / tar.name)
        try:
            write_webdataset(tmp, samples)
            os.replace(tmp, out_dir / tar.name)
        finally:
            tmp.unlink(missing_ok=True)
        table = pa.table({
            "uid": pa.array(uids, pa.string()), "key": pa.array(keys, pa.string()),
            "status": pa.array(["success" if c.strip() else "empty_caption" for c in captions], pa.string()),
            "caption": pa.array(captions, pa.string()),
            "pool_uid": pa.array(pool_uids, pa.string()), "alt_text": pa.array(alt_texts, pa.string()),
            "clip_l14_similarity_score": pa.array(np.asarray(scores, np.float32), pa.float32())})
        require_valid(table, f"{table_path} (from {tar})", "Not written: check the L/14 scorer's checkpoint (a "
                      "cosine that is not a finite number in [-1, 1]) and the shard (a repeated uid).")
        write_parquet_atomically(table, table_path)
        written += len(uids)
        empty += sum(not c.strip() for c in captions)
        log(f"recaptioned: shard {i}/{len(tars)}: {len(uids)} images")
    record_table(out_dir, out_dir.glob("*.parquet"))  # the manifest a subset checks before it reads the source
    seconds = time.perf_counter() - t0
    return {"shards": len(tars), "shards_skipped": skipped, "images_recaptioned": written, "empty_captions": empty,
            "seconds": round(seconds, 1),
            "images_per_second": round(written / seconds, 1) if written and seconds else 0.0}


def _downloaded_in_pool(tar: Path, in_pool: Callable[[list[str]], np.ndarray]
                        ) -> tuple[list[str], list[str], list[bytes]]:
    """(pool uids, alt-texts, jpeg bytes) of a shard's downloaded images still in the pool."""
    uids, texts, jpgs = [], [], []
    for _, files in iter_webdataset(tar):
        if "jpg" in files and "json" in files:
            uids.append(json.loads(files["json"]).get("uid"))
            texts.append(files.get("txt", b"").decode("utf-8", errors="replace"))
            jpgs.append(files["jpg"])
    keep = in_pool(uids) if uids else np.empty(0, bool)
    uids, texts, jpgs = ([x for x, k in zip(column, keep) if k] for column in (uids, texts, jpgs))
    return uids, texts, jpgs

