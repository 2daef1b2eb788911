"""Reading and writing webdataset tar shards (the format of img2dataset's output and of training data)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterable, Iterator


def iter_webdataset(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for each sample of a webdataset tar, in order."""
    with tarfile.open(tar_path) as tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.partition(".")
            if stem != key and files:
                yield key, files
                files = {}
            key = stem
            files[ext] = tar.extractfile(member).read()
        if files:
            yield key, files


def write_webdataset(tar_path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write (key, {extension: bytes}) samples into one tar; returns the number written."""
    n = 0
    with tarfile.open(tar_path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0  # byte-identical shards for identical samples
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def brace_pattern(directory: str | Path, count: int) -> str:
    """The webdataset brace pattern naming `count` shards 00000000.tar.. in a directory."""
    return str(Path(directory) / f"{{{0:08d}..{count - 1:08d}}}.tar")
