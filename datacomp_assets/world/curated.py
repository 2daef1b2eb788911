"""The tiny scale's curated source: English, balanced pairs from the same world, never in the pool.

It plays the part that high-quality data (e.g. the data a DFN or OpenAI's CLIP was trained on) plays at
the paper's scales: scorer models are trained on it, and bring-your-own-data strategies may mix it in.
Its captions all describe their image, but, like the web OpenAI's CLIP learned from, some of its images carry
their caption's words as text and some captions are vague (``CURATED_NOISE``): a scorer trained on it learns
to read, so the pool's text-only images score high by CLIP score, which is what T-MARS corrects.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core.files import temporary_sibling
from datacomp_assets.core.processes import spawn_pool
from datacomp_assets.core.shards import write_webdataset
from datacomp_assets.world.web import WebConfig, encode_jpeg, render, sample

NAMESPACE = "curated"
# Shares of the curated source that are not plain clean pairs (world.web noise kinds; the rest, 85%, is
# clean): the object with its caption's words written over it, and the object under a vague caption.
CURATED_NOISE = {"text_overlay": 0.10, "vague": 0.05}


def _resized_jpeg(img, image_size: int) -> bytes:
    # img2dataset's keep_ratio_largest with resize_only_if_bigger, so curated images match pool images.
    w, h = img.size
    if max(w, h) > image_size:
        r = image_size / max(w, h)
        img = img.resize((max(1, round(w * r)), max(1, round(h * r))))
    return encode_jpeg(img)


def _sample_files(args) -> tuple[str, dict[str, bytes]]:
    config, index, image_size, namespace, noise = args
    s = sample(index, config, namespace=namespace, noise=noise)
    meta = {"uid": s.uid, "caption": s.text, "original_width": s.width, "original_height": s.height}
    return f"{index:09d}", {"jpg": _resized_jpeg(render(s), image_size), "txt": s.text.encode(),
                            "json": json.dumps(meta).encode()}


def write_curated_source(config: WebConfig, n: int, out_dir: str | Path, image_size: int, shard_size: int,
                         processes: int = 2) -> dict:
    """Write n curated pairs as webdataset shards into out_dir (atomically); returns a summary."""
    balanced = replace(config, zipf_exponent=0.0)  # curated data covers every concept evenly
    return write_synthetic_source(balanced, n, out_dir, image_size, shard_size, processes,
                                  namespace=NAMESPACE, noise=dict(CURATED_NOISE))


def write_synthetic_source(config: WebConfig, n: int, out_dir: str | Path, image_size: int, shard_size: int,
                           processes: int = 2, *, namespace: str, noise: dict | None = None) -> dict:
    """Write samples 0..n-1 of a namespace as webdataset shards (atomically), each tar with img2dataset's table
    beside it (uid, key, status, caption), so a strategy can mix the source in; noise None: the config's."""
    out_dir = Path(out_dir)
    tmp = temporary_sibling(out_dir)
    tmp.mkdir(parents=True)
    shards = -(-n // shard_size)
    # spawned, not forked: strategies run in threads, and a fork taken while another thread holds a lock hangs
    with spawn_pool(processes, f"writing the {namespace} source") as pool:
        for k in range(shards):
            indices = range(k * shard_size, min(n, (k + 1) * shard_size))
            jobs = [(config, i, image_size, namespace, noise) for i in indices]
            rows: list[tuple[str, str, str]] = []
            write_webdataset(tmp / f"{k:08d}.tar", _recorded(pool.imap(_sample_files, jobs, chunksize=64), rows))
            uids, keys, captions = zip(*rows) if rows else ((), (), ())
            pq.write_table(pa.table({"uid": pa.array(uids, pa.string()), "key": pa.array(keys, pa.string()),
                                     "status": pa.array(["success"] * len(rows), pa.string()),
                                     "caption": pa.array(captions, pa.string())}), tmp / f"{k:08d}.parquet")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return {"samples": n, "shards": shards, "path": str(out_dir)}


def _recorded(samples, rows: list):
    """The samples as they are, each one's (uid, key, caption) appended to `rows` on the way."""
    for key, files in samples:
        meta = json.loads(files["json"])
        rows.append((meta["uid"], key, meta["caption"]))
        yield key, files


# The tiny scale's bring-your-own-data stand-in: a second synthetic source from the same world (its own
# namespace, so no uid collides with the pool or the curated source) with more mismatched captions than the
# pool: data a bring-your-own-data strategy must filter before mixing it in.
NOISY_NAMESPACE = "noisy"
NOISY_MISMATCHED_SHARE = 0.5  # half the captions belong to another image (the pool: 15-25%)


def noisy_source_config(web_config: WebConfig) -> WebConfig:
    """The tiny scale's noisy source: the pool's world and noise, but half its captions mismatched.

    A mixture: a share p of samples get another image's caption, the rest are drawn as the pool's are, with p
    such that mismatched captions make NOISY_MISMATCHED_SHARE in all. So every other kind (clean included)
    keeps its proportion to the others, scaled by 1 - p, and the shares never add up to more than 1.
    """
    noise = dict(web_config.noise)
    if sum(noise.values()) > 1.0:
        raise ValueError(f"noisy source: the pool's noise shares {noise} add up to more than 1")
    mismatched = noise.get("mismatched", 0.0)
    if mismatched >= NOISY_MISMATCHED_SHARE:
        return web_config
    keep = (1.0 - NOISY_MISMATCHED_SHARE) / (1.0 - mismatched)  # 1 - p
    noise = {kind: share * keep for kind, share in noise.items()}
    noise["mismatched"] = NOISY_MISMATCHED_SHARE
    return replace(web_config, noise=noise)


def write_noisy_source(web_config: WebConfig, n: int, out_dir: str | Path, image_size: int, shard_size: int,
                       processes: int = 2) -> dict:
    """Write the noisy source's n samples as webdataset shards (the curated source's format)."""
    return write_synthetic_source(noisy_source_config(web_config), n, out_dir, image_size, shard_size, processes,
                                  namespace=NOISY_NAMESPACE)
