"""Child processes that die with their run. Plain Python; no Dagster.

A step of Dagster's multiprocess executor runs in a child process of the run's
process (`dagster asset materialize`, the UI's run worker); when the run's process is killed outright (SIGKILL, the
OOM killer) nothing would stop that child, which would keep running and holding its artifact's lock (core.locks)
with no run left to report to. `die_with_the_run` asks Linux to kill it when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `signum` to this process when the thread that started it exits. False off Linux."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    return True


def die_with_the_run() -> None:
    """In a process that `multiprocessing` started (a step of the multiprocess executor): be killed when the
    parent dies, and die now if it already has.

    Only there: the run's own process (the main command, `dagster asset materialize`, a run worker) was not
    started by multiprocessing and must outlive the shell that started it (`nohup ... &`). The signal comes when
    the parent's starting *thread* exits; the executor starts steps from the run's main thread, which lives as
    long as the run."""
    parent = multiprocessing.parent_process()
    if parent is None or not set_parent_death_signal(signal.SIGKILL):
        return
    if not parent.is_alive():  # it died before the signal was asked for: nobody would send it
        os.kill(os.getpid(), signal.SIGKILL)
