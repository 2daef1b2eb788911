"""DataComp's evaluation tasks (the table is `core.reference_tasks`): the local directory that holds their test
sets, and fetching them.

The directory is the data_dir of DataComp's `download_evalsets.py`, read exactly as that script leaves it:

    <data_dir>/wds_<key with / as ->_test/   every classification task, FairFace and UTKFace included
        (djghosh/wds_*_test in clip_benchmark's webdataset layout): classnames.txt,
        zeroshot_classification_templates.txt, test/nshards.txt, test/{i}.tar (samples <key>.webp|png|jpg|jpeg
        + <key>.cls, and <key>.npy metadata for the WILDS and fairness tasks)
    <data_dir>/hf_cache/                      Flickr, MSCOCO and WinoGAViL: the `datasets` library's cache of
        nlphuji/flickr_1k_test_image_text_retrieval, nlphuji/mscoco_2014_5k_test_image_text_retrieval and
        nlphuji/winogavil, read with `datasets.load_dataset(repo, split="test", cache_dir=...)` (see `hub_rows`)

Our own `--download` fetches the same djghosh folders, and the nlphuji repos' files into
`<data_dir>/<repo name>/` (see `hub_rows` for why). This module imports neither torch nor Dagster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from datacomp_assets.core.reference_tasks import REFERENCE_TASKS, TASKLIST, ReferenceTask
from datacomp_assets.evaluation import hub_rows

# ---------------------------------------------------------------- what is on disk


def task_directory(root: str | Path, task) -> Path:
    """Where a task's test set lives under root: its `dir_name` if it has one (reference tasks), else its key."""
    return Path(root) / getattr(task, "dir_name", task.key)


def has_webdataset(task_dir: Path) -> bool:
    """True when `test/nshards.txt` and every shard it announces are there."""
    nshards_file = Path(task_dir) / "test" / "nshards.txt"
    try:
        nshards = int(nshards_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    return nshards > 0 and all((nshards_file.parent / f"{i}.tar").exists() for i in range(nshards))


def is_present(task_dir: Path) -> bool:
    """True when a task's test set is complete: a webdataset in task_dir, or a Hub task's rows (in the
    `hf_cache` beside task_dir, or in task_dir's own files)."""
    return has_webdataset(task_dir) or hub_rows.has_rows(task_dir)


def missing_tasks(root: str | Path, tasks: Iterable | None = None) -> list:
    """The tasks (default: the 38 averaged reference tasks) whose test set is not complete under root."""
    tasks = list(REFERENCE_TASKS.values()) if tasks is None else list(tasks)
    return [task for task in tasks if not is_present(task_directory(root, task))]


class MissingEvalData(FileNotFoundError):
    """Test sets are missing and cannot be fetched; the message names each one and the ways to provide it."""

    def __init__(self, root: str | Path, missing: list, reason: str):
        self.root, self.missing, self.reason = Path(root), list(missing), reason
        super().__init__(missing_message(root, missing, reason))


def looked_in(root: str | Path, task) -> str:
    """The folder(s) a task's test set is looked for in."""
    folder = task_directory(root, task)
    if getattr(task, "webdataset", True):
        return str(folder)
    return f"{hub_rows.hf_cache(folder)} (download_evalsets.py's `datasets` cache) or {folder}"


def missing_message(root: str | Path, missing: list, reason: str) -> str:
    lines = [f"{len(missing)} evaluation test set(s) missing under {root} ({reason}):"]
    for task in missing:
        source = f"Hugging Face dataset {task.hf_repo}" if hasattr(task, "hf_repo") else "the tiny suite"
        lines.append(f"  {task.key}: {source} -> {looked_in(root, task)}")
    if any(hasattr(task, "hf_repo") for task in missing):
        lines.append(
            f"Provide them in one of three ways. (1) Point --data-dir (DATACOMP_EVAL_DATA) at the data_dir of "
            f"DataComp's `python download_evalsets.py <data_dir>`, or run it into {root}: its wds_*_test folders "
            f"and its hf_cache are read as they are. (2) Where huggingface.co is reachable, fetch them here: run "
            f"the CLI with --download (or call ensure_reference_suite(root, download=True)) with HF_HUB_OFFLINE "
            f"unset. (3) Copy each djghosh repo into the folder named above, e.g. `hf download "
            f"djghosh/wds_imagenet1k_test --repo-type dataset --local-dir "
            f"{task_directory(root, REFERENCE_TASKS['imagenet1k'])}`.")
    if not all(hasattr(task, "hf_repo") for task in missing):
        lines.append("Build the tiny suite with datacomp_assets.world.eval_suite.build_suite(root) "
                     "(or materialize the eval_suite asset).")
    return "\n".join(lines)


# ---------------------------------------------------------------- fetching


def check_hub_caches(root: str | Path, tasks: Iterable[ReferenceTask]) -> None:
    """Open each Hub task's `hf_cache` as the evaluation will, and read its first image (milliseconds each): a
    cache that is there but cannot be read fails before any model is loaded, with hub_rows' one-line advice."""
    for task in tasks:
        task_dir = task_directory(root, task)
        if not task.webdataset and hub_rows.cached_test_files(task_dir):
            hub_rows.check_cache(task_dir)


def download_task(task: ReferenceTask, root: str | Path, timeout_s: float) -> None:
    """Fetch one test set into its folder (resumable: files already there are kept)."""
    from huggingface_hub import snapshot_download

    task_dir = task_directory(root, task)
    snapshot_download(repo_id=task.hf_repo, repo_type="dataset", local_dir=task_dir, etag_timeout=timeout_s)
    if not task.webdataset and not hub_rows.has_files(task_dir):
        # A repo that holds only a `datasets` loading script: its rows are in the Hub's parquet export.
        snapshot_download(repo_id=task.hf_repo, repo_type="dataset", revision="refs/convert/parquet",
                          local_dir=task_dir, allow_patterns=["*test*.parquet"],
                          etag_timeout=timeout_s)


def ensure_reference_suite(root: str | Path, download: bool, tasks: Iterable[str] | None = None,
                           progress: Callable[[str], None] | None = None) -> list[ReferenceTask]:
    """Make sure the reference tasks (the 38, or the given keys of TASKLIST) are under root; return those
    fetched now.

    With everything present this touches no network. Otherwise it fetches the missing ones with
    `huggingface_hub.snapshot_download` when `download` is true and the Hub is on and reachable, and raises
    MissingEvalData at once, naming every missing task, its repo and folder, when it cannot. A Hub task's
    `hf_cache` that is there but unreadable raises hub_rows.HubCacheError now, not when its turn comes.
    """
    from datacomp_assets.core.published import HUB_TIMEOUT_S, hub_offline, network_errors

    log = progress or (lambda message: None)
    selected = [TASKLIST[key] for key in tasks] if tasks is not None else list(REFERENCE_TASKS.values())
    missing = missing_tasks(root, selected)
    check_hub_caches(root, [task for task in selected if task not in missing])
    if not missing:
        return []
    if not download:
        raise MissingEvalData(root, missing, "downloading is off")
    if hub_offline():
        raise MissingEvalData(root, missing, "HF_HUB_OFFLINE is set")
    from huggingface_hub import HfApi

    try:
        # A cheap request first, with a short timeout: a missing network fails here in seconds.
        HfApi().repo_info(missing[0].hf_repo, repo_type="dataset", timeout=HUB_TIMEOUT_S)
        for task in missing:
            log(f"downloading {task.key} from {task.hf_repo}")
            download_task(task, root, HUB_TIMEOUT_S)
    except network_errors() as exc:
        raise MissingEvalData(root, missing_tasks(root, missing), f"huggingface.co is unreachable ({exc})") from exc
    still_missing = missing_tasks(root, missing)
    if still_missing:
        raise MissingEvalData(root, still_missing, "downloaded, but the expected files are not there")
    return missing
