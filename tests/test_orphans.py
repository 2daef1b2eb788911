"""No orphans (issue 26, row 2): a step's process dies with its run, so a SIGKILL of `dagster asset materialize`
leaves no step spinning and holding its artifact's lock; the next run marks the killed run failed."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from datacomp_assets.core.layout import Layout
from datacomp_assets.core.locks import ArtifactLocked, exclusive

ROOT = Path(__file__).resolve().parents[1]
INSTANCE_YAML = ROOT / "instance" / "dagster.yaml"


def holder_pid(lock_file: Path, run: subprocess.Popen, seconds: float) -> int:
    """The pid the lock's holder wrote into `lock_file` (core.locks), once it has."""
    deadline = time.monotonic() + seconds
    while True:
        held = re.search(r"\(pid (\d+) ", lock_file.read_text()) if lock_file.exists() else None
        if held:
            return int(held.group(1))
        assert run.poll() is None, f"the run ended ({run.returncode}) before its step took the lock"
        assert time.monotonic() < deadline, "the step never took its lock"
        time.sleep(0.2)


def gone(pid: int) -> bool:
    """Exited (a zombie counts: it holds no lock and runs nothing, and the container's init may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def lock_is_free(lock_file: Path) -> bool:
    try:
        with exclusive(lock_file, "spins_holding_its_lock", "the test"):
            return True
    except ArtifactLocked:
        return False


def test_a_killed_runs_step_dies_its_lock_is_freed_and_the_next_run_marks_it_failed(tmp_path):
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    shutil.copy(INSTANCE_YAML, home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "DATACOMP_HOME": str(data), "PYTHONPATH": str(ROOT)}
    cli = [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m", "tests.orphan_location"]
    lock_file = Layout(data).lock_file("spins_holding_its_lock")
    run = subprocess.Popen([*cli, "--select", "spins_holding_its_lock"], env=env, cwd=ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        step = holder_pid(lock_file, run, seconds=180)
        assert step != run.pid  # the project's executor runs each step in a process of its own
        os.kill(run.pid, signal.SIGKILL)  # the run's process alone, as `kill -9 <pid>` or the OOM killer would
        run.wait()
        deadline = time.monotonic() + 15
        while not gone(step):
            assert time.monotonic() < deadline, f"the step's process {step} outlived its killed run by 15 s"
            time.sleep(0.1)
        while not lock_is_free(lock_file):  # its last threads may still be exiting, the files still open
            assert time.monotonic() < deadline, f"{lock_file} still held 15 s after the run was killed"
            time.sleep(0.1)

        with dg.DagsterInstance.from_config(str(home)) as instance:
            (killed,) = instance.get_runs()
            assert killed.status == dg.DagsterRunStatus.STARTED  # nobody has looked since it was killed
            after = subprocess.run([*cli, "--select", "returns_at_once"], env=env, cwd=ROOT, capture_output=True,
                                   text=True, timeout=180)
            assert after.returncode == 0, after.stderr[-3000:]
            assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
            (failure,) = instance.all_logs(killed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
            assert "processes" in failure.message and "are gone" in failure.message
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)  # an orphan left by a failure above


PARENT_DEATH_SIGNAL = """
import ctypes
sig = ctypes.c_int(-1)
ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
print(sig.value)
"""


def test_the_runs_own_process_keeps_living_when_its_shell_goes():
    """Loading the code location in the run's own process (the main command, `dagster asset materialize`) asks
    for no parent-death signal: `nohup python -m datacomp_assets.run &` must outlive its shell."""
    done = subprocess.run([sys.executable, "-c", "import datacomp_assets.definitions\n" + PARENT_DEATH_SIGNAL],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["0"]


SPAWNS_A_CHILD = """
import multiprocessing, sys, time

def child(pid_file):
    from datacomp_assets.core.processes import die_with_the_run
    die_with_the_run()
    open(pid_file, "w").write(str(__import__("os").getpid()))
    time.sleep(600)

if __name__ == "__main__":
    multiprocessing.get_context("spawn").Process(target=child, args=(sys.argv[1],)).start()
    time.sleep(600)
"""


def test_a_process_multiprocessing_started_dies_with_its_parent(tmp_path):
    pid_file, script = tmp_path / "child.pid", tmp_path / "spawns_a_child.py"
    script.write_text(SPAWNS_A_CHILD)  # a file: a spawned child imports its target from the parent's main module
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)], cwd=ROOT, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert parent.poll() is None and time.monotonic() < deadline, "the child never started"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while not gone(child):
            assert time.monotonic() < deadline, f"the child {child} outlived its killed parent by 10 s"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
