"""Reading and writing webdataset tar shards (the format of img2dataset's output and of training data)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image


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


def iter_shard_samples(task_dir: str | Path) -> Iterator[dict[str, bytes]]:
    """Samples of `<task_dir>/test/{i}.tar` as {"__key__": key, ext: bytes}, in shard order."""
    test_dir = Path(task_dir) / "test"
    nshards = int((test_dir / "nshards.txt").read_text().strip())
    for i in range(nshards):
        for key, files in iter_webdataset(test_dir / f"{i}.tar"):
            yield {"__key__": key, **files}


def read_downloaded(tar_path: Path) -> tuple[list[dict], list[Image.Image]]:
    """The successfully downloaded samples of one img2dataset shard: their json record and image."""
    records, images = [], []
    for _, files in iter_webdataset(tar_path):
        if "jpg" not in files or "json" not in files:
            continue
        meta = json.loads(files["json"])
        meta["text"] = files.get("txt", b"").decode("utf-8", errors="replace")
        records.append(meta)
        images.append(Image.open(io.BytesIO(files["jpg"])).convert("RGB"))
    return records, images
