"""Instance storage under parallel writers: SQLite (instance/dagster.yaml) against PostgreSQL
(instance/dagster-postgres.yaml), same run, same writers and events.

    .venv/bin/python benchmarks/instance_storage.py [--writers 8] [--events 200]

What a backfill's runs do to the instance, in miniature: each of N writer processes (started at once, "spawn")
records a run, then its RUN_START, M asset materializations of one partitioned asset (a partition each) and its
RUN_SUCCESS, each written through `instance.report_dagster_event` as a run's step would; a failed write (e.g.
sqlite3 "database is locked") is counted and the writer goes on. Meanwhile the parent reads the asset's latest
materializations (`fetch_materializations`, limit 100) about twice a second, and once all writers are done it
reads all of them back and checks the count. Per backend: wall seconds (first write to last), events/s, errors,
p50/p95/max latency of one materialization write, the reads' latencies.

PostgreSQL: the server of $DATACOMP_TEST_POSTGRES_URL, else a throwaway one from tests/postgres_server.py run with
its defaults (every commit flushed, as SQLite's WAL does with its default synchronous=FULL). Without either the
benchmark reports SQLite alone and says why. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.postgres_server, when run as a script
    sys.path.insert(0, str(ROOT))

from tests.postgres_server import PostgresUnavailable, dagster_pg_env, running_server  # noqa: E402

ASSET = "bench"
JOB = "bench_backfill"
READ_LIMIT = 100  # what the UI's asset page asks for


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def writer(home: str, index: int, events: int, barrier, results) -> None:
    """One run of the backfill: its run record, RUN_START, `events` materializations, RUN_SUCCESS."""
    import uuid

    import dagster as dg
    from dagster import DagsterEvent, DagsterEventType, DagsterRun

    from datacomp_assets.dagster_private import step_materialization_data

    out = {"writer": index, "latencies": [], "errors": 0, "error_samples": [], "start": None, "end": None,
           "fatal": None}

    def write(event: DagsterEvent, run_id: str, timed: bool) -> None:
        t0 = time.perf_counter()
        try:
            instance.report_dagster_event(event, run_id=run_id)
        except Exception as e:  # e.g. sqlite3.OperationalError: database is locked
            out["errors"] += 1
            sample = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if sample not in out["error_samples"] and len(out["error_samples"]) < 3:
                out["error_samples"].append(sample)
            return
        if timed:
            out["latencies"].append(time.perf_counter() - t0)

    try:
        with dg.DagsterInstance.from_config(home) as instance:
            run = instance.add_run(DagsterRun(job_name=JOB, run_id=str(uuid.uuid4()),
                                              status=dg.DagsterRunStatus.NOT_STARTED,
                                              tags={"dagster/backfill": "bench", "writer": str(index)}))
            barrier.wait(timeout=600)
            out["start"] = time.time()
            write(DagsterEvent(DagsterEventType.RUN_START.value, job_name=JOB), run.run_id, timed=False)
            for i in range(events):
                materialization = dg.AssetMaterialization(asset_key=ASSET, partition=f"p{index * events + i}",
                                                          metadata={"writer": index, "i": i})
                write(DagsterEvent(DagsterEventType.ASSET_MATERIALIZATION.value, job_name=JOB,
                                   event_specific_data=step_materialization_data(materialization),
                                   message="Materialized value."), run.run_id, timed=True)
            write(DagsterEvent(DagsterEventType.RUN_SUCCESS.value, job_name=JOB), run.run_id, timed=False)
            out["end"] = time.time()
    except Exception as e:
        out["fatal"] = f"{type(e).__name__}: {e}"[:500]
        if out["start"] is None:
            barrier.abort()  # the others (and the parent) stop waiting for this one
    finally:
        results.put(out)


def bench(home: str, writers: int, events: int) -> dict:
    """N writers against the instance of `home` (its dagster.yaml), the parent reading meanwhile."""
    import dagster as dg

    key = dg.AssetKey(ASSET)
    with dg.DagsterInstance.from_config(home) as instance:
        instance.get_runs_count()  # creates the schema before the writers race for it
        instance.fetch_materializations(key, limit=1)
        storage = {"run_storage": type(instance.run_storage).__name__,
                   "event_log_storage": type(instance.event_log_storage).__name__}

        ctx = mp.get_context("spawn")
        barrier, results = ctx.Barrier(writers + 1), ctx.Queue()
        procs = [ctx.Process(target=writer, args=(home, k, events, barrier, results), daemon=True)
                 for k in range(writers)]
        outs, reads, read_errors = [], [], 0
        try:
            for p in procs:
                p.start()
            with contextlib.suppress(threading.BrokenBarrierError):  # a writer failed before its first event
                barrier.wait(timeout=600)  # every writer has imported dagster and recorded its run
            while len(outs) < writers:
                try:
                    outs.append(results.get(timeout=0.5))
                    continue
                except queue.Empty:
                    pass
                if not any(p.is_alive() for p in procs) and results.empty():
                    break  # a writer died without reporting
                t0 = time.perf_counter()
                try:
                    instance.fetch_materializations(key, limit=READ_LIMIT)
                    reads.append(time.perf_counter() - t0)
                except Exception:
                    read_errors += 1
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()

        t0 = time.perf_counter()
        stored = len(instance.fetch_materializations(key, limit=writers * events + 1).records)
        read_all_s = time.perf_counter() - t0

    latencies = [x for o in outs for x in o["latencies"]]
    starts, ends = [o["start"] for o in outs if o["start"]], [o["end"] for o in outs if o["end"]]
    wall = max(ends) - min(starts) if starts and ends else None
    samples = []
    for o in outs:
        samples += [s for s in o["error_samples"] + ([o["fatal"]] if o["fatal"] else []) if s not in samples]
    return {
        **storage,
        "writers_reported": len(outs),
        "writers_failed": writers - sum(1 for o in outs if not o["fatal"]),
        "events_ok": len(latencies),
        "errors": sum(o["errors"] for o in outs),
        "error_samples": samples[:5],
        "wall_s": round(wall, 2) if wall else None,
        "events_per_s": round(len(latencies) / wall, 1) if wall else None,
        "write_latency_ms": {"p50": _ms(_percentile(latencies, 50)), "p95": _ms(_percentile(latencies, 95)),
                             "max": _ms(max(latencies, default=None))},
        "reads_while_writing": {"count": len(reads), "errors": read_errors, "p50_ms": _ms(_percentile(reads, 50)),
                                "max_ms": _ms(max(reads, default=None))},
        "read_all_at_end": {"seconds": round(read_all_s, 3), "records": stored, "expected": writers * events},
    }


@contextlib.contextmanager
def _env(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _home(tmp: str, yaml: Path) -> str:
    home = Path(tmp) / "home"
    home.mkdir()
    shutil.copy(yaml, home / "dagster.yaml")
    return str(home)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8, help="writer processes at once (runs of a backfill)")
    parser.add_argument("--events", type=int, default=200, help="materializations each writer records")
    args = parser.parse_args()
    report = {"writers": args.writers, "events_per_writer": args.events, "cpus": os.cpu_count(),
              "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}

    with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as tmp:
        home = _home(tmp, ROOT / "instance" / "dagster.yaml")
        with _env({"DAGSTER_HOME": home}):
            report["sqlite"] = bench(home, args.writers, args.events)

    report["postgres"] = None
    try:
        with running_server(durable=True) as server, tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp:
            home = _home(tmp, ROOT / "instance" / "dagster-postgres.yaml")
            report["postgres_server"] = ("$DATACOMP_TEST_POSTGRES_URL" if os.environ.get("DATACOMP_TEST_POSTGRES_URL")
                                         else "throwaway (tests/postgres_server.py, fsync on)")
            with _env({"DAGSTER_HOME": home, **dagster_pg_env(server)}):
                report["postgres"] = bench(home, args.writers, args.events)
    except PostgresUnavailable as e:
        report["postgres_skipped"] = str(e)

    sqlite, postgres = report["sqlite"], report["postgres"]
    if postgres and sqlite["events_per_s"] and postgres["events_per_s"]:
        report["postgres_over_sqlite"] = {
            "events_per_s": round(postgres["events_per_s"] / sqlite["events_per_s"], 2),
            "write_p50": round(postgres["write_latency_ms"]["p50"] / sqlite["write_latency_ms"]["p50"], 2),
            "write_p95": round(postgres["write_latency_ms"]["p95"] / sqlite["write_latency_ms"]["p95"], 2),
            "read_all_at_end": round(postgres["read_all_at_end"]["seconds"] / sqlite["read_all_at_end"]["seconds"], 2),
        }
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
