"""Evaluation noise: how far a checkpoint's scores would move on another draw of test samples of the same size.

DataComp's test sets are finite (one FMoW region has 4 images, so one image moves the 38-task average by
0.0066; DataComp issue #61). The evaluation keeps, per checkpoint, the per-sample outcomes each task's main
metric is computed from (`add_outcomes`, a compressed .npz beside `eval_results.jsonl`), and a percentile
bootstrap over each task's test samples gives a 95% interval per task and for the average over tasks
(`noise_summary`).

The bootstrap is paired by construction: resample r of a task draws the same sample indices for every checkpoint
scored on that test set (the generator is seeded by SEED and the task's key), so the replicates of two rows of the
leaderboard can be subtracted to get the interval of their gap.

Outcome kinds (arrays under "<task key>/<field>" in the .npz; `kind` names the formula):
- "mean": mean of `values` over the samples where `mask` is true (all samples without a mask): acc1, a
  WinoGAViL bucket's Jaccard index;
- "group": the means of `values` per `groups` value, reduced over the groups present by `reduce`, "mean"
  (mean per-class recall) or "min" (a worst-group accuracy);
- "macro_f1": F1 of `pred` against `labels` per class present in the labels, averaged (iWildCam);
- "retrieval": `image_hits` per caption (its image ranked first), `text_image` (the caption's image) and
  `text_hits` per image (one of its captions ranked first); mean_recall@1, resampling images with their captions.

Plain numpy; no torch, no Dagster.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np

N_RESAMPLES = 1000
SEED = 0
CONFIDENCE = 0.95
MAX_DRAWN = 2**22  # sample indices drawn at once: bounds memory on a 50,000-image task


# ---------------------------------------------------------------- the per-sample file


def read_outcomes(samples_file: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """task key -> its outcome arrays; {} when the file does not exist (results written before it was kept)."""
    path = Path(samples_file)
    if not path.is_file():
        return {}
    outcomes: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as arrays:
        for name in arrays.files:
            task, field = name.rsplit("/", 1)
            outcomes.setdefault(task, {})[field] = arrays[name]
    return outcomes


def add_outcomes(samples_file: str | Path, outcomes: dict[str, dict[str, np.ndarray]]) -> None:
    """Add (or replace) tasks' outcomes in the file, written to a temporary name and renamed."""
    path = Path(samples_file)
    merged = read_outcomes(path) | outcomes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        np.savez_compressed(out, **{f"{task}/{field}": np.asarray(value)
                                    for task, fields in merged.items() for field, value in fields.items()})
    os.replace(tmp, path)


# ---------------------------------------------------------------- a task's metric on resamples


def sample_count(outcome: dict[str, np.ndarray]) -> int:
    """The number of resampled units: test samples, or images for retrieval (each with its captions)."""
    kind = str(outcome["kind"])
    if kind == "retrieval":
        return len(outcome["text_hits"])
    return len(outcome["labels"] if kind == "macro_f1" else outcome["values"])


def metric_on(outcome: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """The main metric on each row of idx (resamples x sample indices); row np.arange(n) gives the reported one."""
    kind = str(outcome["kind"])
    rows = len(idx)
    if kind == "mean":
        values = np.asarray(outcome["values"], dtype=np.float64)
        mask = np.asarray(outcome["mask"], dtype=np.float64) if "mask" in outcome else np.ones_like(values)
        return _ratio((values * mask)[idx].sum(axis=1), mask[idx].sum(axis=1))
    if kind == "group":
        groups = np.asarray(outcome["groups"], dtype=np.int64)
        sums, counts = _per_row_bincount(groups[idx], np.asarray(outcome["values"], dtype=np.float64)[idx],
                                         int(groups.max()) + 1, rows)
        means = _ratio(sums, counts)
        return np.nanmin(means, axis=1) if str(outcome["reduce"]) == "min" else np.nanmean(means, axis=1)
    if kind == "macro_f1":
        labels, pred = np.asarray(outcome["labels"], np.int64), np.asarray(outcome["pred"], np.int64)
        n_classes = int(max(labels.max(), pred.max())) + 1
        true_positives, truths = _per_row_bincount(labels[idx], (pred == labels)[idx].astype(np.float64),
                                                   n_classes, rows)
        _, predicted = _per_row_bincount(pred[idx], np.zeros(idx.shape), n_classes, rows)
        f1 = np.where(truths > 0, _ratio(2 * true_positives, truths + predicted), np.nan)
        return np.nanmean(f1, axis=1)
    if kind == "retrieval":
        n_images = len(outcome["text_hits"])
        text_image = np.asarray(outcome["text_image"], dtype=np.int64)
        caption_hits = np.bincount(text_image, weights=np.asarray(outcome["image_hits"], np.float64),
                                   minlength=n_images)
        captions = np.bincount(text_image, minlength=n_images).astype(np.float64)
        image_recall = _ratio(caption_hits[idx].sum(axis=1), captions[idx].sum(axis=1))
        text_recall = np.asarray(outcome["text_hits"], dtype=np.float64)[idx].mean(axis=1)
        return 0.5 * (text_recall + image_recall)
    raise ValueError(f"unknown outcome kind {kind!r}")


def replicates(task_key: str, outcome: dict[str, np.ndarray], n_resamples: int = N_RESAMPLES,
               seed: int = SEED) -> np.ndarray:
    """The main metric on n_resamples resamples (with replacement, of the task's size) of the task's samples."""
    n = sample_count(outcome)
    rng = np.random.default_rng([seed, zlib.crc32(task_key.encode())])  # the same draws for every checkpoint
    chunk = max(1, MAX_DRAWN // max(n, 1))
    out = []
    for start in range(0, n_resamples, chunk):
        out.append(metric_on(outcome, rng.integers(0, n, size=(min(chunk, n_resamples - start), n))))
    return np.concatenate(out)


def interval(reps: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval holding `confidence` of the replicates (resamples where the metric is undefined,
    such as a bucket left empty, are ignored)."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(reps, [tail, 100 - tail])
    return float(low), float(high)


def noise_summary(outcomes: dict[str, dict[str, np.ndarray]], averaged: list[str],
                  n_resamples: int = N_RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE) -> dict:
    """Intervals per task and for the average over `averaged` (the tasks with a main metric); the average's
    interval and replicates are None unless every averaged task has its outcomes."""
    per_task = {key: replicates(key, outcome, n_resamples, seed) for key, outcome in outcomes.items()}
    tasks = {key: dict(zip(("low", "high"), interval(reps, confidence)), samples=sample_count(outcomes[key]))
             for key, reps in per_task.items()}
    complete = bool(averaged) and all(key in per_task for key in averaged)
    average = np.mean([per_task[key] for key in averaged], axis=0) if complete else None
    return {"n_resamples": n_resamples, "seed": seed, "confidence": confidence, "tasks": tasks,
            "average": dict(zip(("low", "high"), interval(average, confidence))) if complete else None,
            "average_replicates": average.tolist() if complete else None}


def write_noise(samples_file: str | Path, noise_file: str | Path, averaged: list[str]) -> dict:
    """`noise_summary` of a checkpoint's outcomes, written as JSON (what the leaderboard reads)."""
    summary = noise_summary(read_outcomes(samples_file), averaged)
    path = Path(noise_file)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary) + "\n")
    os.replace(tmp, path)
    return summary


# ---------------------------------------------------------------- helpers


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den != 0)


def _per_row_bincount(keys: np.ndarray, weights: np.ndarray, size: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum of weights, count) per (row, key) of keys (rows x n, values below size): one bincount for all rows."""
    flat = (keys + size * np.arange(rows)[:, None]).ravel()
    sums = np.bincount(flat, weights=weights.ravel(), minlength=rows * size).reshape(rows, size)
    counts = np.bincount(flat, minlength=rows * size).reshape(rows, size).astype(np.float64)
    return sums, counts
