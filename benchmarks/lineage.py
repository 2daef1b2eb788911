"""What lineage costs: hashing an artifact (lineage.file_sha256) against only reading it, same file, same run.

    .venv/bin/python benchmarks/lineage.py [--mb 512] [--repeats 3]

Every subset, checkpoint and pool version is hashed once per materialization; this says how much that adds
to reading the bytes anyway, and the projected seconds per GB. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from datacomp_assets.core.lineage import file_sha256


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="size of the test file")
    parser.add_argument("--repeats", type=int, default=3)
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
    }, indent=2))


if __name__ == "__main__":
    main()
