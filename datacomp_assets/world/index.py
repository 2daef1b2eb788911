"""The pool's URL index: what Common Crawl extraction yields in the real benchmark (uid, url, alt-text),
plus the sha256 of each image as crawled, which the download verifies (CommonPool ships it too).

Ground truth (object, colour, noise kind, fault...) is written to a separate file so that no filter can
read it by accident; only tests and audits open it.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa

from datacomp_assets.core.files import write_parquet_atomically
from datacomp_assets.core.layout import GROUND_TRUTH_FILE, INDEX_FILE
from datacomp_assets.core.processes import spawn_pool
from datacomp_assets.world.web import WebConfig, crawled_sha256, ground_truth, sample
from datacomp_assets.world.web_server import image_url

# Explicit types: columns that are null for most samples must not depend on which rows a pool has.
TRUTH_SCHEMA = pa.schema([
    ("uid", pa.string()), ("index", pa.int64()), ("text", pa.string()), ("width", pa.int64()),
    ("height", pa.int64()), ("object", pa.string()), ("color", pa.string()), ("count", pa.int64()),
    ("style", pa.string()), ("kind", pa.string()), ("language", pa.string()), ("jpeg_quality", pa.int64()),
    ("shift_x", pa.int64()), ("shift_y", pa.int64()), ("duplicate_of", pa.int64()), ("eval_task", pa.string()),
    ("eval_index", pa.int64()), ("fault", pa.string()), ("text_in_image", pa.string()),
])


def refused_base_url(base_url: str, config: WebConfig) -> str:
    """The server's URL with the port swapped for one where nothing listens."""
    return f"{urlsplit(base_url).scheme}://{urlsplit(base_url).hostname}:{config.refused_port}"


def build_index_rows(config: WebConfig, n: int, base_url: str,
                     namespace: str = "pool") -> tuple[pa.Table, pa.Table]:
    """(index table: uid, url, text; ground-truth table: uid + truth fields), one row per sample.

    Only ``sample()`` runs here (no rendering), so 20,000 rows take a few seconds.
    """
    samples = [sample(i, config, namespace) for i in range(n)]
    refused = refused_base_url(base_url, config)
    index = pa.table({
        "uid": pa.array([s.uid for s in samples], pa.string()),
        "url": pa.array([image_url(refused if s.fault == "refused" else base_url, s.index, namespace)
                         for s in samples], pa.string()),
        "text": pa.array([s.text for s in samples], pa.string()),
    })
    truths = [ground_truth(s) for s in samples]
    # uid first: it is the join key with the index and every later table.
    truth = pa.table({f.name: [t[f.name] for t in truths] for f in TRUTH_SCHEMA}, schema=TRUTH_SCHEMA)
    return index, truth


def _sha256_of(index: int, config: WebConfig, namespace: str) -> str:
    return crawled_sha256(sample(index, config, namespace))


def crawl_sha256s(config: WebConfig, n: int, namespace: str = "pool", processes: int = 2) -> list[str]:
    """The sha256 of every sample's crawled bytes, in index order (renders every image: ~3 ms each)."""
    work = partial(_sha256_of, config=config, namespace=namespace)
    if processes <= 1 or n < 1000:  # a pool's start-up costs more than it saves on small pools
        return [work(i) for i in range(n)]
    with spawn_pool(processes, "hashing the pool's images") as pool:
        return pool.map(work, range(n), chunksize=250)



def write_pool_index(config: WebConfig, n: int, base_url: str, out_dir: str | Path,
                     namespace: str = "pool", processes: int = 2) -> dict:
    """Write out_dir/index.parquet (uid, url, text, sha256) and out_dir/ground_truth.parquet."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index, truth = build_index_rows(config, n, base_url, namespace)
    start = time.perf_counter()
    index = index.append_column("sha256", pa.array(crawl_sha256s(config, n, namespace, processes), pa.string()))
    sha256_seconds = time.perf_counter() - start
    index_path, truth_path = out_dir / INDEX_FILE, out_dir / GROUND_TRUTH_FILE
    write_parquet_atomically(truth, truth_path)
    write_parquet_atomically(index, index_path)
    kinds = Counter(truth.column("kind").to_pylist())
    faults = Counter(f for f in truth.column("fault").to_pylist() if f is not None)
    return {
        "rows": index.num_rows,
        "path": str(index_path),
        "ground_truth_path": str(truth_path),
        "kind_counts": dict(sorted(kinds.items())),
        "fault_counts": dict(sorted(faults.items())),
        "sha256_seconds": round(sha256_seconds, 1),
    }
