"""Every environment variable the project reads, with its default and what it does; nothing else reads them.

Resource configuration (the storage root, the published mirror, the evaluation data) is handed to Dagster as
an `EnvVar` where the variable is set (`definitions.py`), so the UI shows where a value came from; everything
else calls `Variable.get()`. `docs/configuration.md` lists the same table (a test keeps the two in step).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    description: str

    def get(self) -> str:
        return os.environ.get(self.name, self.default)

    def is_set(self) -> bool:
        return self.name in os.environ


DATACOMP_HOME = Variable(
    "DATACOMP_HOME", "data", "Storage root: every artifact is written under `<root>/<scale>/<asset>/`.")
DATACOMP_MIRROR = Variable(
    "DATACOMP_MIRROR", "", "A local copy of the paper scales' published metadata (one `<shard>.parquet` per "
    "shard, optionally `<shard>.npz`), or a download_upstream.py --data_dir (its `metadata/` is read); empty: the "
    "Hugging Face Hub.")
DATACOMP_EVAL_DATA = Variable(
    "DATACOMP_EVAL_DATA", "", "Where DataComp's 38 reference test sets live at the paper's scales; empty: "
    "`<storage root>/eval_data`.")
DATACOMP_STRATEGIES = Variable(
    "DATACOMP_STRATEGIES", "", "Extra strategy files (TOML, `os.pathsep`-separated) added to the registry.")
DATACOMP_SCALES = Variable(
    "DATACOMP_SCALES", "", "Extra scale files (TOML, `os.pathsep`-separated): new scales, or the paper's pointed "
    "at local files.")
DATACOMP_MAX_CONCURRENT_STEPS = Variable(
    "DATACOMP_MAX_CONCURRENT_STEPS", "2", "Steps a UI, backfill or schedule run executes at once.")
DATACOMP_GPU_SLOTS = Variable(
    "DATACOMP_GPU_SLOTS", "1", "Slots of the instance's `gpu` pool (`python -m datacomp_assets.instance`).")
DATACOMP_RULE_TIME_LIMIT_S = Variable(
    "DATACOMP_RULE_TIME_LIMIT_S", "", "Seconds a strategy's rule may run before it is stopped (`0`: no limit); "
    "empty: 60 s per million pool rows, at least 600 s.")
DAGSTER_HOME = Variable(
    "DAGSTER_HOME", ".dagster_home", "Dagster's instance directory (runs, event logs, schedules); relative to "
    "the working directory.")
HF_HUB_OFFLINE = Variable(
    "HF_HUB_OFFLINE", "1", "Keep huggingface_hub offline (the default here); `0` lets the paper scales fetch "
    "published metadata and test sets from the Hub.")
DATACOMP_RAY_ADDRESS = Variable(
    "DATACOMP_RAY_ADDRESS", "", "A Ray cluster to run the heavy steps on (`ray.init`'s address: `<head>:6379`, "
    "`ray://<head>:10001`, or `auto` on a node of the cluster); empty: this machine.")
DATACOMP_RAY_JOBS_ADDRESS = Variable(
    "DATACOMP_RAY_JOBS_ADDRESS", "", "The cluster's job API, where Dagster's steps are submitted; empty: "
    "`http://<head>:8265`, the head of DATACOMP_RAY_ADDRESS.")
NO_ALBUMENTATIONS_UPDATE = Variable(
    "NO_ALBUMENTATIONS_UPDATE", "1", "Stops albumentations (an img2dataset dependency) phoning home on import.")

VARIABLES = (DATACOMP_HOME, DATACOMP_MIRROR, DATACOMP_EVAL_DATA, DATACOMP_STRATEGIES, DATACOMP_SCALES,
             DATACOMP_MAX_CONCURRENT_STEPS, DATACOMP_RAY_ADDRESS, DATACOMP_RAY_JOBS_ADDRESS,
             DATACOMP_GPU_SLOTS, DATACOMP_RULE_TIME_LIMIT_S, DAGSTER_HOME, HF_HUB_OFFLINE, NO_ALBUMENTATIONS_UPDATE)


def apply_offline_defaults() -> None:
    """Offline unless told otherwise, for this process and the children it starts (img2dataset, the trainer)."""
    for variable in (HF_HUB_OFFLINE, NO_ALBUMENTATIONS_UPDATE):
        os.environ.setdefault(variable.name, variable.default)


# Ray: no usage reports from an offline tool, and every node's lines reach the driver (its de-duplication would
# hide a rank's).
RAY_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def apply_ray_defaults() -> None:
    """Before `import ray`, in a process that drives or starts a cluster."""
    for name, value in RAY_DEFAULTS.items():
        os.environ.setdefault(name, value)


def ray_address() -> str:
    return DATACOMP_RAY_ADDRESS.get().strip()


def ray_jobs_address() -> str:
    """The job API of the cluster DATACOMP_RAY_ADDRESS names (Ray's dashboard port on its head)."""
    if DATACOMP_RAY_JOBS_ADDRESS.get():
        return DATACOMP_RAY_JOBS_ADDRESS.get()
    head = ray_address().removeprefix("ray://").rsplit(":", 1)[0]
    return f"http://{'127.0.0.1' if head in ('', 'auto') else head}:8265"


# Read by instance/dagster-postgres.yaml, in every process that opens the instance.
INSTANCE_VARIABLES = ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB")


def ray_job_environment() -> list[str]:
    """What a step submitted as a Ray job needs of this process's environment: the project's variables and the
    instance's that are set (names only: dagster-ray copies their values), and a PATH that finds this
    interpreter's `dagster` (the job runs `dagster api execute_step`)."""
    here = str(Path(sys.executable).parent)
    names = [v.name for v in VARIABLES if v.is_set()] + [n for n in INSTANCE_VARIABLES if n in os.environ]
    return names + [f"PATH={here}{os.pathsep}{os.environ.get('PATH', '')}"]


def hub_offline() -> bool:
    """Whether huggingface_hub must not be used. Read at call time: the library reads it once, at import."""
    return os.environ.get(HF_HUB_OFFLINE.name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def strategy_files() -> list[str]:
    return [p for p in DATACOMP_STRATEGIES.get().split(os.pathsep) if p]


def scale_files() -> list[str]:
    return [p for p in DATACOMP_SCALES.get().split(os.pathsep) if p]


def max_concurrent_steps() -> int:
    return int(DATACOMP_MAX_CONCURRENT_STEPS.get())


def gpu_slots() -> int:
    return int(DATACOMP_GPU_SLOTS.get())


def rule_time_limit_s() -> float | None:
    """DATACOMP_RULE_TIME_LIMIT_S: seconds, 0 for no limit; None when unset (the rule's runner scales its default
    with the pool). A value that is not a number of seconds is one line naming the variable."""
    text = DATACOMP_RULE_TIME_LIMIT_S.get().strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{DATACOMP_RULE_TIME_LIMIT_S.name}={text!r}: not a number of seconds; set it to a "
                         "number >= 0 (0: no limit), or unset it for the default")
    return seconds


def dagster_home() -> Path:
    """$DAGSTER_HOME, set to `.dagster_home` under the working directory when unset, and created (or
    UnusableDirectory, naming it)."""
    home = Path(os.environ.setdefault(DAGSTER_HOME.name, str(Path.cwd() / DAGSTER_HOME.default)))
    return usable_directory(DAGSTER_HOME, home)


class UnusableDirectory(ValueError):
    """A directory setting this process cannot write in: the variable, the path, why, and what to do."""


def usable_directory(variable: Variable, path: str | os.PathLike) -> Path:
    """`path` (the value of `variable`) as a directory this process can write in, created if missing.

    Checked up front, so a home that is a file, lies under a file or is read-only is one line naming the variable
    instead of a traceback from whichever library first writes there (sqlite's, for DAGSTER_HOME). Writability is
    probed by creating a file: permission bits do not stop root, a read-only mount does."""
    path = Path(path)
    fix = f"set {variable.name} to a writable directory"
    if path.exists() and not path.is_dir():
        raise UnusableDirectory(f"{variable.name}={path}: a file, not a directory; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file" if blocker else err.strerror
        raise UnusableDirectory(f"{variable.name}={path}: cannot be created, {why}; {fix}") from err
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UnusableDirectory(f"{variable.name}={path}: not writable ({err.strerror}); {fix}") from err
    return path


def environment_of(names: tuple[str, ...]) -> dict[str, str]:
    """Those of `names` that are set in this process's environment, with their values."""
    return {name: os.environ[name] for name in names if name in os.environ}


@contextmanager
def environment_set(**values: str) -> Iterator[None]:
    """These variables set for the duration of the block (a library that reads them then), restored after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def child_environment(**overrides: str) -> dict[str, str]:
    """The environment for a child process: this one's, offline by default, with `overrides`."""
    env = dict(os.environ)
    for variable in (HF_HUB_OFFLINE, NO_ALBUMENTATIONS_UPDATE):
        env.setdefault(variable.name, variable.default)
    return {**env, **overrides}
