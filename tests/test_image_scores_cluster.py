"""image_scores on a real two-node Ray cluster on 127.0.0.1 (`tests/ray_cluster.py`): the pool the published-path
rehearsal downloads (the synthetic web's index, fetched by img2dataset into webdataset shards), scored by the DFN
and by SIEVE as Ray tasks, equals the local engine's scores table for table, byte for byte; and a worker killed
mid-step (SIGKILL, while its task is between shards) is retried by Ray with nothing lost or duplicated."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from datacomp_assets.core.engine import Engine
from datacomp_assets.core.models import load_model
from datacomp_assets.core.scorers import CAPTIONER_MODEL, DFN_MODEL, SCORER_MODELS
from datacomp_assets.filtering.image_scores import ScoringModels, score_on_engine
from datacomp_assets.pool.download import download_shards
from datacomp_assets.world.index import write_pool_index
from datacomp_assets.world.web import WebConfig
from datacomp_assets.world.web_server import SyntheticWebServer
from tests.ray_cluster import local_cluster, node_args

URLS, SHARD_SIZE = 240, 30  # 8 shards: 4 tasks of 2 on the cluster's 2 CPUs
RAY_TASK = "ray::_named_on_node"  # the process title of a Ray worker while it runs one of the engine's tasks


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(nodes=2) as started:
        yield started


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """The rehearsal's pool: the synthetic web's index downloaded by img2dataset (its faults are failed samples,
    absent from the shards), and seeded random weights for the DFN, the L/14 and the captioner."""
    root = tmp_path_factory.mktemp("cluster_scores")
    web = WebConfig(seed=11)
    with SyntheticWebServer(web) as server:
        index = write_pool_index(web, URLS, server.base_url, root / "index", processes=1)["path"]
        download_shards(index, root / "shards", image_size=64, shard_size=SHARD_SIZE, processes=1, threads=8,
                        timeout=2, log=lambda _: None)
    checkpoints = {}
    for name in (DFN_MODEL, SCORER_MODELS["l14"], CAPTIONER_MODEL):
        torch.manual_seed(0)
        checkpoints[name] = root / f"{name}.pt"
        torch.save({"state_dict": load_model(name)[0].state_dict()}, checkpoints[name])
    return root, checkpoints


def models(kind: str, checkpoints: dict) -> ScoringModels:
    if kind == "dfn":
        return ScoringModels("dfn", "dfn_score", DFN_MODEL, str(checkpoints[DFN_MODEL]))
    return ScoringModels("sieve", "sieve_score", SCORER_MODELS["l14"], str(checkpoints[SCORER_MODELS["l14"]]),
                         captioner=CAPTIONER_MODEL, captioner_checkpoint=str(checkpoints[CAPTIONER_MODEL]), seed=3)


def local_scores(root: Path, kind: str, checkpoints: dict) -> dict:
    """The local engine's scores, computed on one intra-op thread as a Ray task of one CPU is (Ray sets its
    OMP_NUM_THREADS): torch's float reductions split by thread count, and 2 threads against 1 move a cosine by an
    ulp (5e-8), so equal bytes are asked of equal arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return score_on_engine(root / "shards", root / f"local_{kind}", models(kind, checkpoints), Engine(),
                               log=lambda _: None)
    finally:
        torch.set_num_threads(threads)


def tables(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.parquet"))}


@pytest.mark.parametrize("kind", ["dfn", "sieve"])
def test_image_scores_on_the_cluster_equal_the_local_engine_table_for_table(cluster, pool, kind):
    root, checkpoints = pool
    local = local_scores(root, kind, checkpoints)
    on_ray = score_on_engine(root / "shards", root / f"ray_{kind}", models(kind, checkpoints),
                             Engine(cluster.address), log=lambda _: None)
    assert on_ray["shards"] == local["shards"] == URLS // SHARD_SIZE
    assert on_ray["images_scored"] == local["images_scored"] > URLS // 2
    assert tables(root / f"ray_{kind}") == tables(root / f"local_{kind}")


def test_a_worker_killed_mid_step_is_retried_with_nothing_lost_or_duplicated(cluster, pool):
    import psutil  # Ray's own copy (ray/thirdparty_files), on the path once ray is imported
    root, checkpoints = pool
    out = root / "killed"
    killed: dict = {}

    def kill_a_busy_worker() -> None:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.01)
        killed["shards_done"] = len(list(out.glob("*.parquet")))
        for process in psutil.process_iter(["pid", "cmdline"]):
            if " ".join(process.info["cmdline"] or []).startswith(RAY_TASK):
                os.kill(process.info["pid"], signal.SIGKILL)
                killed["pid"] = process.info["pid"]
                break

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    summary = score_on_engine(root / "shards", out, models("sieve", checkpoints), Engine(cluster.address),
                              log=lambda _: None)
    killer.join()
    assert "pid" in killed and killed["shards_done"] < URLS // SHARD_SIZE, killed  # killed while tasks ran
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    local_scores(root, "sieve", checkpoints)  # (kept from the comparison test where it ran first)
    uids = [u for p in sorted(out.glob("*.parquet")) for u in pq.read_table(p, columns=["uid"])["uid"].to_pylist()]
    assert len(uids) == len(set(uids)) == summary["images_scored"]  # every image once
    downloaded = [u for p in sorted((root / "shards").glob("*.parquet"))
                  for u, s in zip(*pq.read_table(p, columns=["uid", "status"]).to_pydict().values()) if s == "success"]
    assert Counter(uids) == Counter(downloaded)  # none lost
    assert tables(out) == tables(root / "local_sieve")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left


def test_model_tasks_request_gpus_where_the_cluster_has_them(cluster):
    """A node that declares one GPU (Ray takes the count as given): tasks of half a GPU run two at a time and see
    it as their CUDA_VISIBLE_DEVICES; the CPU-only cluster before it ran every task on one CPU."""
    from datacomp_assets.core.settings import environment_of

    engine = Engine(cluster.address)
    assert engine.gpus_per_node() == 0 and engine.task_slots(0.5) == 2  # two nodes of one CPU
    node = cluster.add_node(**node_args(num_cpus=2, num_gpus=1))
    cluster.wait_for_nodes()
    try:
        assert engine.gpus_per_node() == 1 and engine.task_slots(0.5) == 2 and engine.task_slots(1) == 1
        assert engine.task_groups(list(range(9)), gpus=0.5) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
        seen = list(engine.map_unordered(environment_of, [("CUDA_VISIBLE_DEVICES",)] * 3, gpus=0.5))
        assert seen == [{"CUDA_VISIBLE_DEVICES": "0"}] * 3
    finally:
        cluster.remove_node(node)


def test_evaluation_tasks_on_the_cluster_write_the_local_engines_results(cluster, pool, tmp_path):
    """eval_results' work on the cluster: one Ray task per checkpoint and task group (here two checkpoints x three
    groups), each checkpoint's lines merged in the registry's order, equal to the local engine's bytes."""
    from datacomp_assets.evaluation.on_engine import CheckpointToScore, evaluate_on_engine
    from datacomp_assets.world.eval_suite import TASKS, build_suite

    root, checkpoints = pool
    build_suite(tmp_path / "suite", size_scale=0.04)
    registry = {k: TASKS[k] for k in ("objects", "objects_sketch", "objects_v2", "colors", "digits")}
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": load_model(DFN_MODEL)[0].state_dict()}, other)

    def files(where: str) -> list[CheckpointToScore]:
        return [CheckpointToScore(ckpt, tmp_path / where / f"{i}.jsonl", tmp_path / where / f"{i}.npz",
                                  lambda group, i=i: tmp_path / where / f".{i}_{group.replace(' ', '_')}.jsonl")
                for i, ckpt in enumerate((checkpoints[DFN_MODEL], other))]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a one-CPU Ray task computes (see local_scores)
    try:
        evaluate_on_engine(DFN_MODEL, files("local"), tmp_path / "suite", registry, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    evaluate_on_engine(DFN_MODEL, files("ray"), tmp_path / "suite", registry, engine=Engine(cluster.address),
                       log=lambda _: None)
    for i in range(2):
        assert (tmp_path / "ray" / f"{i}.jsonl").read_bytes() == (tmp_path / "local" / f"{i}.jsonl").read_bytes()
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["0.jsonl", "0.npz", "1.jsonl", "1.npz"]
