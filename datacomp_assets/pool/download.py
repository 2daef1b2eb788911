"""Download the pool's images into webdataset shards with the real img2dataset, as DataComp does.

Settings follow the reference (keep_ratio_largest, resize only if bigger, jpg, webdataset, uid kept
as an extra column, sha256 computed). img2dataset's incremental mode skips every shard that already
has a ``_stats.json``, so calling ``download_shards`` again on the same folder resumes instead of
starting over.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

# albumentations (pulled in by img2dataset) checks for updates over the network on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REQUIRED_COLUMNS = ("uid", "url", "text")
# Shards are named NNNNNNNN.tar like the reference pool (img2dataset's default is 5 digits).
SHARD_DIGITS = 8


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
    elapsed_s: float = 0.0  # wall time of the download_shards call (0 when only summarised)
    images_per_second: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


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
    return summary


def check_index(index_parquet: str | Path) -> None:
    """Raise ValueError naming the file and the missing column if the index cannot be downloaded."""
    path = Path(index_parquet)
    if not path.is_file():
        raise ValueError(f"pool index {path} does not exist")
    names = set(pq.read_schema(path).names)
    for column in REQUIRED_COLUMNS:
        if column not in names:
            raise ValueError(f"pool index {path} lacks the required column {column!r}")


def _run_img2dataset(**kwargs) -> None:
    import img2dataset  # late: a slow import (opencv, albumentations, wandb)

    if threading.current_thread() is not threading.main_thread():
        # img2dataset installs a SIGINT handler, which Python only allows on the main thread.
        raise RuntimeError("download_shards must run on the main thread (img2dataset sets signal handlers)")
    previous = signal.getsignal(signal.SIGINT)
    try:
        img2dataset.download(**kwargs)
    finally:
        # img2dataset's handler would otherwise outlive the call and sys.exit(0) on Ctrl-C.
        signal.signal(signal.SIGINT, previous)


def download_shards(index_parquet: str | Path, out_dir: str | Path, image_size: int, shard_size: int,
                    processes: int = 2, threads: int = 16, timeout: int = 10,
                    retries: int = 2) -> DownloadSummary:
    """Fetch every URL of the index into out_dir as NNNNNNNN.tar/.parquet/_stats.json shards."""
    check_index(index_parquet)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    already_done = summarize_shards(out_dir).successes  # shards a previous call finished
    start = time.perf_counter()
    _run_img2dataset(
        url_list=str(Path(index_parquet).resolve()),
        output_folder=str(out_dir.resolve()),
        input_format="parquet",
        url_col="url",
        caption_col="text",
        save_additional_columns=["uid"],
        output_format="webdataset",
        image_size=image_size,
        resize_mode="keep_ratio_largest",
        resize_only_if_bigger=True,
        encode_format="jpg",
        number_sample_per_shard=shard_size,
        oom_shard_count=SHARD_DIGITS,
        processes_count=processes,
        thread_count=threads,
        timeout=timeout,
        retries=retries,
        compute_hash="sha256",
        enable_wandb=False,
        distributor="multiprocessing",
        incremental_mode="incremental",
    )
    elapsed = time.perf_counter() - start
    summary = summarize_shards(out_dir)
    summary.elapsed_s = elapsed
    # Throughput of this call only: a resumed run does not get credit for earlier shards.
    summary.images_per_second = (summary.successes - already_done) / elapsed if elapsed > 0 else 0.0
    return summary
