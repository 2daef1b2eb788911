"""A download killed mid-way resumes to exactly the shards of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from datacomp_assets.pool.download import download_shards, list_tars
from datacomp_assets.world.index import write_pool_index
from datacomp_assets.world.web import WebConfig
from datacomp_assets.world.web_server import SyntheticWebServer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = WebConfig(seed=11, faults={})  # no faults: every sample lands in a tar
N_SAMPLES, SHARD_SIZE, IMAGE_SIZE = 600, 100, 64
N_SHARDS = N_SAMPLES // SHARD_SIZE

# One process and two threads make a shard take about a second, so the kill lands between shards.
CHILD = """
import sys
from datacomp_assets.pool.download import download_shards
if __name__ == "__main__":
    download_shards(sys.argv[1], sys.argv[2], {image_size}, {shard_size}, processes=1, threads=2)
""".format(image_size=IMAGE_SIZE, shard_size=SHARD_SIZE)


def tar_uids(out_dir: Path) -> list[str]:
    """Every uid in the folder's tars (reading each tar to its end proves it is complete)."""
    uids = []
    for tar_path in list_tars(out_dir):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    uids.append(json.loads(tar.extractfile(member).read())["uid"])
    return uids


def stats_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("*_stats.json"))


def test_killed_download_resumes_without_duplicates_or_redownloads(tmp_path):
    with SyntheticWebServer(CONFIG) as server:
        write_pool_index(CONFIG, N_SAMPLES, server.base_url, tmp_path / "index")
        index = tmp_path / "index" / "index.parquet"

        reference = tmp_path / "reference"
        download_shards(index, reference, IMAGE_SIZE, SHARD_SIZE, processes=1, threads=2)

        # Start the same download in a process group of its own and SIGKILL all of it mid-way.
        interrupted = tmp_path / "interrupted"
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child = subprocess.Popen([sys.executable, str(script), str(index), str(interrupted)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not (interrupted.exists() and stats_files(interrupted)):
                assert child.poll() is None, "the download finished or died before the kill"
                assert time.monotonic() < deadline, "no shard finished within 60 s"
                time.sleep(0.02)
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        finished = stats_files(interrupted)
        assert 1 <= len(finished) < N_SHARDS
        done_tars = [interrupted / f"{p.name.split('_')[0]}.tar" for p in finished]
        mtimes = {t: t.stat().st_mtime_ns for t in done_tars}

        download_shards(index, interrupted, IMAGE_SIZE, SHARD_SIZE, processes=1, threads=2)

    assert len(stats_files(interrupted)) == N_SHARDS
    assert not (interrupted / "_tmp").exists()
    resumed, expected = tar_uids(interrupted), tar_uids(reference)
    assert len(resumed) == len(set(resumed)) == N_SAMPLES
    assert sorted(resumed) == sorted(expected)
    assert {t: t.stat().st_mtime_ns for t in done_tars} == mtimes  # finished shards were kept


def _mount_tmpfs(path: Path, size_kb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_download_that_fills_the_disk_fails_naming_the_folder_and_its_rerun_completes(tmp_path):
    import pytest

    from datacomp_assets.pool.download import IncompleteDownload

    disk = tmp_path / "small_disk"
    if not _mount_tmpfs(disk, 400):  # about two of the six shards fit
        pytest.skip("needs root to mount a small tmpfs as a full disk")
    try:
        with SyntheticWebServer(CONFIG) as server:
            write_pool_index(CONFIG, N_SAMPLES, server.base_url, tmp_path / "index")
            index = tmp_path / "index" / "index.parquet"
            out = disk / "shards"
            with pytest.raises(IncompleteDownload) as err:
                download_shards(index, out, IMAGE_SIZE, SHARD_SIZE, processes=1, threads=2)
            message = str(err.value)
            assert str(out) in message and "MB free" in message and "materialize again" in message
            kept = stats_files(out)
            assert len(kept) < N_SHARDS
            # Every shard that looks finished is whole: a full disk leaves no half-written shard behind.
            assert all((out / f"{p.name.split('_')[0]}.tar").exists() for p in kept)
            assert not [p for p in out.glob("*.tar") if not (out / f"{p.stem}_stats.json").exists()]

            subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
            download_shards(index, out, IMAGE_SIZE, SHARD_SIZE, processes=1, threads=2)
        uids = tar_uids(out)
        assert len(stats_files(out)) == N_SHARDS and len(uids) == len(set(uids)) == N_SAMPLES
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
