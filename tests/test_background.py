"""Row 1 of docs/reliability.md: a run in the background (`nohup … &`, cron, a script) never hangs.

There SIGINT is ignored, Dagster maps SIGTERM to it, and a disposition of "ignored" survives exec: a worker pool
whose shutdown is `terminate()` (SIGTERM) then `join()` waited forever on workers that ignore SIGTERM. Each step
that spawns processes runs here in exactly that state (tests/backgrounded.py), under a hard time limit.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 240  # each step finishes in well under a minute; a hang is killed here and fails the test


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a non-interactive shell does before exec'ing `cmd &`


def run_backgrounded(step: str, out: Path) -> dict:
    """What the step made, once it has ended; fails if it hangs, or if any of its workers ignored an interrupt."""
    # A session of its own, so that a hang's workers (which ignore SIGTERM) can all be killed with it.
    with subprocess.Popen([sys.executable, "-m", "tests.backgrounded", step, str(out)], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_ignore_sigint,
                          start_new_session=True) as run:
        try:
            stdout, stderr = run.communicate(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            pytest.fail(f"{step} hung in the background state (killed after {LIMIT_S} s); its stderr ends:\n"
                        f"{run.communicate()[1][-3000:]}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)  # whatever it left behind
    assert run.returncode == 0, stderr[-3000:]
    made = json.loads(stdout.strip().splitlines()[-1])
    # Every worker could be stopped by a signal (the pool's terminate(), a user's kill): none ignored one.
    workers, ignoring = made.pop("workers"), made.pop("workers_ignoring")
    assert workers > 0, f"{step} started no worker process: this test would prove nothing"
    assert ignoring == [], f"{len(ignoring)} of {step}'s {workers} worker processes ignored SIGINT or SIGTERM"
    return made


def test_download_completes_with_every_shard_when_sigint_and_sigterm_are_ignored(tmp_path):
    made = run_backgrounded("download", tmp_path)
    assert made == {"shards": 3, "count": 120, "successes": 120}


def test_the_engines_local_pool_ends_when_sigint_and_sigterm_are_ignored(tmp_path):
    assert run_backgrounded("engine", tmp_path) == {"results": [1, 2, 3, 4]}


def test_the_index_hashing_pool_ends_when_sigint_and_sigterm_are_ignored(tmp_path):
    assert run_backgrounded("sha256", tmp_path) == {"hashes": 1000}


def test_the_curated_source_pool_ends_when_sigint_and_sigterm_are_ignored(tmp_path):
    made = run_backgrounded("curated", tmp_path)
    assert made["samples"] == 60 and made["shards"] == 2
    assert sorted(p.name for p in (tmp_path / "curated").glob("*.tar")) == ["00000000.tar", "00000001.tar"]


# ------------------------------------------------------------------ the helpers themselves

def test_children_started_inside_get_default_dispositions_and_this_process_still_ignores():
    script = ("import signal, subprocess, sys\n"
              "from datacomp_assets.core.processes import children_get_default_signals\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "probe = 'import signal; print([signal.getsignal(s) is signal.SIG_IGN for s in (2, 15)])'\n"
              "with children_get_default_signals():\n"
              "    subprocess.run([sys.executable, '-c', probe])\n"
              "    signal.raise_signal(signal.SIGTERM)  # still ignored here\n"
              "print([signal.getsignal(s) is signal.SIG_IGN for s in (2, 15)])\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    child, afterwards = out.stdout.splitlines()
    assert child == "[False, False]"  # the child can be interrupted and terminated
    assert afterwards == "[True, True]"  # and this process ignores both again, as it did before


def _ignore_sigterm_and_hang(started: Path) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker that shrugs off Pool.terminate()
    (started / str(os.getpid())).touch()
    time.sleep(600)


def test_a_pool_whose_workers_ignore_sigterm_still_ends_and_the_log_names_the_pids(tmp_path):
    from datacomp_assets.core import processes

    lines: list[str] = []
    with processes.spawn_pool(2, "a test pool", log=lines.append, grace_s=2.0) as pool:
        for _ in range(2):
            pool.apply_async(_ignore_sigterm_and_hang, (tmp_path,))
        deadline = time.monotonic() + 120
        while len(list(tmp_path.iterdir())) < 2:
            assert time.monotonic() < deadline, "the workers never started their tasks"
            time.sleep(0.1)
        ended = time.monotonic()
    assert time.monotonic() - ended < 30  # not the 600 s the workers would take
    assert not multiprocessing.active_children()
    pids = sorted(int(p.name) for p in tmp_path.iterdir())
    assert lines == [f"a test pool: 2 worker process(es) still running 2 s after the pool was told to end; killed "
                     f"(pids {', '.join(map(str, pids))})"]
