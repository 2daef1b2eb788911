"""The Ray engine's overhead: download and caption-feature throughput on the local engine against a two-node Ray
cluster on this machine, the same work with the same cores.

    .venv/bin/python benchmarks/cluster.py [--urls 2400] [--shard-size 300] [--captions 400000] [--files 8]

Both engines get every core of the machine: the local one `os.cpu_count()` processes, the cluster as many nodes
of one CPU each (`ray.cluster_utils.Cluster` on 127.0.0.1, as the tests start it). Each measurement runs twice, the
engines alternating, and the faster of the two counts (the first of each pays for imports and worker start-up;
both are printed). The download fetches from the loopback synthetic web without faults; the caption features are
fastText, CLD3 and the counts over `--files` reference-schema files. On one machine the cluster can only add
overhead: the figure is `overhead` (cluster seconds / local seconds - 1), whose target is <= 0.15. Ends by printing
one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):  # tests.ray_cluster and filters.py, when run as a script
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: tests/ray_cluster.py

from datacomp_assets.core.engine import Engine  # noqa: E402
from datacomp_assets.core.caption_features import compute_caption_features  # noqa: E402
from datacomp_assets.pool.download import download_shards  # noqa: E402
from datacomp_assets.world.index import write_pool_index  # noqa: E402
from datacomp_assets.world.web import WebConfig  # noqa: E402
from datacomp_assets.world.web_server import SyntheticWebServer  # noqa: E402
from filters import ensure_metadata  # noqa: E402
from tests.ray_cluster import local_cluster  # noqa: E402

WEB = WebConfig(seed=11, faults={})


def log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


def best_of(runs: list[float]) -> dict:
    return {"seconds": round(min(runs), 2), "runs_seconds": [round(r, 2) for r in runs]}


def measure(work, engines: dict[str, Engine], repeats: int) -> dict[str, list[float]]:
    """Seconds of `work(engine, attempt)` per engine, the engines alternating."""
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for attempt in range(repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            work(engine, attempt)
            seconds[name].append(time.perf_counter() - start)
            log(f"{work.__name__} on {name}, run {attempt + 1}: {seconds[name][-1]:.1f} s")
    return seconds


@contextlib.contextmanager
def stdout_to_stderr():
    """img2dataset and its worker processes print to file descriptor 1; stdout is for the JSON alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=2400)
    parser.add_argument("--shard-size", type=int, default=300)
    parser.add_argument("--captions", type=int, default=400_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cluster-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        with stdout_to_stderr():
            ensure_metadata(work / "metadata", args.captions, args.files, processes=cores)
        start = time.perf_counter()
        with stdout_to_stderr(), local_cluster(nodes=cores) as cluster, SyntheticWebServer(WEB) as web:
            cluster_start = time.perf_counter() - start
            engines = {"local": Engine(), "ray": Engine(cluster.address)}
            engines["ray"].connect()
            index = write_pool_index(WEB, args.urls, web.base_url, work / "index", processes=cores)["path"]

            def download(engine: Engine, attempt: int) -> None:
                out = work / f"shards-{'ray' if engine.on_ray else 'local'}-{attempt}"
                summary = download_shards(index, out, 64, args.shard_size, processes=cores, threads=16,
                                          engine=engine)
                assert summary.count == args.urls, summary

            def caption_features(engine: Engine, attempt: int) -> None:
                out = work / f"features-{'ray' if engine.on_ray else 'local'}-{attempt}"
                summary = compute_caption_features(work / "metadata", out, processes=cores, log=lambda _: None,
                                                   engine=engine)
                assert summary["rows"] == args.captions, summary

            downloads = measure(download, engines, args.repeats)
            features = measure(caption_features, engines, args.repeats)
        result = {"cores": cores, "cluster": f"{cores} nodes x 1 CPU on 127.0.0.1",
                  "cluster_start_seconds": round(cluster_start, 2), "target_overhead": 0.15}
        for name, seconds, count, unit in (("download", downloads, args.urls, "urls"),
                                           ("caption_features", features, args.captions, "captions")):
            local, ray = best_of(seconds["local"]), best_of(seconds["ray"])
            result[name] = {
                unit: count, "local": {**local, f"{unit}_per_second": round(count / local["seconds"], 1)},
                "ray": {**ray, f"{unit}_per_second": round(count / ray["seconds"], 1)},
                "overhead": round(ray["seconds"] / local["seconds"] - 1, 3)}
        print(json.dumps(result, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
