"""Peak memory of the steps issue 28 flattened: the uid index's build, `basic` (from nothing, after its features)
and a `within` and an `outside` rule, each in its own spawned child (benchmarks/filters.py's `timed`).

    .venv/bin/python benchmarks/flat_memory.py --rows 1280000 [--out DIR] [--steps uid_index,basic_from_nothing,...]
    .venv/bin/python benchmarks/flat_memory.py --rows 128000000 --uids-only   # the index alone, uid-only files

The metadata is filters.py's synthetic pool (100k rows a file; `--uids-only`: random uids, 1M a file). To measure
an older revision, run from outside the repository with its tree first on PYTHONPATH (`python -m` from the
repository would put the working tree first). Prints one line per step, then one JSON object.
"""

from __future__ import annotations

import argparse
import binascii
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from filters import ensure_metadata, index_metadata, timed  # noqa: E402

RULES = '''
[l14_30pct_within_b32_45pct]
within = "clip_score_b32_45pct"
order_by = "clip_l14_similarity_score"
fraction = 0.30
fraction_of = "pool"

[outside_top_l14]
outside = "clip_score_l14_30pct"
'''
STEPS = {"basic_from_nothing": "basic", "basic_after_features": "basic", "within": "l14_30pct_within_b32_45pct",
         "outside": "outside_top_l14"}


def rule(meta: str, store: str, name: str, rules: str) -> dict:
    from datacomp_assets.core import strategies
    from datacomp_assets.core.caption_features import CaptionFeatureStore
    from datacomp_assets.filtering.selection import select_uids

    strategies.STRATEGIES = strategies.load_registry([rules])
    uids = select_uids(meta, name, reference_scorers=True,
                       caption_features=CaptionFeatureStore(store, processes=2, log=lambda _: None))
    return {"kept": len(uids), "sha256": hashlib.sha256(uids.tobytes()).hexdigest()[:16]}


def uid_files(directory: Path, rows: int, per_file: int = 1_000_000) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(-(-rows // per_file)):
        n, path = min(per_file, rows - i * per_file), directory / f"{i:08d}.parquet"
        if path.exists() and pq.read_metadata(path).num_rows == n:
            continue
        data = binascii.hexlify(np.random.default_rng(i).bytes(16 * n))
        offsets = np.arange(0, 32 * (n + 1), 32, dtype=np.int32)
        pq.write_table(pa.table({"uid": pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))}),
                       path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_280_000)
    parser.add_argument("--out", default="data/benchmarks/flat_memory")
    parser.add_argument("--steps", default="uid_index," + ",".join(STEPS))
    parser.add_argument("--uids-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    report: dict = {"rows": args.rows}
    if args.uids_only:
        meta = out / f"uids{args.rows}"
        uid_files(meta, args.rows)
        steps = ["uid_index"]
    else:
        meta = out / f"meta{args.rows}"
        ensure_metadata(meta, args.rows, max(2, args.rows // 100_000), 2)
        steps = args.steps.split(",")
    rules, store = out / "rules.toml", out / f"store{args.rows}"
    rules.write_text(RULES)
    shutil.rmtree(store, ignore_errors=True)  # `basic_from_nothing` starts from an empty caption feature store
    for step in steps:
        result = (timed(index_metadata, str(meta)) if step == "uid_index"
                  else timed(rule, str(meta), str(store), STEPS[step], str(rules)))
        report[step] = {k: result[k] for k in ("seconds", "peak_rss_mb", "peak_anon_mb")} | {"result": result["result"]}
        print(step, json.dumps(report[step]), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
