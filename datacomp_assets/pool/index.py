"""The pool's URL index: what Common Crawl extraction yields in the real benchmark (uid, url, alt-text).

Ground truth (object, colour, noise kind...) is written to a separate file so that no filter can read
it by accident; only tests and audits open it.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.pool.synthetic_web import Sample, WebConfig, ground_truth, sample
from datacomp_assets.pool.web_server import image_url

INDEX_FILE = "index.parquet"
GROUND_TRUTH_FILE = "ground_truth.parquet"


def build_index_rows(config: WebConfig, n: int, base_url: str,
                     namespace: str = "pool") -> tuple[pa.Table, pa.Table]:
    """(index table: uid, url, text; ground-truth table: uid + truth fields), one row per sample.

    Only ``sample()`` runs here (no rendering), so 20,000 rows take well under a minute.
    """
    samples = [sample(i, config, namespace) for i in range(n)]
    index = pa.table({
        "uid": pa.array([s.uid for s in samples], pa.string()),
        "url": pa.array([image_url(base_url, s.index, namespace) for s in samples], pa.string()),
        "text": pa.array([s.text for s in samples], pa.string()),
    })
    truths = [ground_truth(s) for s in samples]
    # uid first: it is the join key with the index and every later table.
    columns = ["uid"] + [f.name for f in fields(Sample) if f.name not in ("uid", "image_seed")]
    truth = pa.table({k: [t[k] for t in truths] for k in columns})
    return index, truth


def _write_atomically(table: pa.Table, path: Path) -> None:
    # A crash mid-write must never leave a truncated parquet that a later run mistakes for done.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_pool_index(config: WebConfig, n: int, base_url: str, out_dir: str | Path,
                     namespace: str = "pool") -> dict:
    """Write out_dir/index.parquet and out_dir/ground_truth.parquet; return a summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index, truth = build_index_rows(config, n, base_url, namespace)
    index_path, truth_path = out_dir / INDEX_FILE, out_dir / GROUND_TRUTH_FILE
    _write_atomically(truth, truth_path)
    _write_atomically(index, index_path)
    kinds = Counter(truth.column("kind").to_pylist())
    return {
        "rows": index.num_rows,
        "path": str(index_path),
        "ground_truth_path": str(truth_path),
        "kind_counts": dict(sorted(kinds.items())),
    }
