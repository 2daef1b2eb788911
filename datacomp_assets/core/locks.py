"""One writer per artifact: an exclusive lock per asset partition, held by whoever materializes it (the main
command, `dagster asset materialize`, the UI, a schedule or a backfill).

The lock is `fcntl.flock` on a file under the storage root: the operating system releases it when its holder
exits, however it exits (a SIGKILL included), so a killed writer never leaves a lock behind. A second writer
fails at once, naming the holder, instead of writing into the same files.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class ArtifactLocked(RuntimeError):
    """Another process is writing the same artifact."""


def _holder(fd: int, wait_seconds: float = 1.0) -> str:
    """Who holds the lock, as its holder wrote it. The holder writes its name just after it takes the lock, so a
    file read in between is empty: read again, briefly, before calling it "another process"."""
    deadline = time.monotonic() + wait_seconds
    while True:
        held_by = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if held_by or time.monotonic() > deadline:
            return held_by
        time.sleep(0.02)


@contextmanager
def exclusive(lock_file: Path, artifact: str, holder: str) -> Iterator[None]:
    """Hold `lock_file` for the duration of a `with` block, or raise ArtifactLocked naming who holds it.

    `holder` (a run id, say) is written into the file, for the message a second writer gets."""
    def refuse(fd: int) -> None:
        raise ArtifactLocked(
            f"{artifact} is being written by {_holder(fd) or 'another process'}; materialize it again once that has "
            f"finished, or stop that process (its lock, {lock_file}, is released the moment it exits)") from None

    with _locked(lock_file, holder, refuse):
        yield


@contextmanager
def waiting_for(lock_file: Path, holder: str, log=print) -> Iterator[None]:
    """Hold `lock_file` for a `with` block, waiting (and saying so) while another process holds it: for shared
    caches that a second writer should complete, not refuse (the caption feature store)."""
    def wait(fd: int) -> None:
        log(f"waiting for {_holder(fd) or 'another process'} to finish writing {lock_file.parent}")
        fcntl.flock(fd, fcntl.LOCK_EX)

    with _locked(lock_file, holder, wait):
        yield


@contextmanager
def _locked(lock_file: Path, holder: str, when_held: Callable[[int], None]) -> Iterator[None]:
    """flock `lock_file`; if another process holds it, `when_held(fd)` raises or takes the lock by waiting."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            when_held(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')})"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
