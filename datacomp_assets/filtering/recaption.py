"""Recaptioning (Nguyen et al., NeurIPS 2023, "Improving multimodal datasets with image captioning"): the pool's
images with captions a captioner writes, as a bring-your-own-data source beside the pool (plain Python; no Dagster).

Each pool image still in the pool (the safety steps' removals stay removed) becomes one sample of the source: the
same image bytes, one caption sampled by the captioner (nucleus sampling, top-p 0.9, as SIEVE samples), and a uid of
its own derived from the pool uid, so that a subset can hold an image with its alt-text and, separately, with a
generated caption. `pool_uid` records which pool image it is. `clip_l14_similarity_score` is the L/14 cosine of the
image and the generated caption, so a rule over the source can filter generated captions as the paper does. A caption
that decodes to nothing is written with the status `empty_caption`, so no rule keeps it. At a published pool the
image side of that cosine is the metadata's own L/14 embedding (its npz's `l14_img`): only the captions are embedded.

One tar and one parquet per pool shard, each written under a temporary name and renamed; a shard already written is
kept, so an interrupted run resumes. On the engine (`recaption_on_engine`), groups of shards are tasks that load the
captioner and the L/14 once; a task retried after its worker died keeps the shards it had written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datacomp_assets.core.engine import Engine, clear_process_cache, file_key, process_cache
from datacomp_assets.core.files import temporary_sibling, write_parquet_atomically
from datacomp_assets.core.integrity import RecordedTable, record_table, require_valid
from datacomp_assets.core.scorers import RECAPTIONED_SOURCE
from datacomp_assets.core.shards import iter_webdataset, write_webdataset
from datacomp_assets.core.uids import UID_DTYPE, arrow_uids_to_array, isin_sorted, sort_uids
from datacomp_assets.filtering.image_scores import shards_to_write

# (images) -> one generated caption per image
Captioner = Callable[[list[Image.Image]], list[str]]
# (images, captions) -> the cosine of each image and its caption
PairScore = Callable[[list[Image.Image], list[str]], np.ndarray]
# (images, captions, their pool uids) -> the cosine of each image and its caption
UidPairScore = Callable[[list[Image.Image], list[str], list[str]], np.ndarray]
IMAGE_EMBEDDINGS = "l14_img"  # the published npz's L/14 image embeddings, one row per metadata row


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
    tars, out_dir = _shards(shards_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = skipped = empty = 0
    t0 = time.perf_counter()
    recorded = RecordedTable(out_dir)
    for i, tar in enumerate(tars, 1):
        done = recaption_shard(tar, out_dir, in_pool, lambda images, shard=tar.stem: caption(shard)(images),
                               lambda images, captions, _: score(images, captions), recorded, log)
        if done is None:
            skipped += 1
            continue
        written, empty = written + done[0], empty + done[1]
        log(f"recaptioned: shard {i}/{len(tars)}: {done[0]} images")
    record_table(out_dir, out_dir.glob("*.parquet"))  # the manifest a subset checks before it reads the source
    return _summary(len(tars), skipped, written, empty, time.perf_counter() - t0)


def _shards(shards_dir: str | os.PathLike) -> list[Path]:
    tars = sorted(Path(shards_dir).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no downloaded shards in {shards_dir}; materialize pool_shards first")
    return tars


def _summary(shards: int, skipped: int, written: int, empty: int, seconds: float) -> dict:
    return {"shards": shards, "shards_skipped": skipped, "images_recaptioned": written, "empty_captions": empty,
            "seconds": round(seconds, 1),
            "images_per_second": round(written / seconds, 1) if written and seconds else 0.0}


def recaption_shard(tar: Path, out_dir: Path, in_pool: Callable[[list[str]], np.ndarray], caption: Captioner,
                    score: UidPairScore, recorded: RecordedTable,
                    log: Callable[[str], None] = print) -> tuple[int, int] | None:
    """One shard's tar and parquet; None when they are there and may be kept, else (images, empty captions)."""
    table_path = out_dir / f"{tar.stem}.parquet"
    if table_path.exists():  # the parquet is written last: its presence means the shard is complete
        redo = recorded.reason_to_redo(table_path)
        if redo is None:
            return None
        log(f"recaptioned: {table_path}: {redo}; recaptioning shard {tar.name} again")  # never kept
    pool_uids, alt_texts, jpgs = _downloaded_in_pool(tar, in_pool)
    images = [Image.open(io.BytesIO(jpg)).convert("RGB") for jpg in jpgs]
    captions = caption(images) if images else []
    scores = score(images, captions, pool_uids) if images else np.empty(0, np.float32)
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
    return len(uids), sum(not c.strip() for c in captions)


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


# ---------------------------------------------------------------- the published L/14 image embeddings


def npz_rows(npz: str | os.PathLike, key: str, rows: np.ndarray) -> np.ndarray:
    """`rows` of one array of an .npz, in the order given. A member stored uncompressed (np.savez writes them so,
    and DataComp's files are) is memory-mapped and only those rows are read; a compressed one is loaded whole."""
    rows = np.asarray(rows, np.int64)
    with zipfile.ZipFile(npz) as archive:
        try:
            info = archive.getinfo(f"{key}.npy")
        except KeyError:
            raise ValueError(f"{npz} has no {key!r} array (it has {sorted(archive.namelist())})") from None
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                return np.lib.format.read_array(member)[rows]
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(member)
            header_bytes = member.tell()
    with open(npz, "rb") as f:  # the member's data begins after its local header, whose extra field may differ
        f.seek(info.header_offset)
        local = f.read(30)
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
        int.from_bytes(local[28:30], "little") + header_bytes
    mapped = np.memmap(npz, dtype=dtype, mode="r", offset=start, shape=shape, order="F" if fortran else "C")
    try:
        if len(rows) and (rows.min() < 0 or rows.max() >= shape[0]):
            raise ValueError(f"{npz}: {key} has {shape[0]} rows; asked for row {int(rows.max())}")
        return np.array(mapped[rows])
    finally:
        del mapped


def files_without_image_embeddings(parquets: list[Path]) -> list[Path]:
    """The metadata files whose npz is missing or holds no L/14 image embeddings (read from the zip's directory)."""
    lacking = []
    for path in parquets:
        npz = path.with_suffix(".npz")
        try:
            with zipfile.ZipFile(npz) as archive:
                if f"{IMAGE_EMBEDDINGS}.npy" not in archive.namelist():
                    lacking.append(path)
        except (FileNotFoundError, zipfile.BadZipFile):
            lacking.append(path)
    return lacking


def _positions(uids: np.ndarray, sorted_pool: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """Each uid's position in `sorted_pool`, -1 where it is not there: one pass over the pool in chunks, so a
    memory-mapped index is read once and never copied whole (a binary search on its field would copy it)."""
    out = np.full(len(uids), -1, np.int64)
    if not len(sorted_pool) or not len(uids):
        return out
    order = np.argsort(uids["f0"], kind="stable")
    q_hi, q_lo = uids["f0"][order], uids["f1"][order]
    for start in range(0, len(sorted_pool), chunk):
        block = np.asarray(sorted_pool[start:start + chunk])
        hi, lo = np.ascontiguousarray(block["f0"]), np.ascontiguousarray(block["f1"])
        a, b = np.searchsorted(q_hi, hi[0], "left"), np.searchsorted(q_hi, hi[-1], "right")
        if a == b:
            continue
        pos = np.searchsorted(hi, q_hi[a:b])  # the first of the block with that high half
        at = np.minimum(pos, len(hi) - 1)
        same_high = hi[at] == q_hi[a:b]
        found = same_high & (lo[at] == q_lo[a:b])
        for i in np.flatnonzero(same_high & ~found):  # uids sharing a high half (rare): walk along them
            j = at[i] + 1
            while j < len(hi) and hi[j] == q_hi[a + i] and not found[i]:
                found[i], at[i] = lo[j] == q_lo[a + i], j
                j += 1
        hits = np.flatnonzero(found)
        out[order[a + hits]] = start + at[hits]
    return out


def pool_rows(rank: np.ndarray, positions: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """The pool row of each sorted position (`rank[row]` is a row's position): one pass over `rank` in chunks, so
    memory holds the positions asked for and one chunk, not the inverse of the whole pool."""
    order = np.argsort(positions, kind="stable")
    wanted = positions[order]
    rows = np.full(len(positions), -1, np.int64)
    if not len(wanted):
        return rows
    for start in range(0, len(rank), chunk):
        block = np.asarray(rank[start:start + chunk])
        at = np.minimum(np.searchsorted(wanted, block), len(wanted) - 1)
        hit = wanted[at] == block
        rows[order[at[hit]]] = start + np.flatnonzero(hit)
    return rows


# ---------------------------------------------------------------- on the engine (this machine or Ray tasks)


@dataclass(frozen=True)
class RecaptionModels:
    """What a task loads, once: the captioner and the L/14 (only its text tower where embeddings are given)."""

    captioner: str
    captioner_checkpoint: str
    l14: str
    l14_checkpoint: str
    device: str = "cpu"
    seed: int = 0


@dataclass(frozen=True)
class ShardToRecaption:
    tar: str
    keep: np.ndarray                        # sorted u8,u8: the shard's uids that are still in the pool
    npz_files: tuple[str, ...] = ()         # at a published pool: the npz files holding their L/14 embeddings
    npz_file: np.ndarray | None = field(default=None)  # per uid of `keep`: its file in npz_files
    npz_row: np.ndarray | None = field(default=None)   # per uid of `keep`: its row there


@dataclass(frozen=True)
class RecaptionTask:
    shards: tuple[ShardToRecaption, ...]
    out_dir: str
    models: RecaptionModels


def _load_models(models: RecaptionModels):
    from datacomp_assets.core.models import Scorer, load_model

    l14 = Scorer("l14", *load_model(models.l14, models.l14_checkpoint, models.device), models.device)
    return l14, load_model(models.captioner, models.captioner_checkpoint, models.device)


def recaption_task(task: RecaptionTask) -> list[tuple[str, int, int]]:
    """One task: its shards recaptioned with models loaded once; (shard, images, empty captions) each."""
    from datacomp_assets.filtering.sieve import generated_captions, shard_seed

    m = task.models
    l14, (captioner, preprocess, tokenizer) = process_cache(
        (m, file_key(m.l14_checkpoint), file_key(m.captioner_checkpoint)), lambda: _load_models(m))
    out_dir, recorded, done = Path(task.out_dir), RecordedTable(task.out_dir), []
    for shard in task.shards:
        tar = Path(shard.tar)

        def caption(images, seed=shard_seed(m.seed, tar.stem)):
            return [captions[0] for captions in generated_captions(
                captioner, tokenizer, preprocess, images, 1, seed, device=m.device)]

        def score(images, captions, pool_uids, shard=shard) -> np.ndarray:
            if shard.npz_file is None:  # the stand-in scorer embeds the images too (tiny)
                image, text = l14.embed(images, captions)
            else:
                image = _published_embeddings(shard, pool_uids)
                text = l14.embed_text(captions)
            return (image * text).sum(axis=1)

        result = recaption_shard(tar, out_dir, lambda uids, keep=shard.keep: isin_sorted(_uid_array(uids), keep),
                                 caption, score, recorded, lambda line: print(line, flush=True))
        if result is None:  # written whole by an earlier try of this task (its worker died): kept, and counted
            status = pq.read_table(out_dir / f"{tar.stem}.parquet", columns=["status"]).column("status")
            result = (len(status), status.to_pylist().count("empty_caption"))
        done.append((tar.stem, *result))
    return done


def _uid_array(uids: list[str]) -> np.ndarray:
    return arrow_uids_to_array(pa.array(uids, pa.string()))


def _published_embeddings(shard: ShardToRecaption, pool_uids: list[str]) -> np.ndarray:
    """The metadata's L/14 image embeddings of these pool images, normalised (float32), in their order."""
    at = _positions(_uid_array(pool_uids), shard.keep)
    files, rows = shard.npz_file[at], shard.npz_row[at]
    out = None
    for f in np.unique(files):
        picked = np.flatnonzero(files == f)
        block = npz_rows(shard.npz_files[f], IMAGE_EMBEDDINGS, rows[picked]).astype(np.float32)
        if out is None:
            out = np.empty((len(pool_uids), block.shape[1]), np.float32)
        out[picked] = block
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def _shard_uids(tar: Path) -> np.ndarray:
    """A shard's uids, sorted: from img2dataset's parquet beside it (no image read), else from the tar."""
    table = tar.with_suffix(".parquet")
    if table.exists() and "uid" in pq.read_schema(table).names:
        column = pq.read_table(table, columns=["uid"]).column("uid").combine_chunks()
        column = column.filter(column.is_valid())
    else:
        column = pa.array([json.loads(f["json"]).get("uid") for _, f in iter_webdataset(tar) if "json" in f],
                          pa.string())
    return sort_uids(arrow_uids_to_array(column)) if len(column) else np.empty(0, UID_DTYPE)


PLAN_SHARDS = 512  # shards planned (and mapped) at once: the driver holds their uids, not the whole pool's


def plan_shards(tars: list[Path], index, published: bool) -> list[ShardToRecaption]:
    """Per shard: its uids still in the pool (`index`, core.uid_index) and, at a published pool, where each one's
    L/14 embedding is. One pass over the index for all the shards' uids, and one over its ranks."""
    uids = [_shard_uids(tar) for tar in tars]
    sizes = np.cumsum([0, *map(len, uids)])
    everything = np.concatenate(uids) if uids else np.empty(0, UID_DTYPE)
    at = _positions(everything, index.sorted_uids)
    inside = at >= 0
    rows = pool_rows(index.rank, at[inside]) if published else None
    rows_at = np.cumsum([0, *(int(inside[a:b].sum()) for a, b in zip(sizes[:-1], sizes[1:]))])
    starts = np.asarray(index.starts)
    plans = []
    for k, tar in enumerate(tars):
        keep = uids[k][inside[sizes[k]:sizes[k + 1]]]
        if rows is None:
            plans.append(ShardToRecaption(str(tar), keep))
            continue
        mine = rows[rows_at[k]:rows_at[k + 1]]
        file_of = np.searchsorted(starts, mine, side="right") - 1
        used = np.unique(file_of)
        plans.append(ShardToRecaption(
            str(tar), keep, tuple(str(index.files[f].with_suffix(".npz")) for f in used),
            np.searchsorted(used, file_of).astype(np.int32), (mine - starts[file_of]).astype(np.int64)))
    return plans


def recaption_on_engine(shards_dir: str | os.PathLike, out_dir: str | os.PathLike, metadata_dir: str | os.PathLike,
                        models: RecaptionModels, published: bool = False, engine: Engine = Engine(),
                        gpus: float = 1.0, log: Callable[[str], None] = print) -> dict:
    """`write_recaptioned_source` by the engine's tasks: here one process with the models loaded once; on Ray,
    groups of shards, one task each, requesting `gpus` GPUs where the cluster has them. The pool is the metadata's
    uids (its index); with `published`, each image's L/14 embedding is read from the metadata's npz
    (`files_without_image_embeddings` names the files that lack it; check it first). Returns counts and timings."""
    from datacomp_assets.core.uid_index import uid_index

    tars, out_dir = _shards(shards_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    todo = shards_to_write(tars, out_dir, lambda target, tar, why: log(
        f"recaptioned: {target}: {why}; recaptioning shard {tar.name} again"))
    index = uid_index(metadata_dir) if todo else None
    written = empty = count = 0
    try:
        for first in range(0, len(todo), PLAN_SHARDS):
            plans = plan_shards(todo[first:first + PLAN_SHARDS], index, published)
            tasks = [RecaptionTask(tuple(group), str(out_dir), models) for group in engine.task_groups(plans, gpus)]
            for results in engine.map_unordered(recaption_task, tasks, processes=1, step="recaptioning", gpus=gpus):
                for shard, n, blank in results:
                    count += 1
                    written, empty = written + n, empty + blank
                    log(f"recaptioned: shard {shard} ({n} images) [{count}/{len(todo)}]")
    finally:
        clear_process_cache()
    record_table(out_dir, out_dir.glob("*.parquet"))  # the manifest a subset checks before it reads the source
    return _summary(len(tars), len(tars) - len(todo), written, empty, time.perf_counter() - t0)
