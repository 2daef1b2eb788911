"""A submission in the layout DataComp's public leaderboard takes (its `evaluate.py --submit`): a Hugging Face
repository with `<scale>_scale/results.jsonl` and `<scale>_scale/samples/<file>.npy`, plus the record its
database stores (scale, model, dataset size, hyperparameters, method, track, each task's main metric).

Nothing here holds or asks for credentials: who submits (author, email, Hugging Face user and repository) is
left blank in `submission.json` for the user to fill, and the upload is theirs to run (see README.md written
beside it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from datacomp_assets.core.files import temporary_sibling
from datacomp_assets.core.results import aggregate, read_results
from datacomp_assets.core.scales import ScaleConfig

PUBLIC_SCALES = ("small", "medium", "large", "xlarge")
USER_FIELDS = ("author", "email", "hf_username", "hf_repo_name")  # the submitter's to fill in


def export_submission(out: Path, scale: ScaleConfig, strategy: str, description: str, track: str,
                      subset_path: Path, results_path: Path, seed_averages: dict[str, float],
                      lineage: dict) -> dict:
    """Write the submission under `out` (replacing an earlier export whole) and return its record."""
    rows = list(read_results(results_path).values())
    if not rows:
        raise ValueError(f"{results_path} holds no results: materialize eval_results for {strategy} first")
    tmp = temporary_sibling(out)
    repo_dir = tmp / f"{scale.name}_scale"
    (repo_dir / "samples").mkdir(parents=True)
    shutil.copyfile(results_path, repo_dir / "results.jsonl")
    shutil.copyfile(subset_path, repo_dir / "samples" / f"{strategy}.npy")
    record = {
        "scale": scale.name, "model": scale.model, "dataset_size": len(np.load(subset_path, mmap_mode="r")),
        "batch_size": scale.global_batch, "learning_rate": scale.lr, "samples_seen": scale.samples_seen,
        "method_name": strategy, "track": track, "writeup": "", **dict.fromkeys(USER_FIELDS, ""),
        **{row["dataset"]: row["metrics"]["main_metric"] for row in rows
           if row["metrics"].get("main_metric") is not None},
    }
    tasks = sum(row["metrics"].get("main_metric") is not None for row in rows)
    summary = {"average": aggregate(rows)["average"], "tasks": tasks, "seed_averages": seed_averages,
               "lineage": lineage}
    (tmp / "submission.json").write_text(json.dumps({"record": record, "summary": summary}, indent=2) + "\n")
    (tmp / "README.md").write_text(_readme(scale, strategy, description, track, record, summary))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"record": record, "summary": summary}


def _readme(scale: ScaleConfig, strategy: str, description: str, track: str, record: dict, summary: dict) -> str:
    note = "" if scale.name in PUBLIC_SCALES else (
        f"\n**Note:** `{scale.name}` is this project's miniature scale; the public leaderboard ranks only "
        f"{', '.join(PUBLIC_SCALES)}. This export shows the layout, it is not a valid entry.\n")
    seeds = ", ".join(f"{k} {v:.4f}" for k, v in summary["seed_averages"].items())
    return f"""# DataComp submission: {strategy} ({scale.name} scale, {track} track)
{note}
{description}

- Model {record['model']}, {record['samples_seen']:,} samples seen, batch {record['batch_size']}, \
learning rate {record['learning_rate']}; dataset size {record['dataset_size']:,}.
- Average over {summary['tasks']} tasks of the submitted checkpoint: {summary['average']:.4f} \
(averages per training seed: {seeds}).
- Subset sha256 {summary['lineage'].get('subset_sha256', '')}, pool version \
{summary['lineage'].get('pool_version', '')}, code revision {summary['lineage'].get('code_revision', '')}.

## Upload (your step; this project holds no credentials)

1. Fill `author`, `email`, `hf_username`, `hf_repo_name` and optionally `writeup` in `submission.json`.
2. Log in and push the `{scale.name}_scale/` folder to your Hugging Face repository:

       hf auth login
       hf upload <hf_username>/<hf_repo_name> {scale.name}_scale {scale.name}_scale

3. Submit the record through DataComp's leaderboard form (datacomp.ai), or with their `evaluate.py --submit`
   pointing `--samples` at `{scale.name}_scale/samples/{strategy}.npy`.
"""
