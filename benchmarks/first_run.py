"""A newcomer's first run, timed stage by stage: the README's first command from a fresh clone.

    .venv/bin/python benchmarks/first_run.py [--commit HEAD] [--work-dir /tmp/first_run] [-- ARGS...]
    .venv/bin/python benchmarks/first_run.py --profile-only CLONE    # an existing clone's last run

Clones this repository at `--commit` into `--work-dir/clone`, runs `bin/setup` (the install, timed), then
`.venv/bin/python -m datacomp_assets.run --scale tiny ARGS` (the main command, timed; its terminal output counted
in lines), both from the clone, nothing shared with this checkout but pip's cache. The stage profile is read
back from the clone's Dagster instance (every step of every run: its wall seconds, from Dagster's own step
stats) and from open_clip's logs (each training's seconds, from its first to its last log line, and the
interpreter start-up before it). With `--profile-only` nothing is run: an earlier clone's runs are profiled.

Prints one JSON object: install and run seconds, output lines, the pool stage's steps, each strategy's steps,
each training, and totals by kind of work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPEN_CLIP_TIME = re.compile(r"^(\d{4}-\d\d-\d\d,\d\d:\d\d:\d\d) \|")


def run_timed(command: list[str], cwd: Path, env: dict, output: Path) -> tuple[float, int, int]:
    """(seconds, exit code, lines printed) of a command, its output saved to `output`."""
    start = time.perf_counter()
    with open(output, "w") as out:
        code = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    return round(time.perf_counter() - start, 1), code, len(output.read_text(errors="replace").splitlines())


def step_profile(clone: Path) -> list[dict]:
    """Every step of every run in the clone's Dagster instance, in order: step, partition, seconds, status."""
    script = """
import json, dagster as dg
instance = dg.DagsterInstance.get()
steps = []
for run in reversed(instance.get_runs()):
    partition = run.tags.get("dagster/partition", "")
    for s in instance.get_run_step_stats(run.run_id):
        steps.append({"step": s.step_key, "partition": partition, "start": s.start_time,
                      "seconds": round((s.end_time or s.start_time) - s.start_time, 2), "status": s.status.value})
print(json.dumps(steps))
"""
    env = {**os.environ, "DAGSTER_HOME": str(clone / ".dagster_home")}
    out = subprocess.run([str(clone / ".venv/bin/python"), "-c", script], cwd=clone, env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def training_profile(clone: Path) -> list[dict]:
    """Each open_clip training under the clone's data: its seconds from first to last log line."""
    trainings = []
    for log in sorted((clone / "data").rglob("out.log")):
        stamps = [datetime.strptime(m[1], "%Y-%m-%d,%H:%M:%S") for line in log.read_text(errors="replace").splitlines()
                  if (m := OPEN_CLIP_TIME.match(line))]
        if stamps:
            trainings.append({"run": str(log.parent.relative_to(clone / "data")),
                              "seconds": (stamps[-1] - stamps[0]).total_seconds()})
    return trainings


def summarize(steps: list[dict], trainings: list[dict]) -> dict:
    pool = defaultdict(float)
    strategies: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    kinds = defaultdict(float)
    for s in steps:
        partition = s["partition"]
        if "|" in partition and not partition.endswith("|dfn"):
            strategies[partition.split("|", 1)[1]][s["step"]] += s["seconds"]
        else:
            pool[s["step"]] += s["seconds"]
        kinds[s["step"]] += s["seconds"]
    return {"pool_steps": {k: round(v, 1) for k, v in pool.items()},
            "pool_seconds": round(sum(pool.values()), 1),
            "strategy_steps": {k: {step: round(v, 1) for step, v in d.items()} for k, d in strategies.items()},
            "seconds_by_step": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "trainings": trainings,
            "training_seconds_in_open_clip": round(sum(t["seconds"] for t in trainings), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/first_run"))
    parser.add_argument("--profile-only", type=Path, help="profile the runs of an existing clone; run nothing")
    parser.add_argument("args", nargs="*", help="arguments of the main command after --scale tiny")
    args = parser.parse_args()
    result = {"benchmark": "first_run", "command": " ".join(sys.argv), "machine": platform.platform(),
              "cpus": os.cpu_count()}
    if args.profile_only:
        clone = args.profile_only.resolve()
    else:
        clone = args.work_dir / "clone"
        shutil.rmtree(clone, ignore_errors=True)
        clone.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "checkout", "-q", args.commit], cwd=clone, check=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATACOMP_", "DAGSTER_"))}
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                                          text=True).stdout.strip()
        install = run_timed(["bin/setup"], clone, env, args.work_dir / "setup.out")
        command = [".venv/bin/python", "-m", "datacomp_assets.run", "--scale", "tiny", *args.args]
        run = run_timed(command, clone, env, args.work_dir / "run.out")
        result.update({"main_command": " ".join(command), "install_seconds": install[0], "run_seconds": run[0],
                       "total_seconds": round(install[0] + run[0], 1), "exit_code": run[1],
                       "install_output_lines": install[2], "run_output_lines": run[2]})
    result.update(summarize(step_profile(clone), training_profile(clone)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
