"""The metrics of DataComp's WILDS, fairness and WinoGAViL tasks, as plain functions of arrays.

The reference harness computes them with the `wilds` package's metric classes (eval_utils/wilds_eval.py,
eval_utils/fairness_eval.py) and scikit-learn (eval_utils/wino_eval.py); these functions do the same
arithmetic and name their results with the same keys, in the same order, so a results line reads like the
reference's: the `wilds` metrics are float32 tensors turned into floats (so are their values here), a group with no
sample is listed with NaN, and so is an empty WinoGAViL bucket.

The WILDS and fairness test sets carry one metadata row per sample (the sample's `.npy` in the webdataset),
whose columns are the evaluator's `_metadata_fields`, listed in METADATA_FIELDS. This module imports neither
torch nor Dagster.
"""

from __future__ import annotations

import numpy as np

# Column names of each task's per-sample metadata row, as DataComp's evaluators declare them.
METADATA_FIELDS = {
    "wilds/iwildcam": ("location", "sequence", "year", "month", "day", "hour", "minute", "second", "y"),
    "wilds/camelyon17": ("hospital", "slide", "y"),
    "wilds/fmow": ("region", "year", "y"),
    "fairness/dollar_street": ("income_ds", "income_meta", "region"),
    "fairness/geode": ("region", "country"),
}


def float32_ratio(hits, n) -> float:
    """hits / n as WILDS computes it: a float32 division (NaN for 0 / 0, as its group averages give)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.float32(hits) / np.float32(n))


def group_eval(correct, groups, metric: str, field: str) -> dict[str, float]:
    """WILDS's `standard_group_eval` for an element-wise metric (accuracy, top-k accuracy).

    `correct` is 1/0 per sample, `groups` the value of `field` per sample. Returns the mean over all samples
    (`<metric>_avg`, 0 without samples), each group's mean and size (`<metric>_<field>:<g>`, `count_<field>:<g>`)
    for every g from 0 to the largest value (WILDS's CombinatorialGrouper has that many groups; an empty one has
    mean NaN and count 0.0), and the worst mean over the groups that have samples (`<metric>_wg`).
    """
    correct = np.asarray(correct, dtype=np.float64)
    groups = np.asarray(groups).astype(np.int64)
    results = {f"{metric}_avg": float32_ratio(correct.sum(), correct.size) if correct.size else 0.0}
    n_groups = int(groups.max()) + 1 if groups.size else 0
    hits = np.bincount(groups, weights=correct, minlength=n_groups)
    counts = np.bincount(groups, minlength=n_groups)
    for g in range(n_groups):
        results[f"{metric}_{field}:{g}"] = float32_ratio(hits[g], counts[g])
        results[f"count_{field}:{g}"] = float(counts[g])
    present = [results[f"{metric}_{field}:{g}"] for g in range(n_groups) if counts[g]]
    results[f"{metric}_wg"] = min(present) if present else 0.0
    return results


def column(metadata, task_key: str, field: str) -> np.ndarray:
    """One metadata field of every sample."""
    return np.asarray(metadata)[:, METADATA_FIELDS[task_key].index(field)]


def iwildcam_metrics(pred, labels) -> dict[str, float]:
    """Accuracy, macro recall and macro F1; the macro averages run over the classes present in `labels`
    (WILDS passes `labels=torch.unique(y_true)` to scikit-learn). Main metric: `F1-macro_all`."""
    from sklearn.metrics import f1_score, recall_score

    pred, labels = np.asarray(pred), np.asarray(labels)
    present = np.unique(labels)
    # WILDS wraps scikit-learn's float64 in torch.tensor, a float32.
    return {
        "acc_avg": float32_ratio((pred == labels).sum(), labels.size),
        "recall-macro_all": float(np.float32(recall_score(labels, pred, average="macro", labels=present,
                                                          zero_division=0))),
        "F1-macro_all": float(np.float32(f1_score(labels, pred, average="macro", labels=present, zero_division=0))),
    }


def camelyon17_metrics(pred, labels, metadata) -> dict[str, float]:
    """Accuracy per slide and on the worst slide (the main metric stays acc1)."""
    correct = np.asarray(pred) == np.asarray(labels)
    return group_eval(correct, column(metadata, "wilds/camelyon17", "slide"), "acc", "slide")


def fmow_metrics(pred, labels, metadata) -> dict[str, float]:
    """Accuracy per year and per region, and on the worst of each. Main metric: `acc_worst_region`.

    DataComp means to leave the "Other" region out of the worst region, but it tests for the word "Other" in
    group names built without WILDS's metadata_map, which are numbers ("region:5"); so no region is left out,
    and none is here either, to report the number the reference reports.
    """
    correct = np.asarray(pred) == np.asarray(labels)
    results = group_eval(correct, column(metadata, "wilds/fmow", "year"), "acc", "year")
    results["acc_worst_year"] = results.pop("acc_wg")
    by_region = group_eval(correct, column(metadata, "wilds/fmow", "region"), "acc", "region")
    del by_region["acc_avg"]
    worst_region = by_region.pop("acc_wg")  # over the regions with samples, as FMoWEvaluator's loop skips the rest
    return {**results, **by_region, "acc_worst_region": worst_region}


def dollar_street_metrics(top5, labels, metadata) -> dict[str, float]:
    """Top-5 accuracy per income group (`income_ds`) and on the worst. Main metric: `acc_top5_wg`.

    top5[i] holds the five best-scored classes of sample i."""
    correct = (np.asarray(top5) == np.asarray(labels)[:, None]).any(axis=1)
    return group_eval(correct, column(metadata, "fairness/dollar_street", "income_ds"), "acc_top5", "income_ds")


def geode_metrics(pred, labels, metadata) -> dict[str, float]:
    """Accuracy per region and on the worst region. Main metric: `acc_wg`."""
    correct = np.asarray(pred) == np.asarray(labels)
    return group_eval(correct, column(metadata, "fairness/geode", "region"), "acc", "region")


def metadata_metrics(task_key: str, logits, labels, metadata) -> dict[str, float]:
    """The extra metrics of a WILDS or fairness task from its logits (samples x classes); {} for other tasks."""
    logits = np.asarray(logits)
    pred = logits.argmax(axis=1)
    if task_key == "wilds/iwildcam":
        return iwildcam_metrics(pred, labels)
    if task_key == "wilds/camelyon17":
        return camelyon17_metrics(pred, labels, metadata)
    if task_key == "wilds/fmow":
        return fmow_metrics(pred, labels, metadata)
    if task_key == "fairness/dollar_street":
        return dollar_street_metrics(np.argsort(-logits, axis=1, kind="stable")[:, :5], labels, metadata)
    if task_key == "fairness/geode":
        return geode_metrics(pred, labels, metadata)
    return {}


# ---------------------------------------------------------------- WinoGAViL


def jaccard(y_true, y_pred) -> float:
    """|true ∩ predicted| / |true ∪ predicted| of two boolean masks; 0 when both are empty (scikit-learn's
    jaccard_score, which DataComp calls, returns 0 there too)."""
    y_true, y_pred = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    union = (y_true | y_pred).sum()
    return float((y_true & y_pred).sum() / union) if union else 0.0


def chosen_candidates(scores, n_associations: int) -> np.ndarray:
    """The mask of the n best-scored candidates (the model is told how many associations to pick), picked as
    wino_eval.py picks them: np.argsort(scores)[-n:] (so n = 0 picks every candidate)."""
    chosen = np.zeros(len(scores), dtype=bool)
    chosen[np.argsort(scores)[-n_associations:]] = True
    return chosen


def winogavil_jaccards(scores: list, truths: list) -> tuple[np.ndarray, np.ndarray]:
    """(Jaccard index of the chosen candidates, number of candidates) per instance."""
    per_instance = np.array([jaccard(t, chosen_candidates(s, int(np.sum(t)))) for s, t in zip(scores, truths)])
    return per_instance, np.array([len(t) for t in truths])


WINOGAVIL_BUCKETS = {  # metric -> which instances it averages, by their number of candidates (wino_eval.py)
    "avg_jaccard_score": lambda sizes: np.ones(len(sizes), dtype=bool),
    "jaccard_score_5": lambda sizes: sizes == 5, "jaccard_score_6": lambda sizes: sizes == 6,
    "jaccard_score_10": lambda sizes: sizes == 10, "jaccard_score_12": lambda sizes: sizes == 12,
    "jaccard_score_5-6": lambda sizes: sizes <= 6, "jaccard_score_10-12": lambda sizes: sizes >= 10,
}


def winogavil_metrics(scores: list, truths: list) -> dict[str, float]:
    """Jaccard index of the chosen candidates per instance, averaged over all instances and by the number of
    candidates (5, 6, 10, 12, 5-6 and 10-12). Main metric: `jaccard_score_10-12`.

    scores[i] are the cue's similarities to instance i's candidate images; truths[i] marks its associations.
    A bucket with no instance is NaN, as the reference's mean of an empty array.
    """
    per_instance, sizes = winogavil_jaccards(scores, truths)
    return {name: _mean_or_nan(per_instance[bucket(sizes)]) for name, bucket in WINOGAVIL_BUCKETS.items()}


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


# ---------------------------------------------------------------- per-sample outcomes (for evaluation/noise.py)


def classification_outcome(task_key: str, main_metric: str, logits, labels, metadata) -> dict[str, np.ndarray] | None:
    """The per-sample outcomes a classification task's main metric is computed from, in noise.py's vocabulary:
    "mean" of `values`; "group" means of `values` by `groups`, reduced by `reduce` ("mean" or "min"); or
    "macro_f1" of `pred` against `labels`. None for a main metric it cannot resample."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    pred = logits.argmax(axis=1)
    correct = pred == labels
    if main_metric == "acc1":
        return {"kind": np.array("mean"), "values": correct}
    if main_metric == "mean_per_class_recall":
        return {"kind": np.array("group"), "values": correct, "groups": labels, "reduce": np.array("mean")}
    if main_metric == "F1-macro_all":
        return {"kind": np.array("macro_f1"), "pred": pred, "labels": labels}
    worst_group_field = {"acc_worst_region": "region", "acc_wg": "region", "acc_top5_wg": "income_ds"}
    if main_metric in worst_group_field and task_key in METADATA_FIELDS:
        if main_metric == "acc_top5_wg":
            top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
            correct = (top5 == labels[:, None]).any(axis=1)
        groups = column(metadata, task_key, worst_group_field[main_metric]).astype(np.int64)
        return {"kind": np.array("group"), "values": correct, "groups": groups, "reduce": np.array("min")}
    return None


def winogavil_outcome(main_metric: str, scores: list, truths: list) -> dict[str, np.ndarray] | None:
    """Per-instance Jaccard indices and whether the main metric's bucket counts them."""
    if main_metric not in WINOGAVIL_BUCKETS:
        return None
    per_instance, sizes = winogavil_jaccards(scores, truths)
    return {"kind": np.array("mean"), "values": per_instance, "mask": WINOGAVIL_BUCKETS[main_metric](sizes)}
