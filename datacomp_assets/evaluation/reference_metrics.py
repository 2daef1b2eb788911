"""The metrics of DataComp's WILDS, fairness and WinoGAViL tasks, as plain functions of arrays.

The reference harness computes them with the `wilds` package's metric classes (eval_utils/wilds_eval.py,
eval_utils/fairness_eval.py) and scikit-learn (eval_utils/wino_eval.py); these functions do the same
arithmetic and name their results with the same keys, so a results line reads like the reference's.

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


def group_eval(correct, groups, metric: str, field: str) -> dict[str, float]:
    """WILDS's `standard_group_eval` for an element-wise metric (accuracy, top-k accuracy).

    `correct` is 1/0 per sample, `groups` the value of `field` per sample. Returns the mean over all samples
    (`<metric>_avg`), each group's mean and size (`<metric>_<field>:<g>`, `count_<field>:<g>`) and the worst
    group's mean (`<metric>_wg`). Only groups that occur are listed (WILDS would also list, as NaN, the
    unused values below the largest one); the worst group is taken over those, as in WILDS.
    """
    correct = np.asarray(correct, dtype=np.float64)
    groups = np.asarray(groups).astype(np.int64)
    results = {f"{metric}_avg": float(correct.mean()) if correct.size else 0.0}
    group_means = []
    for g in np.unique(groups):
        in_group = groups == g
        group_means.append(float(correct[in_group].mean()))
        results[f"{metric}_{field}:{g}"] = group_means[-1]
        results[f"count_{field}:{g}"] = float(in_group.sum())
    results[f"{metric}_wg"] = min(group_means) if group_means else 0.0
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
    return {
        "acc_avg": float((pred == labels).mean()),
        "recall-macro_all": float(recall_score(labels, pred, average="macro", labels=present, zero_division=0)),
        "F1-macro_all": float(f1_score(labels, pred, average="macro", labels=present, zero_division=0)),
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
    worst_region = by_region.pop("acc_wg")
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
    """The mask of the n best-scored candidates: the model is told how many associations to pick."""
    chosen = np.zeros(len(scores), dtype=bool)
    if n_associations:
        chosen[np.argsort(scores)[-n_associations:]] = True
    return chosen


def winogavil_metrics(scores: list, truths: list) -> dict[str, float]:
    """Jaccard index of the chosen candidates per instance, averaged over all instances and by the number of
    candidates (5, 6, 10, 12, 5-6 and 10-12). Main metric: `jaccard_score_10-12`.

    scores[i] are the cue's similarities to instance i's candidate images; truths[i] marks its associations.
    A bucket with no instance gets no key (the reference writes NaN).
    """
    per_instance = np.array([jaccard(t, chosen_candidates(s, int(np.sum(t)))) for s, t in zip(scores, truths)])
    sizes = np.array([len(t) for t in truths])
    buckets = {"avg_jaccard_score": sizes > 0, "jaccard_score_5": sizes == 5, "jaccard_score_6": sizes == 6,
               "jaccard_score_10": sizes == 10, "jaccard_score_12": sizes == 12,
               "jaccard_score_5-6": sizes <= 6, "jaccard_score_10-12": sizes >= 10}
    return {name: float(per_instance[mask].mean()) for name, mask in buckets.items() if mask.any()}
