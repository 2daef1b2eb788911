"""The results file: one JSON line per task (`eval_results.jsonl`, the reference's format), and its summary."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from datacomp_assets.core.reference_tasks import REFERENCE_TASKS


def read_results(out_jsonl: str | Path) -> dict[str, dict]:
    """Finished task lines by key; a line cut short by a crash is ignored."""
    results = {}
    path = Path(out_jsonl)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            results[row["key"]] = row
    return results


def reference_group(row: dict) -> str:
    """A results line's group: the one it carries (this project writes it), else the reference task's."""
    return row.get("group") or REFERENCE_TASKS[row["key"]].group


def aggregate(results: list[dict], group_of: Callable[[dict], str] = reference_group) -> dict[str, float]:
    """Mean main metric per group and the overall `average` (plain mean over tasks, as DataComp's
    aggregate_scores.py does); lines without a main metric (DataComp's FairFace, UTKFace) are left out."""
    scored = [row for row in results if row["metrics"].get("main_metric") is not None]
    by_group: dict[str, list[float]] = {}
    for row in scored:
        by_group.setdefault(group_of(row), []).append(row["metrics"]["main_metric"])
    summary = {group: float(np.mean(values)) for group, values in by_group.items()}
    summary["average"] = float(np.mean([row["metrics"]["main_metric"] for row in scored])) if scored else float("nan")
    return summary
