"""Child processes that end when told to, even in a backgrounded run, and die with their run. Plain Python; no
Dagster.

A run started in the background (`nohup … &`, cron, a script) ignores SIGINT, and Dagster maps SIGTERM to SIGINT's
disposition, so it ignores both. An ignored disposition survives exec (a handler does not), so every process such a
run starts would ignore SIGTERM too, and a pool's shutdown (`terminate()`: SIGTERM to each worker, then `join()`)
would wait forever on a worker blocked on the task queue's lock. Hence: children start with the default SIGINT and
SIGTERM, and a pool's shutdown is bounded (workers still alive after a grace period are killed by pid, with a line
in the log).

And they die with their run. A step of Dagster's multiprocess executor runs in a child process of the run's
process (`dagster asset materialize`, the UI's run worker); when the run's process is killed outright (SIGKILL, the
OOM killer) nothing would stop that child, which would keep running and holding its artifact's lock (core.locks)
with no run left to report to. `die_with_the_run` asks Linux to kill it when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess

GRACE_S = 30.0  # how long a pool told to end may take before its workers are killed (it takes well under 1 s)
# What Python itself gives each signal at start-up when its parent did not ignore it.
_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def restore_default_signals() -> None:
    """Stop ignoring SIGINT and SIGTERM in this process: a pool's initializer, or a Popen's preexec_fn (in the child,
    before exec, so that what runs there starts with the defaults)."""
    for signum, default in _DEFAULTS.items():
        if signal.getsignal(signum) is signal.SIG_IGN:
            signal.signal(signum, default)


def _still_ignored(signum: int, frame: object) -> None:
    """This process's stand-in for "ignored" while it starts children (see children_get_default_signals)."""


@contextmanager
def children_get_default_signals() -> Iterator[None]:
    """While open, the processes started here begin with the default SIGINT and SIGTERM, even where this process
    ignores them: an ignored signal is given a handler that does nothing, which means the same here but is reset
    to the default by exec. Only the main thread may set handlers; elsewhere this changes nothing (the initializer
    of spawn_pool's workers and its bounded shutdown cover that case)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    swapped = {s: signal.signal(s, _still_ignored) for s in _DEFAULTS if signal.getsignal(s) is signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, previous in swapped.items():
            if signal.getsignal(signum) is _still_ignored:  # unless the code inside set a handler of its own
                signal.signal(signum, previous)


class Reaper:
    """A bound on a pool's shutdown: once armed, the processes `leftovers()` names that are still alive `grace_s`
    later are killed by pid (SIGKILL, which no disposition stops). On leaving the block, one line in `log` names
    what was killed."""

    def __init__(self, what: str, leftovers: Callable[[], Iterable[BaseProcess]],
                 log: Callable[[str], None] = to_stderr, grace_s: float = GRACE_S):
        self.what, self.leftovers, self.log, self.grace_s = what, leftovers, log, grace_s
        self.killed: list[int] = []
        self._disarmed = threading.Event()
        self._armed = threading.Event()

    def arm(self) -> None:
        self._armed.set()

    def arm_when(self, condition: Callable[[], bool], every_s: float = 1.0) -> Reaper:
        """Arm once `condition()` holds (checked every `every_s` seconds from a thread)."""
        def watch() -> None:
            while not self._disarmed.is_set() and not condition():
                self._disarmed.wait(every_s)
            self.arm()

        threading.Thread(target=watch, name=f"arming the reaper of {self.what}", daemon=True).start()
        return self

    def _reap(self) -> None:
        self._armed.wait()
        if self._disarmed.wait(self.grace_s):
            return
        for process in self.leftovers():
            if process.is_alive():
                process.kill()
                self.killed.append(process.pid)

    def __enter__(self) -> Reaper:
        threading.Thread(target=self._reap, name=f"reaper of {self.what}", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._disarmed.set()
        self._armed.set()  # lets the reaper's thread see that it is done
        if self.killed:
            self.log(f"{self.what}: {len(self.killed)} worker process(es) still running {self.grace_s:.0f} s after "
                     f"the pool was told to end; killed (pids {', '.join(map(str, sorted(self.killed)))})")


def new_children(before: set[int]) -> Callable[[], list[BaseProcess]]:
    """The multiprocessing children of this process started since `before` (their pids) was taken: the workers of
    a pool that code we do not control (img2dataset) starts."""
    return lambda: [p for p in multiprocessing.active_children() if p.pid not in before]


@contextmanager
def spawn_pool(processes: int, what: str, log: Callable[[str], None] = to_stderr,
               grace_s: float = GRACE_S) -> Iterator[multiprocessing.pool.Pool]:
    """A pool of spawned processes (not forked: the caller may be a threaded Dagster process) that ends when the
    block does, even where this process ignores SIGINT and SIGTERM: its workers start with the default
    dispositions, and its terminate() is bounded by a Reaper."""
    with children_get_default_signals():
        pool = multiprocessing.get_context("spawn").Pool(processes, initializer=restore_default_signals)
    # The pool's own list of its workers (replacements included): no other process is ever killed.
    with Reaper(what, lambda: list(pool._pool), log, grace_s) as reaper:
        try:
            yield pool
        finally:
            reaper.arm()
            pool.terminate()  # joins the workers: the reaper ends any that ignore it


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
