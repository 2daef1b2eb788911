"""Steps that spawn processes, run as a backgrounded pipeline runs them: `python -m tests.backgrounded <step> <dir>`.

Start it with SIGINT ignored, as a non-interactive shell starts `cmd &` (and as `nohup`, cron and scripts leave a
run): it first materializes a trivial asset, after which Dagster has mapped SIGTERM to SIGINT's disposition
(`setup_interrupt_handlers`), so both are ignored, exactly as in a backgrounded `dagster asset materialize`. Then
it runs the step and prints one JSON line: what the step made, and its worker processes (children of this one,
read from /proc as they run) that ignored SIGINT or SIGTERM. A step that hangs in that state never prints.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from datacomp_assets.world.web import WebConfig

CONFIG = WebConfig(seed=7, faults={})
IMAGE_SIZE, SHARD_SIZE, URLS = 32, 40, 120
INTERRUPTS = (1 << signal.SIGINT - 1) | (1 << signal.SIGTERM - 1)  # their bits in /proc/<pid>/status's SigIgn


def _ignore_both_as_dagster_leaves_them() -> None:
    import dagster as dg

    @dg.asset
    def trivial() -> int:
        return 1

    assert dg.materialize([trivial]).success
    # Without this the test would prove nothing: the state the fault needs is there.
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "start this with SIGINT ignored"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, "Dagster no longer maps SIGTERM to SIGINT"


def _worker_pids() -> set[int]:
    """This process's children that are multiprocessing workers (not its resource tracker, which ignores both on
    purpose)."""
    pids = set()
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.add(int(pid))
            except FileNotFoundError:
                pass
    return pids


def _ignores_an_interrupt(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return bool(int(status.split("SigIgn:")[1].split()[0], 16) & INTERRUPTS)


@contextmanager
def watching_workers(seen: dict[int, bool]):
    """`seen`: every worker pid seen while open, and whether it ignored SIGINT or SIGTERM."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            for pid in _worker_pids():
                seen[pid] = seen.get(pid, False) or _ignores_an_interrupt(pid)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _download(out: Path) -> dict:
    from datacomp_assets.pool.download import download_shards
    from datacomp_assets.world.index import write_pool_index
    from datacomp_assets.world.web_server import SyntheticWebServer

    with SyntheticWebServer(CONFIG) as server:
        write_pool_index(CONFIG, URLS, server.base_url, out / "index")
        summary = download_shards(out / "index" / "index.parquet", out / "shards", IMAGE_SIZE, SHARD_SIZE)
    return {"shards": summary.shards, "count": summary.count, "successes": summary.successes}


def _engine(out: Path) -> dict:
    from datacomp_assets.core.engine import Engine

    return {"results": sorted(Engine().map_unordered(abs, [-1, -2, -3, -4], processes=2, step="abs"))}


def _sha256(out: Path) -> dict:
    from datacomp_assets.world.index import crawl_sha256s

    return {"hashes": len(set(crawl_sha256s(CONFIG, 1000, processes=2)))}


def _curated(out: Path) -> dict:
    from datacomp_assets.world.curated import write_curated_source

    return write_curated_source(CONFIG, 60, out / "curated", IMAGE_SIZE, SHARD_SIZE)


STEPS = {"download": _download, "engine": _engine, "sha256": _sha256, "curated": _curated}

if __name__ == "__main__":
    step, out = sys.argv[1], Path(sys.argv[2])
    _ignore_both_as_dagster_leaves_them()
    workers: dict[int, bool] = {}
    with watching_workers(workers):
        made = STEPS[step](out)
    made.update(workers=len(workers), workers_ignoring=sorted(pid for pid, ignored in workers.items() if ignored))
    print(json.dumps(made, default=str), flush=True)
