"""Writing so that nothing half-written is ever where a reader looks: write to a temporary sibling of the final
path, unique to the writing process, then rename it into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def temporary_sibling(path: str | os.PathLike) -> Path:
    """`.<name>.<pid>.tmp` beside `path`, after removing what killed writers left under such names.

    The name is unique to this process and hidden from the `*.parquet` and `*.tar` globs readers use. Stale
    siblings are safe to remove because one writer at a time holds an artifact (`core.locks`)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def replace_atomically(write: Callable[[Path], object], final: str | os.PathLike) -> None:
    """`write(tmp)` to a temporary sibling of `final`, then rename it into place: readers never see a partial file,
    and a crash leaves only the sibling, which the next writer removes."""
    tmp = temporary_sibling(final)
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomically(table, final: str | os.PathLike) -> None:
    """`pyarrow.parquet.write_table` through a temporary sibling (see `replace_atomically`)."""
    import pyarrow.parquet as pq

    replace_atomically(lambda tmp: pq.write_table(table, tmp), final)
