"""What lineage costs: hashing an artifact (lineage.file_sha256) against only reading it, same file, same run; and
checking a table's manifest before a read (lineage.manifest_differences) against a bare stat of its files.

    .venv/bin/python benchmarks/lineage.py [--mb 512] [--repeats 3] [--files 2000]

Every subset, checkpoint and pool version is hashed once per materialization; this says how much that adds
to reading the bytes anyway, and the projected seconds per GB. Every read of a table of per-sample values checks
its manifest first; on unchanged files that is a stat per file (no byte is read), which this compares with the
stat alone, over `--files` files (a paper scale's pool has thousands). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from datacomp_assets.core.lineage import file_manifest, file_sha256, manifest_differences


def read_only(path: Path) -> int:
    total = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            total += len(block)
    return total


def timed(fn, path: Path) -> float:
    t0 = time.perf_counter()
    fn(path)
    return time.perf_counter() - t0


def manifest_check(files: int, repeats: int) -> dict:
    """Seconds to check `files` unchanged files against their manifest, and to only stat them (medians)."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for i in range(files):
            (directory / f"{i:08d}.parquet").write_bytes(os.urandom(4096))
        manifest = file_manifest(sorted(directory.glob("*.parquet")))
        stats, checks = [], []
        for _ in range(repeats):
            stats.append(timed(lambda d: [p.stat() for p in d.glob("*.parquet")], directory))
            checks.append(timed(lambda d: manifest_differences(d, manifest, "*.parquet"), directory))
            assert manifest_differences(directory, manifest, "*.parquet") == []
    stat_s, check_s = statistics.median(stats), statistics.median(checks)
    return {"manifest_files": files, "bare_stat_ms": round(1000 * stat_s, 2),
            "manifest_check_unchanged_ms": round(1000 * check_s, 2), "check_over_stat": round(check_s / stat_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="size of the test file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--files", type=int, default=2000, help="files in the table whose manifest is checked")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "artifact.bin"
        with open(path, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        read_only(path)  # warm the page cache: both sides then read from memory
        reads, hashes = [], []
        for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
            reads.append(timed(read_only, path))
            hashes.append(timed(file_sha256, path))
    read_s, hash_s = statistics.median(reads), statistics.median(hashes)
    print(json.dumps({
        "file_mb": args.mb, "repeats": args.repeats,
        "read_mb_per_s": round(args.mb / read_s, 1), "sha256_mb_per_s": round(args.mb / hash_s, 1),
        "sha256_seconds_per_gb": round(1024 * hash_s / args.mb, 2), "hash_over_read": round(hash_s / read_s, 2),
        **manifest_check(args.files, args.repeats),
    }, indent=2))


if __name__ == "__main__":
    main()
