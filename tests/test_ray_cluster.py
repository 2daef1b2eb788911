"""The same graph on a real two-node Ray cluster on 127.0.0.1 (`tests/ray_cluster.py`): the download, the caption
features and a training give what the local engine gives; a node lost mid-download loses and duplicates nothing;
and through Dagster, each step is a Ray job (dagster-ray's executor) whose events reach a PostgreSQL instance."""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster_postgres import PostgresRunStorage

from datacomp_assets.core.engine import Engine, TaskFailed
from datacomp_assets.core.shards import brace_pattern
from datacomp_assets.core.trainer import TrainJob, train
from datacomp_assets.core.caption_features import CaptionFeatureStore, compute_caption_features
from datacomp_assets.filtering.selection import select_uids
from datacomp_assets.pool.download import download_shards, summarize_shards
from datacomp_assets.world.index import write_pool_index
from datacomp_assets.world.published_mirror import write_mirror_from_index
from datacomp_assets.world.web import WebConfig
from datacomp_assets.world.web_server import SyntheticWebServer, free_port
from resources import SyntheticWebResource
from tests.miniature import MINIATURE, REHEARSAL_SCALE
from tests.postgres_server import dagster_pg_env
from tests.ray_cluster import kill_node, local_cluster, node_args
from tests.test_caption_features import reference_files

ROOT = Path(__file__).resolve().parents[1]
WEB = WebConfig(seed=7)  # with the default faults: dead links, timeouts, corrupt images are counted failures
URLS, SHARD_SIZE, IMAGE_SIZE = 300, 100, 64


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(nodes=2, dashboard=True) as started:
        yield started


@pytest.fixture(scope="module")
def web():
    with SyntheticWebServer(WEB) as server:
        yield server


@pytest.fixture(scope="module")
def downloads(cluster, web, tmp_path_factory):
    """The same index downloaded by the local engine and on the cluster."""
    root = tmp_path_factory.mktemp("ray_download")
    index = Path(write_pool_index(WEB, URLS, web.base_url, root / "index", processes=1)["path"])
    on_ray = download_shards(index, root / "ray", IMAGE_SIZE, SHARD_SIZE, processes=1, threads=4,
                             engine=Engine(cluster.address))
    local = download_shards(index, root / "local", IMAGE_SIZE, SHARD_SIZE, processes=1, threads=4)
    return root, on_ray, local


def shard_rows(shards: Path) -> dict[str, list[tuple]]:
    """Per shard: (uid, status, key) of every url, in the shard's order."""
    return {p.name: sorted(zip(*pq.read_table(p, columns=["uid", "status", "key"]).to_pydict().values()))
            for p in sorted(shards.glob("*.parquet"))}


def test_download_on_the_cluster_matches_the_local_engine(downloads):
    root, on_ray, local = downloads
    assert (on_ray.shards, on_ray.count, on_ray.successes) == (local.shards, local.count, local.successes)
    assert on_ray.count == URLS and 0 < on_ray.successes < URLS  # the web's faults are counted, not lost
    assert on_ray.failures_by_kind == local.failures_by_kind
    assert shard_rows(root / "ray") == shard_rows(root / "local")
    assert not (root / "ray" / "_tmp").exists()


def test_a_node_lost_mid_download_loses_and_duplicates_nothing(cluster, web, tmp_path):
    """A third node joins, and is killed (its raylet and workers) once the first shard is written: Ray retries its
    shard elsewhere, which writes the same files again."""
    index = Path(write_pool_index(WEB, 640, web.base_url, tmp_path / "index", processes=1)["path"])
    doomed = cluster.add_node(**node_args())
    cluster.wait_for_nodes()
    out = tmp_path / "shards"
    killed = {}

    def kill_after_first_shard() -> None:
        deadline = time.monotonic() + 120
        while not list(out.glob("*_stats.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed["shards_done"] = len(list(out.glob("*_stats.json")))
        killed["workers"] = kill_node(cluster, doomed)

    killer = threading.Thread(target=kill_after_first_shard)
    killer.start()
    summary = download_shards(index, out, IMAGE_SIZE, 80, processes=1, threads=4, engine=Engine(cluster.address))
    killer.join()
    assert killed["workers"] > 0 and killed["shards_done"] < 8, killed  # killed while shards were in flight
    assert summary.shards == 8 and summary.count == 640
    uids = [uid for p in sorted(out.glob("*.parquet")) for uid in pq.read_table(p, columns=["uid"])["uid"].to_pylist()]
    expected = pq.read_table(index, columns=["uid"])["uid"].to_pylist()
    assert Counter(uids) == Counter(expected) and len(uids) == len(set(uids))  # every url once, in one shard
    successes = sum(1 for p in sorted(out.glob("*.parquet"))
                    for s in pq.read_table(p, columns=["status"])["status"].to_pylist() if s == "success")
    assert successes == summary.successes == summarize_shards(out).successes


def test_caption_features_on_the_cluster_match_the_local_engine(cluster, tmp_path):
    reference_files(tmp_path / "meta")
    compute_caption_features(tmp_path / "meta", tmp_path / "local", processes=1, log=lambda _: None)
    summary = compute_caption_features(tmp_path / "meta", tmp_path / "ray", log=lambda _: None,
                                       engine=Engine(cluster.address))
    assert summary["written"] == 2
    for path in sorted((tmp_path / "local").glob("*.parquet")):
        assert pq.read_table(tmp_path / "ray" / path.name).equals(pq.read_table(path)), path.name
    # on demand: the basic rule's features computed by Ray tasks, the same subset as computed here
    on_ray = CaptionFeatureStore(tmp_path / "store_ray", engine=Engine(cluster.address), log=lambda _: None)
    here = CaptionFeatureStore(tmp_path / "store_local", processes=1, log=lambda _: None)
    kept = select_uids(tmp_path / "meta", "basic", caption_features=on_ray)
    assert len(kept) and np.array_equal(kept, select_uids(tmp_path / "meta", "basic", caption_features=here))
    assert on_ray.parts("fasttext") == 2


def test_a_failed_task_names_the_step_the_file_and_the_node(cluster, tmp_path):
    reference_files(tmp_path / "meta")
    (tmp_path / "meta" / "00000001.parquet").write_bytes(b"not parquet")
    with pytest.raises(TaskFailed, match=r"caption features: task .*00000001\.parquet.* failed on node \w+ "
                                         r"\(127\.0\.0\.1\)"):
        compute_caption_features(tmp_path / "meta", tmp_path / "out", log=lambda _: None,
                                 engine=Engine(cluster.address))


def run_mean_loss(job: TrainJob) -> float:
    """The run's mean contrastive loss, as open_clip's last progress line gives it (less noisy than the last batch)."""
    return float(re.findall(r"Contrastive_loss: [\d.]+ \(([\d.]+)\)", job.log_file.read_text())[-1])


def test_one_training_across_two_nodes_sees_the_same_samples_as_on_one(cluster, downloads, tmp_path):
    """2 nodes x 1 CPU process on gloo (torchrun on each node, c10d rendezvous) against one process here: one world
    of two processes, the same recipe and samples seen, and a mean loss within the local seeds' noise."""
    root, _, _ = downloads
    recipe = replace(MINIATURE, samples_seen=512)
    data = brace_pattern(root / "local", len(list((root / "local").glob("*.tar"))))
    local = [TrainJob(recipe, data, tmp_path, f"local_{seed}", seed=seed, threads=1) for seed in (0, 1, 2)]
    local_results = [train(job, log=lambda *_: None) for job in local]
    job = TrainJob(recipe, data, tmp_path, "cluster", seed=0, nodes=2, nproc=1, threads=1,
                   ray_address=cluster.address)
    assert job.micro_batch * job.world_size == recipe.global_batch
    seen = []
    on_ray = train(job, log=lambda *_: None, progress=lambda samples, note: seen.append(samples))
    assert on_ray.checkpoint == job.final_checkpoint and on_ray.checkpoint.exists()
    assert "total 2" in job.log_file.read_text()  # open_clip's world: one process on each node
    assert on_ray.losses[-1][0] == local_results[0].losses[-1][0] == job.samples_seen  # the same samples seen
    assert seen and seen[-1] == job.samples_seen  # rank 0's progress reached the trainer, to the last line
    # The noise: 0.094, the standard deviation of five local seeds' mean losses at this recipe (2026-11-29).
    means = [run_mean_loss(j) for j in local]
    noise = max(statistics.stdev(means), 0.1)
    assert abs(run_mean_loss(job) - statistics.mean(means)) <= 3 * noise, (run_mean_loss(job), means)
    # Materialized again, the finished run is not started again.
    assert train(job, log=lambda *_: None).resumed_from_epoch == recipe.epochs




def materialize(selection: str, partition: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m",
                           "datacomp_assets.definitions", "--select", selection, "--partition", partition],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_dagster_runs_each_step_as_a_ray_job_recorded_in_postgresql(cluster, postgres_server, tmp_path):
    """`dagster asset materialize` with DATACOMP_RAY_ADDRESS set and nothing else changed: the download, the
    caption features (a published pool's metadata) and a training, each step a Ray job on the cluster, its events
    in the PostgreSQL instance the nodes share."""
    web = SyntheticWebResource(port=free_port())
    index = write_pool_index(web.web_config(), 400, web.base_url, tmp_path / "web_index", processes=1)
    mirror = tmp_path / "mirror"
    write_mirror_from_index(Path(index["path"]), Path(index["ground_truth_path"]), mirror, files=2)
    (tmp_path / "scales.toml").write_text(REHEARSAL_SCALE)
    home = tmp_path / "dagster"
    home.mkdir()
    shutil.copy(ROOT / "instance" / "dagster-postgres.yaml", home / "dagster.yaml")
    env = {**os.environ, **dagster_pg_env(postgres_server), "DATACOMP_SCALES": str(tmp_path / "scales.toml"),
           "DATACOMP_HOME": str(tmp_path / "data"), "DAGSTER_HOME": str(home), "DATACOMP_MIRROR": "",
           "DATACOMP_RAY_ADDRESS": cluster.address, "DATACOMP_RAY_JOBS_ADDRESS": cluster.jobs_address}
    subprocess.run([sys.executable, "-m", "datacomp_assets.instance"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    with web.serve():
        pool = materialize("pool_index,pool_shards,pool_metadata", "rehearsal", env)
        assert pool.returncode == 0, pool.stderr[-6000:]
        trained = materialize("subset,checkpoint", "rehearsal|no_filter", env)
        assert trained.returncode == 0, trained.stderr[-6000:]

    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        with dg.DagsterInstance.get() as instance:
            assert isinstance(instance.run_storage, PostgresRunStorage)
            runs = instance.get_runs()
            assert len(runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
            logs = [e for r in runs for e in instance.all_logs(r.run_id)]
            in_ray_jobs = {e.step_key for e in logs if "in Ray job" in (e.message or "")}
            assert {"pool_index", "pool_shards", "pool_metadata", "subset", "checkpoint"} <= in_ray_jobs
            messages = "\n".join(e.message or "" for e in logs)
            assert f"on the Ray cluster at {cluster.address}" in messages  # the download's engine
            assert "datacomp_assets.core.ray_training" in messages  # the training's launcher

            def metadata(key: str, partition: str) -> dict:
                event = instance.get_latest_materialization_event(dg.AssetKey(key))
                assert event is not None and event.dagster_event.partition == partition, key
                return {k: v.value for k, v in event.asset_materialization.metadata.items()}

            shards = metadata("pool_shards", "rehearsal")
            assert shards["urls"] == 400 and 200 < shards["successes"] < 400
            assert metadata("pool_metadata", "rehearsal")["rows"] == 400
            assert metadata("checkpoint", "rehearsal|no_filter")["samples_seen"] == 256

    # pool_metadata links the published files as they are
    for path in sorted(mirror.glob("*.parquet")):
        assert (tmp_path / "data" / "rehearsal" / "pool_metadata" / path.name).resolve() == path.resolve()


def test_a_cluster_out_of_reach_stops_the_main_command_before_anything_starts(tmp_path):
    env = {**os.environ, "DATACOMP_HOME": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "dagster"),
           "DATACOMP_RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "datacomp_assets.run", "--scale", "tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and time.monotonic() - started < 60
    assert "cannot reach the Ray cluster at" in run.stderr and "DATACOMP_RAY_ADDRESS" in run.stderr, run.stderr
    assert "nothing was started" in run.stderr and not (tmp_path / "data" / "tiny").exists()


def test_a_training_killed_on_the_cluster_resumes_from_its_last_checkpoint(cluster, downloads, tmp_path):
    """The launcher (the trainer's child, Ray's driver) is SIGKILLed once the first of two checkpoints is written:
    its Ray tasks and their torchrun die with it, and training again resumes from that checkpoint."""
    import psutil

    root, _, _ = downloads
    recipe = replace(MINIATURE, samples_seen=1024, epochs=2)
    data = brace_pattern(root / "local", len(list((root / "local").glob("*.tar"))))
    job = TrainJob(recipe, data, tmp_path, "killed", nodes=2, threads=1, ray_address=cluster.address)

    def kill_launcher_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while not (job.checkpoint_dir / "epoch_1.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        # open_clip writes epoch_N.pt in place: wait until it is whole (its size steady for a second). On loaded cores
        # a fixed pause could kill the run mid-write, and the cut checkpoint would be set aside (resume from 0).
        size, steady_since = -1, time.monotonic()
        while time.monotonic() - steady_since < 1.0 and time.monotonic() < deadline:
            now = (job.checkpoint_dir / "epoch_1.pt").stat().st_size
            if now != size:
                size, steady_since = now, time.monotonic()
            time.sleep(0.1)
        for child in psutil.Process().children(recursive=True):
            if "datacomp_assets.core.ray_training" in " ".join(child.cmdline()):
                child.kill()

    killer = threading.Thread(target=kill_launcher_after_first_checkpoint)
    killer.start()
    with pytest.raises(RuntimeError, match="open_clip training of killed failed"):
        train(job, log=lambda *_: None)
    killer.join()
    assert not job.final_checkpoint.exists()
    resumed = train(job, log=lambda *_: None)
    assert resumed.resumed_from_epoch == 1 and job.final_checkpoint.exists()
    assert resumed.losses[-1][0] == job.samples_seen


def test_a_training_that_fails_on_the_cluster_names_the_node(cluster, downloads, tmp_path):
    root, _, _ = downloads
    data = brace_pattern(root / "local", len(list((root / "local").glob("*.tar"))))
    job = TrainJob(replace(MINIATURE, model="no-such-architecture"), data, tmp_path, "broken", nodes=2, threads=1,
                   ray_address=cluster.address)
    with pytest.raises(RuntimeError, match=r"torchrun on node \d of 2 \(node \w+, 127\.0\.0\.1\) exited with code"):
        train(job, log=lambda *_: None)
