"""Reading and writing webdataset tar shards (the format of img2dataset's output and of training data)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image

STATS_SUFFIX = "_stats.json"  # img2dataset's table of a finished shard: NNNNNNNN_stats.json beside NNNNNNNN.tar


class BrokenShard(ValueError):
    """A webdataset shard that cannot be read to its end, or holds fewer samples than its writer counted."""


WEBDATASET_META = re.compile(r"__[^/]*__($|/)")  # members webdataset's tar reader skips (its `skip_meta`)
# webdataset.tariterators.base_plus_ext's pattern, copied: importing webdataset imports torch, which the pool's
# readers of shards do not otherwise load (tests/test_evaluation.py checks the two agree).
WEBDATASET_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def sample_key_and_extension(member_name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a tar member as webdataset splits it: the key is the path up to the first "." of the
    file's name, the extension the rest, lowercased (webdataset's default); (None, None) for a name it skips."""
    match = WEBDATASET_NAME.match(member_name)
    if not match or WEBDATASET_META.match(member_name):
        return None, None
    return match.group(1), match.group(2).lower()


def iter_webdataset(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for each sample of a webdataset tar, in order, grouped by
    `sample_key_and_extension` as webdataset groups them."""
    try:
        with tarfile.open(tar_path) as tar:
            key, files = None, {}
            for member in tar:
                stem, ext = sample_key_and_extension(member.name)
                if not member.isfile() or stem is None:
                    continue
                if stem != key and files:
                    yield key, files
                    files = {}
                key = stem
                files[ext] = tar.extractfile(member).read()
            if files:
                yield key, files
    except tarfile.ReadError as e:  # a bare ReadError names no file
        raise BrokenShard(f"{tar_path} is cut short mid-member or is not a tar ({e}); materialize the asset that "
                          "wrote it again") from None


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


def shard_problem(tar_path: str | Path) -> str | None:
    """What is wrong with a finished webdataset shard, or None when it is whole.

    A shard is whole when its tar reads to its end, ends with the end-of-archive blocks every finished tar has (a
    file cut at a member boundary reads cleanly but lacks them), and, where img2dataset's table sits beside it
    (`NNNNNNNN_stats.json`), holds as many samples as that table counts. Only the member headers are read (tarfile
    seeks past each member's data), so checking a pool's shards costs a small part of reading them."""
    path = Path(tar_path)
    expected = None
    stats = path.with_name(path.stem + STATS_SUFFIX)
    if stats.exists():
        try:
            expected = int(json.loads(stats.read_text())["successes"])
        except (ValueError, KeyError, TypeError) as e:
            return f"has an unreadable {stats.name} ({type(e).__name__}: {e})"
    if not path.is_file():
        return "is missing"
    keys = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile():
                    keys.add(member.name.partition(".")[0])
            end = tar.offset  # where the end-of-archive blocks begin (the file's end, when they are cut off)
    except tarfile.ReadError as e:
        return f"is cut short mid-member or is not a tar ({e})"
    if expected is not None and len(keys) < expected:
        return f"holds {len(keys):,} of the {expected:,} samples its {stats.name} counts"
    if expected is not None and len(keys) > expected:
        return f"holds {len(keys):,} samples, more than the {expected:,} its {stats.name} counts"
    if path.stat().st_size < end + 2 * tarfile.BLOCKSIZE:
        return "is cut short after its last member (it lacks the end-of-archive blocks)"
    return None


def check_shards(tar_paths: Iterable[str | Path], fix: str) -> None:
    """Raise BrokenShard naming every shard that is not whole (see `shard_problem`) and what to do (`fix`)."""
    problems = [f"{path} {problem}" for path in tar_paths if (problem := shard_problem(path))]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise BrokenShard(f"{shown}. {fix}")
