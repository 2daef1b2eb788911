"""Download the pool's images into webdataset shards with the real img2dataset, as DataComp does.

Settings follow the reference (keep_ratio_largest, resize only if bigger, jpg, webdataset, uid kept
as an extra column, sha256 computed, and verified against the index's sha256 column when it has one, so
a poisoned image is a counted failure). On a Ray cluster img2dataset's own `ray` distributor fetches one shard per
Ray task (a task whose node is lost is retried and rewrites the same shard); the shards folder must then be on a
file system every node shares. img2dataset's incremental mode skips every shard that already
has a ``_stats.json``, so calling ``download_shards`` again on the same folder resumes instead of
starting over; shards an interrupted run left half-written are deleted first. A call also asks again for the
samples of the shards an earlier call finished that failed for a reason that may pass (timeouts, HTTP 5xx,
dropped connections), and merges what comes back into those shards (`pool.retry`); the rest is kept as it is.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datacomp_assets.core import processes, settings
from datacomp_assets.core.engine import Engine, ray_error_message
from datacomp_assets.core.shards import STATS_SUFFIX, shard_problem
from datacomp_assets.pool.retry import RetryReport, finish_interrupted_merges, finished_shards, retry_failed

# albumentations (pulled in by img2dataset) checks for updates over the network on import.
settings.apply_offline_defaults()

REQUIRED_COLUMNS = ("uid", "url", "text")
# Shards are named NNNNNNNN.tar like the reference pool (img2dataset's default is 5 digits).
SHARD_DIGITS = 8
# The reference's img2dataset settings, at every scale (image size and shard size come from the scale).
# A sha256 in the index is verified (a changed image is a counted failure, never a silent accept).
REFERENCE_SETTINGS = {
    "input_format": "parquet",
    "url_col": "url",
    "caption_col": "text",
    "save_additional_columns": ["uid"],
    "output_format": "webdataset",
    "resize_mode": "keep_ratio_largest",
    "resize_only_if_bigger": True,
    "encode_format": "jpg",
    "oom_shard_count": SHARD_DIGITS,
    "compute_hash": "sha256",
}
SHARD_FILE = re.compile(r"^(\d+)\.(tar|parquet)$")
RAY_TASK_RETRIES = 3  # img2dataset's Ray task has Ray's defaults: a task whose worker dies is run 3 more times

FAILURE_KINDS = ("dead_link", "refused", "timeout", "server_error", "decode", "hash_mismatch", "other")
# The failure each injected web fault must produce (None: the download must succeed). A transient fault
# (`unavailable`, `stalled`) fails the first download and must succeed once a second one has retried it.
EXPECTED_FAILURE = {"dead_link": "dead_link", "refused": "refused", "slow": "timeout", "corrupt": "decode",
                    "truncated": "decode", "poisoned": "hash_mismatch", "redirect": None,
                    "unavailable": None, "stalled": None}


@dataclass
class DownloadSummary:
    """Totals over every shard's ``_stats.json`` in a download folder."""

    shards: int = 0
    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    success_rate: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # error message -> samples
    failures_by_kind: dict[str, int] = field(default_factory=dict)  # FAILURE_KINDS -> samples
    elapsed_s: float = 0.0  # wall time of the download_shards call (0 when only summarised)
    images_per_second: float = 0.0
    retry: RetryReport = field(default_factory=RetryReport)  # what this call asked again (download_shards only)


def failure_kind(error_message: str) -> str:
    """Classify an img2dataset error message (urllib's or the resizer's) into FAILURE_KINDS."""
    message = error_message.lower()
    if "hash mismatch" in message:
        return "hash_mismatch"
    if "http error 404" in message:
        return "dead_link"
    if "refused" in message:
        return "refused"
    if "timed out" in message or "timeout" in message:
        return "timeout"
    if re.search(r"http error 5\d\d", message):
        return "server_error"
    if "decod" in message or "resize" in message:
        return "decode"
    return "other"


def list_tars(out_dir: str | Path) -> list[Path]:
    """The webdataset shards in a download folder, in shard order."""
    return sorted(Path(out_dir).glob("*.tar"))


def summarize_shards(out_dir: str | Path) -> DownloadSummary:
    """Aggregate the ``*_stats.json`` files img2dataset wrote for each finished shard."""
    summary = DownloadSummary()
    errors: Counter[str] = Counter()
    for stats_path in sorted(Path(out_dir).glob("*_stats.json")):
        stats = json.loads(stats_path.read_text())
        summary.shards += 1
        summary.count += stats["count"]
        summary.successes += stats["successes"]
        summary.failed_to_download += stats["failed_to_download"]
        summary.failed_to_resize += stats["failed_to_resize"]
        # status_dict maps each outcome ("success" or the error message) to a sample count.
        for message, n in stats.get("status_dict", {}).items():
            if message != "success":
                errors[message] += n
    summary.success_rate = summary.successes / summary.count if summary.count else 0.0
    summary.errors = dict(errors.most_common())
    by_kind: Counter[str] = Counter()
    for message, n in errors.items():
        by_kind[failure_kind(message)] += n
    summary.failures_by_kind = {k: by_kind[k] for k in FAILURE_KINDS if by_kind[k]}
    return summary


def _finished_shard_parquets(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("*.parquet")
                  if SHARD_FILE.match(p.name) and (out_dir / f"{p.stem}_stats.json").exists())


def read_failures(out_dir: str | Path) -> pa.Table:
    """uid, status, error_message and failure_kind of every failed sample of the finished shards."""
    tables = [pq.read_table(p, columns=["uid", "status", "error_message"])
              for p in _finished_shard_parquets(Path(out_dir))]
    schema = pa.schema([("uid", pa.string()), ("status", pa.string()), ("error_message", pa.string())])
    table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    table = table.filter(pc.not_equal(table.column("status"), "success"))
    kinds = [failure_kind(m or "") for m in table.column("error_message").to_pylist()]
    return table.append_column("failure_kind", pa.array(kinds, pa.string()))


def check_against_ground_truth(out_dir: str | Path, ground_truth_parquet: str | Path) -> dict:
    """Per injected fault: how many were injected, and how many downloads ended as EXPECTED_FAILURE says.

    ``{"dead_link": {"injected": 40, "observed": 40, "expected": "dead_link"}, ...,
    "no_fault": {"samples": 900, "failed": 0}}`` over the uids of the finished shards.
    """
    downloaded = set()
    for p in _finished_shard_parquets(Path(out_dir)):
        downloaded.update(pq.read_table(p, columns=["uid"]).column("uid").to_pylist())
    failures = read_failures(out_dir)
    kind_by_uid = dict(zip(failures.column("uid").to_pylist(), failures.column("failure_kind").to_pylist()))
    truth = pq.read_table(ground_truth_parquet, columns=["uid", "fault"]).to_pylist()
    report: dict = {fault: {"injected": 0, "observed": 0, "expected": expected or "success"}
                    for fault, expected in EXPECTED_FAILURE.items()}
    report["no_fault"] = {"samples": 0, "failed": 0}
    for row in truth:
        if row["uid"] not in downloaded:
            continue
        observed = kind_by_uid.get(row["uid"])  # None: downloaded fine
        if row["fault"] is None:
            report["no_fault"]["samples"] += 1
            report["no_fault"]["failed"] += observed is not None
        else:
            report[row["fault"]]["injected"] += 1
            report[row["fault"]]["observed"] += observed == EXPECTED_FAILURE[row["fault"]]
    return report


def remove_unfinished_shards(out_dir: str | Path) -> list[str]:
    """Delete what an interrupted run left half-written; return the names removed.

    A shard is finished once img2dataset wrote its ``_stats.json`` (after closing its tar and parquet);
    a tar or parquet without one, an unreadable ``_stats.json``, and img2dataset's ``_tmp`` folder are
    leftovers that incremental mode would otherwise trust or trip over.
    """
    out_dir = Path(out_dir)
    removed = []
    for stats_path in out_dir.glob("*_stats.json"):
        try:
            json.loads(stats_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):  # killed while writing it
            stats_path.unlink()
            removed.append(stats_path.name)
    for path in sorted(out_dir.iterdir()):
        match = SHARD_FILE.match(path.name)
        if match and not (out_dir / f"{match.group(1)}_stats.json").exists():
            path.unlink()
            removed.append(path.name)
    if (out_dir / "_tmp").exists():
        shutil.rmtree(out_dir / "_tmp")
        removed.append("_tmp")
    return removed


def damaged_shards(out_dir: str | Path) -> dict[Path, str]:
    """Each finished shard (one with a `_stats.json`) whose tar is not whole, and what is wrong with it: missing,
    cut short, or holding fewer samples than its table counts (`core.shards.shard_problem`: headers only)."""
    tars = [stats.with_name(stats.name.removesuffix(STATS_SUFFIX) + ".tar")
            for stats in sorted(Path(out_dir).glob(f"*{STATS_SUFFIX}"))]
    return {tar: problem for tar in tars if (problem := shard_problem(tar))}


def remove_damaged_shards(out_dir: str | Path) -> dict[Path, str]:
    """Delete the files of every damaged shard (tar, parquet, `_stats.json`), so that img2dataset's incremental mode
    fetches it again; returns what was wrong with each. A retry's merge cut off half-way is completed first (its
    shards would look damaged)."""
    if Path(out_dir).is_dir():
        finish_interrupted_merges(out_dir)
    damaged = damaged_shards(out_dir)
    for tar in damaged:
        for path in (tar, tar.with_suffix(".parquet"), tar.with_name(tar.stem + STATS_SUFFIX)):
            path.unlink(missing_ok=True)
    return damaged


def check_index(index_parquet: str | Path) -> None:
    """Raise ValueError naming the file and the missing column if the index cannot be downloaded."""
    path = Path(index_parquet)
    if not path.is_file():
        raise ValueError(f"pool index {path} does not exist")
    names = set(pq.read_schema(path).names)
    for column in REQUIRED_COLUMNS:
        if column not in names:
            raise ValueError(f"pool index {path} lacks the required column {column!r}")


def _run_img2dataset(finished: Callable[[], bool], log: Callable[[str], None], **kwargs) -> None:
    """img2dataset.download(**kwargs), its pool's workers started with the default SIGINT and SIGTERM (a
    backgrounded run ignores both, and its workers would ignore the SIGTERM of the pool's terminate(), whose join
    then waits forever), and, once `finished()` (every shard written), workers left after a grace period killed."""
    import img2dataset  # late: a slow import (opencv, albumentations, wandb)

    if threading.current_thread() is not threading.main_thread():
        # img2dataset installs a SIGINT handler, which Python only allows on the main thread.
        raise RuntimeError("download_shards must run on the main thread (img2dataset sets signal handlers)")
    # The workers are the children started during the call (no other code here starts any: it is the main thread).
    workers = processes.new_children({p.pid for p in multiprocessing.active_children()})
    reaper = processes.Reaper("img2dataset's download pool", workers, log).arm_when(finished)
    with processes.children_get_default_signals(), reaper:
        previous = signal.getsignal(signal.SIGINT)
        try:
            img2dataset.download(**kwargs)
        finally:
            # img2dataset's handler would otherwise outlive the call and sys.exit(0) on Ctrl-C.
            signal.signal(signal.SIGINT, previous)


class IncompleteDownload(RuntimeError):
    """Some shards did not finish (a full disk, a killed worker): the download is not the whole pool."""


def watch_shards(out_dir: Path, progress: Callable[[int, str], None], every_s: float = 1.0) -> threading.Event:
    """Tell `progress` each time more shards have finished (img2dataset's workers are other processes; their
    `_stats.json` files are the news), from a thread that stops when the returned event is set."""
    stop = threading.Event()

    def watch() -> None:
        reported = -1
        while not stop.wait(every_s):
            finished = summarize_shards(out_dir)
            if finished.shards != reported:
                reported = finished.shards
                progress(finished.shards, f"{finished.successes:,} images")

    threading.Thread(target=watch, name="download-progress", daemon=True).start()
    return stop


def free_space(path: Path) -> str:
    return f"{shutil.disk_usage(path).free / 2**20:,.0f} MB free on {path}'s file system"


def check_complete(summary: DownloadSummary, out_dir: Path, expected_shards: int, urls: int) -> None:
    """Raise IncompleteDownload, naming the folder and its free space, unless every shard finished and every
    url of the index is accounted for (downloaded or a counted failure)."""
    if summary.shards >= expected_shards and summary.count >= urls:
        return
    raise IncompleteDownload(
        f"{out_dir}: {summary.shards} of {expected_shards} shards finished, {summary.count} of {urls} urls "
        f"accounted for; {free_space(out_dir)}. Free space (or fix what stopped the workers above), then "
        "materialize again: finished shards are kept and only the rest is fetched.")


def img2dataset_options(index_parquet: str | Path, image_size: int, shard_size: int, processes: int, threads: int,
                        timeout: int, retries: int, engine: Engine) -> dict:
    """img2dataset's arguments for a url list, as the reference downloads (the url list and folder aside)."""
    columns = pq.read_schema(index_parquet).names
    return dict(
        **REFERENCE_SETTINGS,
        # Blur faces at download time where the index lists them (the published metadata does).
        bbox_col="face_bboxes" if "face_bboxes" in columns else None,
        verify_hash=["sha256", "sha256"] if "sha256" in columns else None,
        image_size=image_size,
        number_sample_per_shard=shard_size,
        processes_count=processes,
        thread_count=threads,
        timeout=timeout,
        retries=retries,
        enable_wandb=False,
        distributor="ray" if engine.on_ray else "multiprocessing",
        incremental_mode="incremental",
    )


def fetch(url_list: Path, folder: Path, expected_shards: int, options: dict, engine: Engine,
          log: Callable[[str], None], progress: Callable[[int, str], None] | None = None) -> None:
    """Run img2dataset over `url_list` into `folder`; a full disk or a lost Ray task is an IncompleteDownload."""
    folder.mkdir(parents=True, exist_ok=True)
    watching = watch_shards(folder, progress) if progress else None
    try:
        _run_img2dataset(lambda: len(list(folder.glob("*_stats.json"))) >= expected_shards, log,
                         url_list=str(url_list.resolve()), output_folder=str(folder.resolve()), **options)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise IncompleteDownload(f"{folder}: the disk is full ({free_space(folder)}): {err}. Free space, then "
                                 "materialize again: finished shards are kept.") from err
    except Exception as err:
        if not engine.on_ray or not type(err).__module__.startswith("ray."):
            raise
        remove_unfinished_shards(folder)
        raise IncompleteDownload(
            f"{folder}: a download task failed on {engine.describe()}: {ray_error_message(err, RAY_TASK_RETRIES)}. "
            "Materialize again: finished shards are kept and only the rest is fetched.") from None
    finally:
        if watching:
            watching.set()


def download_shards(index_parquet: str | Path, out_dir: str | Path, image_size: int, shard_size: int,
                    processes: int = 2, threads: int = 16, timeout: int = 10,
                    retries: int = 2, progress: Callable[[int, str], None] | None = None,
                    engine: Engine = Engine(), log: Callable[[str], None] = processes.to_stderr,
                    retry_failed_samples: bool = True) -> DownloadSummary:
    """Fetch every URL of the index into out_dir as NNNNNNNN.tar/.parquet/_stats.json shards, in `processes`
    processes here or one Ray task per shard on the engine's cluster; raise IncompleteDownload when any shard did
    not finish (the finished ones are kept for the next call). Then, with `retry_failed_samples`, fetch again the
    retryable failures of the shards an earlier call finished (`summary.retry` counts them). `progress(shards
    finished, note)` is told as shards finish; `log` gets a line if the pool's workers had to be killed after every
    shard was written."""
    check_index(index_parquet)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finish_interrupted_merges(out_dir)
    remove_unfinished_shards(out_dir)
    done = summarize_shards(out_dir)  # shards a previous call finished
    earlier = finished_shards(out_dir)
    urls = pq.read_metadata(index_parquet).num_rows
    expected_shards = -(-urls // shard_size)
    options = img2dataset_options(index_parquet, image_size, shard_size, processes, threads, timeout, retries, engine)
    start = time.perf_counter()
    if engine.on_ray:
        engine.connect()  # img2dataset's ray distributor submits to the cluster this process has joined
    # With every shard finished, img2dataset is not called at all: that also avoids a hang seen when its worker
    # pool is terminated while its workers are still starting (zero tasks to map).
    if done.shards < expected_shards:
        fetch(Path(index_parquet), out_dir, expected_shards, options, engine, log, progress)
        remove_unfinished_shards(out_dir)  # what a failed worker left behind must not look finished later
        check_complete(summarize_shards(out_dir), out_dir, expected_shards, urls)
    report = RetryReport()
    if retry_failed_samples and earlier:
        report = retry_failed(index_parquet, out_dir, earlier, shard_size, SHARD_DIGITS, kind_of=failure_kind,
                              fetch=lambda url_list, folder, n: fetch(url_list, folder, n, options, engine, log))
    elapsed = time.perf_counter() - start
    summary = summarize_shards(out_dir)
    summary.elapsed_s, summary.retry = elapsed, report
    # Throughput of this call only: a resumed run does not get credit for earlier shards.
    summary.images_per_second = (summary.successes - done.successes) / elapsed if elapsed > 0 else 0.0
    return summary
