"""A second download retries only the samples that failed for a reason that may pass, and merges them in place.

Against the synthetic web's transient faults: `unavailable` hosts answer 503 and `stalled` ones time out on their
first request only; `refused` connections stay refused; dead links (404) and corrupt bytes are permanent."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datacomp_assets.pool import retry
from datacomp_assets.pool.download import (
    check_against_ground_truth, damaged_shards, download_shards, failure_kind, summarize_shards)
from datacomp_assets.world.index import write_pool_index
from datacomp_assets.world.web import WebConfig
from datacomp_assets.world.web_server import SyntheticWebServer, free_port

FAULTS = {"unavailable": 0.12, "stalled": 0.06, "refused": 0.05, "dead_link": 0.05, "corrupt": 0.05}
CONFIG = WebConfig(seed=5, faults=FAULTS, slow_seconds=2.0)
N_SAMPLES, SHARD_SIZE, IMAGE_SIZE = 60, 20, 64
OPTIONS = dict(processes=1, threads=8, timeout=1, retries=0)  # no inline retries: the first request is the only one


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """(root, faulty server): the index, a first download from the faulty web (`first/`), and the same download
    from a web whose hosts have no bad moment (`healthy/`: what a first download gives when nothing is transient)."""
    root = tmp_path_factory.mktemp("retry")
    port = free_port()
    write_pool_index(CONFIG, N_SAMPLES, f"http://127.0.0.1:{port}", root / "index")
    with SyntheticWebServer(replace(CONFIG, transient_failures=0), port=port):
        download_shards(root / "index" / "index.parquet", root / "healthy", IMAGE_SIZE, SHARD_SIZE, **OPTIONS)
    server = SyntheticWebServer(CONFIG, port=port).start()
    try:
        download_shards(root / "index" / "index.parquet", root / "first", IMAGE_SIZE, SHARD_SIZE, **OPTIONS)
        yield root, server
    finally:
        server.stop()


def faults_by_index(root: Path) -> dict[int, str | None]:
    return dict(enumerate(pq.read_table(root / "index" / "ground_truth.parquet").column("fault").to_pylist()))


def tar_members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def shard_rows(folder: Path, name: str) -> list[dict]:
    return pq.read_table(folder / f"{name}.parquet").to_pylist()


def test_a_second_download_recovers_the_transient_failures_and_keeps_everything_else(web, tmp_path):
    root, server = web
    faults = faults_by_index(root)
    injected = Counter(f for f in faults.values() if f)
    assert all(injected[f] for f in FAULTS)
    shards = tmp_path / "shards"
    shutil.copytree(root / "first", shards)
    first = summarize_shards(shards)
    assert first.failures_by_kind == {"server_error": injected["unavailable"], "refused": injected["refused"],
                                      "timeout": injected["stalled"], "dead_link": injected["dead_link"],
                                      "decode": injected["corrupt"]}
    kept = {name: tar_members(shards / f"{name}.tar") for name in ("00000000", "00000001", "00000002")}
    before = server.requests

    second = download_shards(root / "index" / "index.parquet", shards, IMAGE_SIZE, SHARD_SIZE, **OPTIONS)

    asked = server.requests - before
    report = second.retry
    transient = injected["unavailable"] + injected["stalled"]
    assert report.retried == transient + injected["refused"]  # 404s and undecodable bytes are not asked again
    assert report.retried_by_kind == {"server_error": injected["unavailable"], "timeout": injected["stalled"],
                                      "refused": injected["refused"]}
    assert report.recovered == transient
    assert report.still_failed_by_kind == {"refused": injected["refused"]}
    assert report.line().startswith(f"retried {report.retried} failed downloads")
    # Only the transient samples reached the server again (refused ones never reach it), once each.
    assert asked == Counter({("pool", i): 1 for i, f in faults.items() if f in ("unavailable", "stalled")})
    assert second.successes == first.successes + transient and second.count == N_SAMPLES
    assert second.failures_by_kind == {"dead_link": injected["dead_link"], "refused": injected["refused"],
                                       "decode": injected["corrupt"]}

    # The merged shards are what a first download from a web without transient faults gives, in its format.
    healthy = root / "healthy"
    for name in kept:
        rows, expected_rows = shard_rows(shards, name), shard_rows(healthy, name)
        assert [r["key"] for r in rows] == [r["key"] for r in shard_rows(root / "first", name)]  # rows kept in order
        assert sorted(rows, key=lambda r: r["key"]) == sorted(expected_rows, key=lambda r: r["key"])
        members = tar_members(shards / f"{name}.tar")
        assert sorted(members) == sorted(tar_members(healthy / f"{name}.tar"))
        # every sample first downloaded is still there, byte for byte, in its place; the tar follows the rows' order
        assert [m for m in members if m in kept[name]] == kept[name]
        success_keys = [r["key"] for r in rows if r["status"] == "success"]
        assert list(dict.fromkeys(n.partition(".")[0] for n, _ in members)) == success_keys
        for member_name, data in members:
            if member_name.endswith(".json"):
                assert json.loads(data)["key"] == member_name.partition(".")[0]
        stats = json.loads((shards / f"{name}_stats.json").read_text())
        expected = json.loads((healthy / f"{name}_stats.json").read_text())
        for field in ("count", "successes", "failed_to_download", "failed_to_resize"):
            assert stats[field] == expected[field], (name, field)
        assert Counter(stats["status_dict"]) == Counter(expected["status_dict"])
    assert not damaged_shards(shards) and not (shards / retry.RETRY_DIR).exists()
    audit = check_against_ground_truth(shards, root / "index" / "ground_truth.parquet")
    assert audit["no_fault"]["failed"] == 0
    assert all(audit[f]["observed"] == audit[f]["injected"] for f in FAULTS), audit

    # Only the refused ones are left to retry; a retry that brings nothing back leaves every file as it was.
    files = {p.name: p.read_bytes() for p in shards.iterdir()}
    third = retry.retry_failed(root / "index" / "index.parquet", shards, retry.finished_shards(shards), SHARD_SIZE,
                               8, fetch=lambda url_list, folder, n: None, kind_of=failure_kind)
    assert third.retried == injected["refused"] and third.recovered == 0 and third.shards_merged == 0
    assert third.still_failed_by_kind == {"not_retried": injected["refused"]}
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == files


def test_a_merge_cut_off_while_renaming_is_completed_before_anything_reads_the_shards(web, tmp_path):
    """What `retry.commit` leaves when killed after its first rename: shard 0's merged tar in place, its parquet
    and stats still waiting beside the ready mark; shard 1's merge half-written (not ready)."""
    root, _ = web
    shards, healthy = tmp_path / "shards", root / "healthy"
    shutil.copytree(root / "first", shards)
    commit_dir = shards / retry.RETRY_DIR / "commit"
    commit_dir.mkdir(parents=True)
    shutil.copyfile(healthy / "00000000.tar", shards / "00000000.tar")
    for name in ("00000000.parquet", "00000000_stats.json", "00000001.tar"):
        shutil.copyfile(healthy / name, commit_dir / name)
    (commit_dir / "00000000.ready").touch()

    download_shards(root / "index" / "index.parquet", shards, IMAGE_SIZE, SHARD_SIZE, **OPTIONS,
                    retry_failed_samples=False)
    assert not (shards / retry.RETRY_DIR).exists() and not damaged_shards(shards)
    for name in ("00000000.tar", "00000000.parquet", "00000000_stats.json"):
        assert (shards / name).read_bytes() == (healthy / name).read_bytes(), name
    for name in ("00000001.tar", "00000001.parquet", "00000001_stats.json"):
        assert (shards / name).read_bytes() == (root / "first" / name).read_bytes(), name


@pytest.mark.parametrize("message, retryable, kind", [
    ("HTTP Error 503: Service Unavailable", True, "server_error"),
    ("HTTP Error 429: Too Many Requests", True, "other"),
    ("timed out", True, "timeout"),
    ("<urlopen error [Errno 111] Connection refused>", True, "refused"),
    ("Remote end closed connection without response", True, "other"),
    ("HTTP Error 404: Not Found", False, "dead_link"),
    ("HTTP Error 403: Forbidden", False, "other"),
    ("hash mismatch", False, "hash_mismatch"),
    ("<urlopen error [Errno -2] Name or service not known>", False, "other"),
])
def test_which_failures_are_retried(message, retryable, kind):
    assert retry.is_retryable(message) is retryable
    assert failure_kind(message) == kind
