"""Zero-shot evaluation on the engine: one task per checkpoint and task group (plain Python; no Dagster).

Each task loads its checkpoint once (here: once per process and checkpoint file, whatever the group) and writes its
group's lines, and their per-sample outcomes, to a part file beside the seed's results under a temporary name, then
renames it: a task retried after its worker died writes the same part again, and a part already whole is kept. Once
every group of a checkpoint is in, the lines are appended to its `eval_results.jsonl` in the registry's order (the
order `zeroshot.evaluate_checkpoint` writes them in one process, so the file is the same), the outcomes added to its
`eval_samples.npz`, and the parts removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from datacomp_assets.core.engine import Engine, clear_process_cache, file_key, process_cache
from datacomp_assets.core.files import replace_atomically, temporary_sibling
from datacomp_assets.core.results import read_results
from datacomp_assets.evaluation import noise
from datacomp_assets.evaluation.reference import MissingEvalData, missing_tasks
from datacomp_assets.evaluation.zeroshot import REFERENCE_BATCH_SIZE, evaluate_checkpoint


@dataclass(frozen=True)
class CheckpointToScore:
    """One checkpoint's files: its results and samples, and where each task group's part goes."""

    checkpoint: Path | None
    results: Path
    samples: Path
    part: Callable[[str], Path]  # group -> its part file (the driver's; never sent to a task)
    name: str = ""               # for the log ("seed 0")


@dataclass(frozen=True)
class GroupTask:
    model: str
    checkpoint: str | None
    suite_root: str
    tasks: tuple  # the group's tasks still to score, in the registry's order
    part: str
    device: str = "cpu"
    batch_size: int = REFERENCE_BATCH_SIZE


def part_samples(part: str | os.PathLike) -> Path:
    return Path(part).with_suffix(".npz")


def evaluate_group(task: GroupTask) -> tuple[str, list[dict]]:
    """One task: (its part, the group's lines), kept where the part is already whole, else written to it
    atomically."""
    from datacomp_assets.core.models import load_model

    part, keys = Path(task.part), [t.key for t in task.tasks]
    done = read_results(part)
    if all(k in done for k in keys):
        return task.part, [done[k] for k in keys]
    loaded = process_cache(("evaluation", task.model, file_key(task.checkpoint), task.device),
                           lambda: load_model(task.model, task.checkpoint, device=task.device))
    tmp, tmp_samples = temporary_sibling(part), temporary_sibling(part_samples(part))
    try:
        rows = evaluate_checkpoint(task.model, task.checkpoint, task.suite_root, tmp, device=task.device,
                                   batch_size=task.batch_size, registry={t.key: t for t in task.tasks},
                                   samples_file=tmp_samples, loaded=loaded)
        if tmp_samples.exists():  # the outcomes first: a part's lines are there only with them
            os.replace(tmp_samples, part_samples(part))
        os.replace(tmp, part)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_samples.unlink(missing_ok=True)
    return task.part, rows


def evaluate_on_engine(model: str, checkpoints: list[CheckpointToScore], suite_root: str | os.PathLike,
                       registry: Mapping[str, object], device: str = "cpu", engine: Engine = Engine(),
                       gpus: float = 1.0, log: Callable[[str], None] = print,
                       batch_size: int = REFERENCE_BATCH_SIZE,
                       task_done: Callable[[int, str], None] | None = None) -> list[list[dict]]:
    """Every checkpoint on every task of `registry`, one engine task per checkpoint and task group: here in this
    process, in the registry's order; on Ray, each task requesting `gpus` GPUs where the cluster has them. Tasks
    already in a checkpoint's results are skipped; before any model loads, every task left to do must be on disk
    (MissingEvalData names them). Each task scored goes to `task_done(tasks in the results of all checkpoints,
    note)` if given, else to `log`. Returns each checkpoint's lines, in the registry's order."""
    keys = list(registry)
    tasks, todo_of, missing = [], [], {}
    for c in checkpoints:
        done = read_results(c.results)
        todo = [registry[k] for k in keys if k not in done]
        todo_of.append(todo)
        missing.update({t.key: t for t in missing_tasks(suite_root, todo)})
        groups: dict[str, list] = {}
        for t in todo:
            groups.setdefault(t.group, []).append(t)
        tasks += [(len(todo_of) - 1, GroupTask(model, c.checkpoint and str(c.checkpoint), str(suite_root), tuple(group),
                                               str(c.part(name)), device, batch_size))
                  for name, group in groups.items()]
    if missing:
        raise MissingEvalData(suite_root, list(missing.values()), "not found")
    owner = {task.part: i for i, task in tasks}
    left = [sum(1 for i, _ in tasks if i == n) for n in range(len(checkpoints))]
    rows: list[dict[str, dict]] = [{} for _ in checkpoints]
    scored = len(checkpoints) * len(keys) - sum(map(len, todo_of))
    try:
        for part, group_rows in engine.map_unordered(evaluate_group, [t for _, t in tasks], processes=1,
                                                     step="evaluation", gpus=gpus):
            i = owner[part]
            for row in group_rows:
                rows[i][row["key"]] = row
                scored += 1
                main = row["metrics"].get("main_metric")
                note = (f"{checkpoints[i].name or checkpoints[i].checkpoint}, {row['key']}: "
                        + ("no main metric" if main is None else f"main metric = {main:.4f}"))
                (task_done or (lambda _, line: log(line)))(scored, note)
            left[i] -= 1
            if not left[i]:
                _merge(checkpoints[i], todo_of[i], rows[i])
    finally:
        clear_process_cache()
    out = []
    for c in checkpoints:
        done = read_results(c.results)
        out.append([done[k] for k in keys])
    return out


def _merge(c: CheckpointToScore, todo: list, rows: Mapping[str, dict]) -> None:
    """The parts' lines appended to the checkpoint's results in the registry's order, their outcomes added to its
    samples; then the parts removed."""
    parts = sorted({c.part(t.group) for t in todo})
    outcomes: dict = {}
    for part in parts:
        outcomes |= noise.read_outcomes(part_samples(part))
    ordered = {t.key: outcomes[t.key] for t in todo if t.key in outcomes}
    if ordered:
        noise.add_outcomes(c.samples, ordered)
    text = c.results.read_text() if c.results.exists() else ""
    if text and not text.endswith("\n"):  # a line cut short by a crash: the new lines start on their own
        text += "\n"
    text += "".join(json.dumps(rows[t.key]) + "\n" for t in todo)
    c.results.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(lambda tmp: tmp.write_text(text), c.results)
    for part in parts:
        part_samples(part).unlink(missing_ok=True)
        part.unlink(missing_ok=True)
