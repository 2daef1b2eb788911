"""Materializing pool_shards again retries only the samples that failed for a reason that may pass, and merges
them into their shards in img2dataset's format.

Against the synthetic web's faults: on the first materialization `unavailable` hosts answer 503 and `stalled` ones
time out; on the second those hosts are back (the same web without the transient faults: every other sample keeps
its fault). `refused` connections stay refused (retryable, still failed); dead links (404) and corrupt bytes are
permanent and never asked again."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.layout import Layout
from datacomp_assets.core.scales import SCALES
from datacomp_assets.pool import retry
from datacomp_assets.pool.assets import pool_index, pool_shards, pool_shards_match_injected_faults
from datacomp_assets.pool.download import damaged_shards, download_shards, failure_kind, summarize_shards
from datacomp_assets.world import web_server
from datacomp_assets.world.web_server import SyntheticWebServer, free_port
from resources import (
    DownloaderResource, EngineResource, PoolSourceResource, PublishedMetadataResource, StorageResource,
    SyntheticWebResource)
from tests.miniature import MINIATURE

PERMANENT = {"dead_link": 0.05, "corrupt": 0.05, "refused": 0.05}
TRANSIENT = {"unavailable": 0.12, "stalled": 0.06}  # after the permanent ones: dropping them moves no other fault
N_SAMPLES, SHARD_SIZE = 60, 20
SHARDS = ("00000000", "00000001", "00000002")


def web(port: int, faults: dict) -> SyntheticWebResource:
    return SyntheticWebResource(seed=5, port=port, faults=faults, slow_seconds=2.0)


def resources(root: Path, web_resource: SyntheticWebResource) -> dict:
    return {"storage": StorageResource(root=str(root)),
            # no inline retries: a transient host's first answer is the download's only one
            "downloader": DownloaderResource(processes=1, threads=8, timeout=1, retries=0),
            "engine": EngineResource(),
            "pool_source": PoolSourceResource(synthetic_web=web_resource, published=PublishedMetadataResource())}


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """A first materialization from the web with transient faults (kept as `first/`), and, for comparison, the
    same index downloaded from the web whose hosts are all back (`healthy/`: what a first download then gives)."""
    root = tmp_path_factory.mktemp("retry")
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(SCALES, "tiny", replace(MINIATURE, pool_size=N_SAMPLES, shard_size=SHARD_SIZE))
        layout = Layout(root / "data")
        first = resources(layout.root, web(port, {**PERMANENT, **TRANSIENT}))
        assert dg.materialize([pool_index, pool_shards], partition_key="tiny", resources=first).success
        shutil.copytree(layout.pool_shards("tiny"), root / "first")
        with SyntheticWebServer(web(port, PERMANENT).web_config(), port=port):
            download_shards(layout.pool_index_file("tiny"), root / "healthy", MINIATURE.image_size, SHARD_SIZE,
                            processes=1, threads=8, timeout=1, retries=0)
        yield root, layout, port


def tar_members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def shard_rows(folder: Path, name: str) -> list[dict]:
    return pq.read_table(folder / f"{name}.parquet").to_pylist()


def test_a_second_materialization_recovers_the_transient_failures_and_keeps_everything_else(downloaded, monkeypatch):
    root, layout, port = downloaded  # (the fixture's miniature scale stays in place while its tests run)
    faults = dict(enumerate(pq.read_table(layout.ground_truth_file("tiny")).column("fault").to_pylist()))
    injected = Counter(f for f in faults.values() if f)
    assert all(injected[f] for f in {**PERMANENT, **TRANSIENT})
    shards, first, healthy = layout.pool_shards("tiny"), root / "first", root / "healthy"
    assert summarize_shards(shards).failures_by_kind == {
        "dead_link": injected["dead_link"], "refused": injected["refused"], "timeout": injected["stalled"],
        "server_error": injected["unavailable"], "decode": injected["corrupt"]}
    servers = []

    class RecordedServer(SyntheticWebServer):  # the one the second materialization starts, to count its requests
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            servers.append(self)

    monkeypatch.setattr(web_server, "SyntheticWebServer", RecordedServer)
    again = dg.materialize([pool_shards, pool_shards_match_injected_faults], partition_key="tiny",
                           resources=resources(layout.root, web(port, PERMANENT)))
    assert again.success and all(e.passed for e in again.get_asset_check_evaluations())

    transient = injected["unavailable"] + injected["stalled"]
    metadata = again.asset_materializations_for_node("pool_shards")[0].metadata
    assert metadata["retried"].value == transient + injected["refused"]  # 404s and bad bytes are not asked again
    assert metadata["recovered"].value == transient
    assert metadata["still_failed"].value == injected["refused"]
    assert metadata["retried_by_kind"].value == (
        "| failure | samples |\n|---|---|\n"
        f"| refused | {injected['refused']} |\n| server_error | {injected['unavailable']} |\n"
        f"| timeout | {injected['stalled']} |")
    assert metadata["still_failed_by_kind"].value.endswith(f"| refused | {injected['refused']} |")
    assert metadata["successes"].value == N_SAMPLES - sum(injected[f] for f in PERMANENT)
    # Only the transient samples reached the web again, once each (refused connections never reach it).
    [server] = servers
    assert server.requests == Counter({("pool", i): 1 for i, f in faults.items() if f in TRANSIENT})

    # The merged shards are what a first download from the web with its hosts back gives, in its format.
    for name in SHARDS:
        rows = shard_rows(shards, name)
        assert [r["key"] for r in rows] == [r["key"] for r in shard_rows(first, name)]  # rows kept in their order
        assert sorted(rows, key=lambda r: r["key"]) == sorted(shard_rows(healthy, name), key=lambda r: r["key"])
        members, kept = tar_members(shards / f"{name}.tar"), tar_members(first / f"{name}.tar")
        assert sorted(members) == sorted(tar_members(healthy / f"{name}.tar"))
        # every sample the first download got is there byte for byte, in its place; the tar follows the rows
        assert [m for m in members if m in kept] == kept
        success_keys = [r["key"] for r in rows if r["status"] == "success"]
        assert list(dict.fromkeys(n.partition(".")[0] for n, _ in members)) == success_keys
        assert all(json.loads(data)["key"] == n.partition(".")[0] for n, data in members if n.endswith(".json"))
        stats = json.loads((shards / f"{name}_stats.json").read_text())
        expected = json.loads((healthy / f"{name}_stats.json").read_text())
        assert list(stats) == list(expected)
        for field in ("count", "successes", "failed_to_download", "failed_to_resize"):
            assert stats[field] == expected[field], (name, field)
        assert Counter(stats["status_dict"]) == Counter(expected["status_dict"])
    assert not damaged_shards(shards) and not (shards / retry.RETRY_DIR).exists()

    # The refused ones are left to retry; a retry that brings nothing back leaves every file as it was.
    files = {p.name: p.read_bytes() for p in shards.iterdir()}
    nothing_back = retry.retry_failed(layout.pool_index_file("tiny"), shards, retry.finished_shards(shards),
                                      SHARD_SIZE, 8, fetch=lambda url_list, folder, n: None, kind_of=failure_kind)
    assert nothing_back.retried == injected["refused"] and nothing_back.recovered == 0
    assert nothing_back.shards_merged == 0 and nothing_back.still_failed_by_kind == {"not_retried": injected["refused"]}
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == files


def test_a_merge_cut_off_while_renaming_is_completed_before_anything_reads_the_shards(downloaded, tmp_path):
    """What `retry.commit` leaves when killed after its first rename: shard 0's merged tar in place, its parquet
    and stats still waiting beside the ready mark; shard 1's merge half-written (not ready)."""
    root, layout, _ = downloaded
    shards, healthy = tmp_path / "shards", root / "healthy"
    shutil.copytree(root / "first", shards)
    commit_dir = shards / retry.RETRY_DIR / "commit"
    commit_dir.mkdir(parents=True)
    shutil.copyfile(healthy / "00000000.tar", shards / "00000000.tar")
    for name in ("00000000.parquet", "00000000_stats.json", "00000001.tar"):
        shutil.copyfile(healthy / name, commit_dir / name)
    (commit_dir / "00000000.ready").touch()

    download_shards(layout.pool_index_file("tiny"), shards, MINIATURE.image_size, SHARD_SIZE,
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
