"""pool_features as Ray tasks on a real two-node cluster on 127.0.0.1 (`tests/ray_cluster.py`), over a published-layout
mirror (parquet + npz): every method's table equals the local engine's, and a node lost mid-step loses and
duplicates nothing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.engine import Engine
from datacomp_assets.filtering import hyperbolic
from datacomp_assets.filtering.features import METHODS, FeatureSettings, compute_pool_features, method_dirs
from datacomp_assets.world.published_mirror import write_synthetic_mirror
from tests.ray_cluster import kill_node, local_cluster, node_args

ROWS, FILES = 1200, 6
SETTINGS = FeatureSettings(vocabulary={"dog": "dog", "cat": "cat"}, metaclip_entries=["photo", "dog", "red"],
                           metaclip_t=20, clusters=12)


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(nodes=2) as started:
        yield started


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    write_synthetic_mirror(root / "meta", ROWS, FILES, seed=0, progress=None)
    images = np.concatenate([np.load(p)["l14_img"] for p in sorted((root / "meta").glob("*.npz"))])
    texts = np.concatenate([np.load(p)["l14_txt"] for p in sorted((root / "meta").glob("*.npz"))])
    np.save(root / "targets.npy", images[:40].astype(np.float32))
    hyperbolic.save_heads(hyperbolic.train_heads(images[:256], texts[:256], steps=3, batch_size=64, d_out=16),
                          root / "heads.pt")
    local = root / "local"
    compute(root, local, Engine(), processes=1)
    return root, local


def compute(root: Path, out: Path, engine: Engine, processes: int = 1) -> dict:
    return compute_pool_features(root / "meta", out, SETTINGS, root / "targets.npy", root / "targets.npy",
                                 log=lambda _: None, hype_heads=root / "heads.pt", captioned=np.ones(ROWS, bool),
                                 engine=engine, processes=processes)


def tables(out: Path) -> dict:
    return {f"{d.name}/{p.name}": pq.read_table(p) for d in method_dirs(out) for p in sorted(d.glob("*.parquet"))}


def assert_same_tables(out: Path, local: Path) -> None:
    here, there = tables(local), tables(out)
    assert len(here) == FILES * len(METHODS) and there.keys() == here.keys()
    for name, table in here.items():
        assert there[name].equals(table), name
        assert table.num_rows == len(set(table["uid"].to_pylist()))


def test_pool_features_on_the_cluster_match_the_local_engine(cluster, mirror, tmp_path):
    root, local = mirror
    summary = compute(root, tmp_path / "ray", Engine(cluster.address))
    assert summary["methods_computed"] == ", ".join(METHODS)
    assert_same_tables(tmp_path / "ray", local)


def test_a_node_lost_mid_step_loses_and_duplicates_nothing(cluster, mirror, tmp_path):
    """A third node joins and is killed (its raylet and workers) once the first method's first table is written:
    Ray retries its tasks elsewhere, which write the same files again."""
    root, local = mirror
    doomed = cluster.add_node(**node_args())
    cluster.wait_for_nodes()
    out, killed = tmp_path / "ray", {}

    def kill_after_first_table() -> None:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.02)
        killed["workers"] = kill_node(cluster, doomed)
        killed["methods_done"] = len(list(out.glob("*/_manifest.json")))

    killer = threading.Thread(target=kill_after_first_table)
    killer.start()
    compute(root, out, Engine(cluster.address))
    killer.join()
    assert killed["workers"] > 0 and killed["methods_done"] < len(METHODS), killed  # killed while it ran
    assert_same_tables(out, local)
    assert not list(out.glob("**/.*.tmp")) and not (out / ".scratch").exists()
