"""A model's scores of the pool's downloaded images with their captions, shard by shard (plain Python; no Dagster).

A score is the cosine of the model's image and caption embeddings, of the image as downloaded (the data filtering
network) or as a `prepare` step changed it (T-MARS masks its text, The Devil Is in the Details flips it), or any
other function of a shard's images and captions (SIEVE's, filtering/sieve.py). One parquet per pool shard (uid +
the score column + any extra columns), its values checked (each uid once, finite scores in range) and written under
a temporary name and renamed; a shard already scored is kept, so an interrupted run resumes, unless it is not what
was written (its manifest, the directory's `_manifest.json`, says so) or its values are wrong: then it is scored
again. Memory holds one shard's images.

On the engine (`score_on_engine`), the shards are tasks of a module-level function that loads the models once
(`ScoringModels`: names, checkpoint paths, device): here one process, shard after shard, as before; on Ray, groups
of shards, each task requesting GPUs where the cluster has them. A retried task keeps the shards its first try had
renamed into place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datacomp_assets.core.engine import Engine
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
    return write_shard_scores(shards_dir, out_dir, column, cosine_score(scorer, prepare), log)


def write_shard_scores(shards_dir: str | os.PathLike, out_dir: str | os.PathLike, column: str, score: ShardScore,
                       log: Callable[[str], None] = print) -> dict:
    """Write `<out_dir>/<shard>.parquet` (uid, `column`, extra columns) for every downloaded shard, each from
    `score(shard, records, images)`; a shard already written is skipped. Returns counts and timings."""
    tars, out_dir = _shards(shards_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scored, skipped, t0 = 0, 0, time.perf_counter()
    recorded = RecordedTable(out_dir)
    for i, tar in enumerate(tars, 1):
        n = score_shard(tar, out_dir, column, score, recorded, log)
        if n is None:
            skipped += 1
            continue
        scored += n
        log(f"{column}: shard {i}/{len(tars)}: {n} images")
    # The manifest readers check before every read (only the files written here are hashed).
    record_table(out_dir, out_dir.glob("*.parquet"), {"column": column})
    return _summary(len(tars), skipped, scored, time.perf_counter() - t0)


def _shards(shards_dir: str | os.PathLike) -> list[Path]:
    tars = sorted(Path(shards_dir).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no downloaded shards in {shards_dir}; materialize pool_shards first")
    return tars


def _summary(shards: int, skipped: int, scored: int, seconds: float) -> dict:
    return {"shards": shards, "shards_skipped": skipped, "images_scored": scored, "seconds": round(seconds, 1),
            "images_per_second": round(scored / seconds, 1) if scored and seconds else 0.0}


def score_shard(tar: Path, out_dir: Path, column: str, score: ShardScore, recorded: RecordedTable,
                log: Callable[[str], None] = print) -> int | None:
    """Write one shard's scores (`<out_dir>/<shard>.parquet`); None when they are there already and may be kept,
    else the images scored. A file written by an earlier try of the same task (not yet in the manifest) is kept
    when its values pass: it was renamed into place whole."""
    target = out_dir / f"{tar.stem}.parquet"
    if target.exists():
        redo = recorded.reason_to_redo(target)
        if redo is None:
            return None
        log(f"{column}: {target}: {redo}; scoring shard {tar.name} again")  # never kept
    records, images = read_downloaded(tar)
    scores, extra = score(tar.stem, records, images)
    table = pa.table({"uid": pa.array([r["uid"] for r in records], pa.string()),
                      column: pa.array(scores, pa.float32()),
                      **{name: pa.array(values) for name, values in extra.items()}})
    require_valid(table, f"{target} (the scores of {tar})", "Not written: check the scoring model's checkpoint "
                  "(a cosine that is not a finite number in [-1, 1]) and the shard (a repeated uid).")
    write_parquet_atomically(table, target)
    return len(records)


# ---------------------------------------------------------------- on the engine (this machine or Ray tasks)


@dataclass(frozen=True)
class ScoringModels:
    """What a task loads, once, to score its shards: the scorer's CLIP (and SIEVE's captioner), on `device`."""

    scorer: str                   # dfn | tmars | flipped | sieve (core.scorers.IMAGE_SCORERS)
    column: str
    model: str
    checkpoint: str
    device: str = "cpu"
    captioner: str = ""           # SIEVE's
    captioner_checkpoint: str = ""
    seed: int = 0                 # SIEVE's sampling seed (one per shard is derived from it)


@dataclass(frozen=True)
class ScoringTask:
    tars: tuple[str, ...]
    out_dir: str
    models: ScoringModels


def shard_score_function(models: ScoringModels) -> ShardScore:
    """The score function of `models.scorer`, its models loaded (once per process and checkpoint file)."""
    from datacomp_assets.core.engine import file_key, process_cache

    key = (models, file_key(models.checkpoint), file_key(models.captioner_checkpoint or None))
    return process_cache(key, lambda: _load_score_function(models))


def _load_score_function(models: ScoringModels) -> ShardScore:
    from datacomp_assets.core.models import load_model

    scorer = Scorer(models.scorer, *load_model(models.model, models.checkpoint, models.device), models.device)
    if models.scorer == "sieve":
        from datacomp_assets.filtering.sieve import SieveScoring

        captioner, preprocess, tokenizer = load_model(models.captioner, models.captioner_checkpoint, models.device)
        return SieveScoring(captioner, tokenizer, preprocess, scorer.embed_text, seed=models.seed,
                            device=models.device)
    return cosine_score(scorer, image_preparation(models.scorer))


def cosine_score(scorer: Scorer, prepare: Prepare | None = None) -> ShardScore:
    """The cosine of the scorer's embeddings of each image (after `prepare`) and its caption."""
    def cosine(shard: str, records: list[dict], images: list[Image.Image]):
        images, extra = prepare(images) if prepare else (images, {})
        if not records:
            return np.empty(0, np.float32), extra
        image, text = scorer.embed(images, [r["text"] for r in records])
        return (image * text).sum(axis=1).astype(np.float32), extra
    return cosine


def image_preparation(scorer: str) -> Prepare | None:
    """What is done to the images before the scorer sees them (None: scored as downloaded)."""
    from datacomp_assets.filtering import text_masking

    if scorer == "tmars":
        detector = text_masking.TextDetector()

        def masked(images):
            images, text_area_share = text_masking.masked_images(images, detector)
            return images, {"text_area_share": text_area_share}
        return masked
    if scorer == "flipped":
        return lambda images: ([text_masking.flipped(image) for image in images], {})
    return None


def score_task(task: ScoringTask) -> list[tuple[str, int]]:
    """One task: its shards scored with models loaded once; (shard, images) each. A shard written whole by an
    earlier try of this task (its worker died) is kept and counted."""
    score = shard_score_function(task.models)
    out_dir = Path(task.out_dir)
    recorded = RecordedTable(out_dir)
    done = []
    for tar in map(Path, task.tars):
        n = score_shard(tar, out_dir, task.models.column, score, recorded, _worker_log)
        done.append((tar.stem, pq.read_metadata(out_dir / f"{tar.stem}.parquet").num_rows if n is None else n))
    return done


def _worker_log(line: str) -> None:
    """A task's own lines (a file it scores again) go to its worker's output (on Ray, the node's log)."""
    print(line, flush=True)


def shards_to_write(tars: list[Path], out_dir: Path, redoing: Callable[[Path, Path, str], None]) -> list[Path]:
    """The shards whose `<out_dir>/<shard>.parquet` is missing or not what its manifest recorded (removed first,
    `redoing(target, tar, why)` told): what a resumed per-shard step still has to write."""
    recorded = RecordedTable(out_dir)
    todo = []
    for tar in tars:
        target = out_dir / f"{tar.stem}.parquet"
        why = recorded.reason_to_redo(target) if target.exists() else "missing"
        if why is not None:
            if why != "missing":
                redoing(target, tar, why)
                target.unlink()
            todo.append(tar)
    return todo


def score_on_engine(shards_dir: str | os.PathLike, out_dir: str | os.PathLike, models: ScoringModels,
                    engine: Engine = Engine(), gpus: float = 1.0, log: Callable[[str], None] = print) -> dict:
    """`<out_dir>/<shard>.parquet` for every downloaded shard, as `write_shard_scores` writes them, by the engine's
    tasks: here one process with the models loaded once; on Ray, groups of shards, one task each, that request
    `gpus` GPUs where the cluster has them. A task retried after its worker died keeps the shards it had
    written (each renamed into place whole) and scores the rest. Returns counts and timings."""
    from datacomp_assets.core.engine import clear_process_cache

    tars, out_dir = _shards(shards_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    todo = [str(tar) for tar in shards_to_write(tars, out_dir, lambda target, tar, why: log(
        f"{models.column}: {target}: {why}; scoring shard {tar.name} again"))]
    tasks = [ScoringTask(tuple(group), str(out_dir), models) for group in engine.task_groups(todo, gpus)]
    scored, done = 0, 0
    try:
        for results in engine.map_unordered(score_task, tasks, processes=1, step=f"image scores ({models.scorer})",
                                            gpus=gpus):
            for shard, n in results:
                done += 1
                scored += n
                log(f"{models.column}: shard {shard} ({n} images) [{done}/{len(todo)}]")
    finally:
        clear_process_cache()
    record_table(out_dir, out_dir.glob("*.parquet"), {"column": models.column})
    return _summary(len(tars), len(tars) - len(todo), scored, time.perf_counter() - t0)
