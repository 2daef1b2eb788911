"""The pool's URL index: what Common Crawl extraction yields in the real benchmark (uid, url, alt-text),
plus the sha256 of each image as crawled, which the download verifies (CommonPool ships it too).

Ground truth (object, colour, noise kind, fault...) is written to a separate file so that no filter can
read it by accident; only tests and audits open it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from collections import Counter
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa

from datacomp_assets.core.files import replace_atomically, write_parquet_atomically
from datacomp_assets.core.layout import GROUND_TRUTH_FILE, INDEX_FILE
from datacomp_assets.world.web import WebConfig, crawled_sha256, ground_truth, sample, served_bytes
from datacomp_assets.world.web_server import image_url

WEB_PAGES_FILE = "web_pages.arrow"  # beside the index: each sample's body as the web serves it
# Explicit types: columns that are null for most samples must not depend on which rows a pool has.
TRUTH_SCHEMA = pa.schema([
    ("uid", pa.string()), ("index", pa.int64()), ("text", pa.string()), ("width", pa.int64()),
    ("height", pa.int64()), ("object", pa.string()), ("color", pa.string()), ("count", pa.int64()),
    ("style", pa.string()), ("kind", pa.string()), ("language", pa.string()), ("jpeg_quality", pa.int64()),
    ("shift_x", pa.int64()), ("shift_y", pa.int64()), ("duplicate_of", pa.int64()), ("eval_task", pa.string()),
    ("eval_index", pa.int64()), ("fault", pa.string()),
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


def _crawl_one(index: int, config: WebConfig, namespace: str) -> tuple[str, bytes]:
    s = sample(index, config, namespace)
    body = served_bytes(s)
    # Rendered once: only a poisoned host's bytes differ from what was crawled (web.crawled_sha256).
    return (crawled_sha256(s) if s.fault == "poisoned" else hashlib.sha256(body).hexdigest()), body


def crawl(config: WebConfig, n: int, namespace: str = "pool", processes: int = 2) -> list[tuple[str, bytes]]:
    """(sha256 of the crawled bytes, the body the host serves) of every sample, in index order (renders every
    image: ~3 ms each)."""
    work = partial(_crawl_one, config=config, namespace=namespace)
    if processes <= 1 or n < 1000:  # a pool's start-up costs more than it saves on small pools
        return [work(i) for i in range(n)]
    # spawn, not fork: the caller may be a threaded Dagster process.
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return pool.map(work, range(n), chunksize=250)


def crawl_sha256s(config: WebConfig, n: int, namespace: str = "pool", processes: int = 2) -> list[str]:
    """The sha256 of every sample's crawled bytes, in index order."""
    return [sha256 for sha256, _ in crawl(config, n, namespace, processes)]


class WebPages:
    """The bodies of a WEB_PAGES_FILE, by (namespace, index), read from the memory-mapped file as asked for (a
    large pool's pages need not fit in memory). Empty if they were crawled from a web configured otherwise."""

    def __init__(self, path: Path, config: WebConfig, namespace: str = "pool"):
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        matches = (table.schema.metadata or {}).get(b"web_config") == _config_key(config)
        self.namespace, self.bodies = namespace, table["body"] if matches else None

    def get(self, key: tuple[str, int]) -> bytes | None:
        namespace, index = key
        if self.bodies is None or namespace != self.namespace or not 0 <= index < len(self.bodies):
            return None
        return self.bodies[index].as_py()


def _write_arrow(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _config_key(config: WebConfig) -> bytes:
    return json.dumps(config.__dict__, sort_keys=True, default=str).encode()



def write_pool_index(config: WebConfig, n: int, base_url: str, out_dir: str | Path,
                     namespace: str = "pool", processes: int = 2) -> dict:
    """Write out_dir/index.parquet (uid, url, text, sha256) and out_dir/ground_truth.parquet."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index, truth = build_index_rows(config, n, base_url, namespace)
    start = time.perf_counter()
    crawled = crawl(config, n, namespace, processes)
    index = index.append_column("sha256", pa.array([sha256 for sha256, _ in crawled], pa.string()))
    sha256_seconds = time.perf_counter() - start
    index_path, truth_path = out_dir / INDEX_FILE, out_dir / GROUND_TRUTH_FILE
    write_parquet_atomically(truth, truth_path)
    # The bodies were rendered for their hashes; kept, they spare the loopback web rendering them again (most of
    # a download's CPU at tiny). The web stays a pure function of its config: a page not here is rendered.
    pages = pa.table({"body": pa.array([body for _, body in crawled], pa.large_binary())},
                     metadata={"web_config": _config_key(config)})
    replace_atomically(lambda tmp: _write_arrow(pages, tmp), out_dir / WEB_PAGES_FILE)
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
