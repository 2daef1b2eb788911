"""Rows of the Hugging Face `datasets` repos DataComp evaluates on (Flickr, MSCOCO, WinoGAViL), read from disk.

DataComp reads these three with `datasets.load_dataset("nlphuji/<name>", split="test",
cache_dir=<data_dir>/hf_cache)` (eval_utils/retr_eval.py, eval_utils/wino_eval.py), and its download_evalsets.py
fills that cache with the same call. So the first place looked in, and the one read the reference's way, is:

- `<data_dir>/hf_cache`: the `datasets` library's arrow cache (`nlphuji___<name>/<config>/<version>/<hash>/`),
  read with that very call, offline. Images come as `datasets` stores them, `{"bytes": ..., "path": ...}`
  (the loading scripts store the path of the image in `hf_cache/downloads/extracted/`), and are decoded by the
  caller with PIL, as the reference's datasets 2.8.0 decodes them (later versions also apply the EXIF
  orientation, which the reference's numbers do not have).

Two more layouts are read without the `datasets` library, because the library of today cannot make the first
one where it is missing: it no longer runs the nlphuji repos' loading scripts, so our own `--download` fetches
the repos' files instead, into `<data_dir>/<name>/`:

- parquet files of the rows (the Hub's parquet export of the repo, or `load_dataset(...).to_parquet(...)`);
- for the two retrieval sets, the repo's own files: one `test_*.csv` with a `filename` column and a `raw`
  column (the JSON list of the image's captions), beside the `.zip` of the images.

Retrieval reads `image` and `caption` (a list of captions); WinoGAViL reads `candidate_images`, `cue`,
`candidates` and `associations`. Every function takes the task's folder, `<data_dir>/<name>` (see
`reference.task_directory`); the cache is its sibling `hf_cache`, and the repo is `nlphuji/<name>`.
This module imports neither torch nor Dagster (`datasets` is imported when a cache is read).
"""

from __future__ import annotations

import ast
import csv
import json
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from datacomp_assets.core import settings

HF_CACHE = "hf_cache"  # download_evalsets.py's cache_dir under its data_dir
NAMESPACE = "nlphuji"


class HubCacheError(ValueError):
    """A Hub task's rows or images cannot be read; the message is one line saying what to do."""


def repo_id(task_dir: Path) -> str:
    return f"{NAMESPACE}/{Path(task_dir).name}"


def hf_cache(task_dir: Path) -> Path:
    """download_evalsets.py's `datasets` cache, beside the task folders."""
    return Path(task_dir).parent / HF_CACHE


def cached_test_files(task_dir: Path) -> list[Path]:
    """The arrow files `datasets` cached for the repo's test split (`<name>-test.arrow`, or its shards)."""
    name = Path(task_dir).name
    return sorted((hf_cache(task_dir) / f"{NAMESPACE}___{name}").glob(f"*/*/*/{name}-test*.arrow"))


def how_to_get(task_dir: Path) -> str:
    data_dir = Path(task_dir).parent
    return (f"run DataComp's `python download_evalsets.py {data_dir}` where huggingface.co is reachable (it "
            f"fills {hf_cache(task_dir)}), or this project's evaluation with --download (it writes {task_dir})")


@contextmanager
def _offline():
    """The Hub switched off for `datasets` and `huggingface_hub`, so that a load reads the cache and nothing else.

    Both read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE when imported, so their module constants are set too.
    """
    import datasets.config
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
             huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        with settings.environment_set(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"):
            yield
    finally:
        (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
         huggingface_hub.constants.HF_HUB_OFFLINE) = saved


def load_cached_test_split(task_dir: Path):
    """The test split as the reference loads it: `datasets.load_dataset(repo, split="test", cache_dir=...)`."""
    import datasets

    cache = hf_cache(task_dir)
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # not its warning, on each load, that the Hub "couldn't be found"
    try:
        with _offline():
            return datasets.load_dataset(repo_id(task_dir), split="test", cache_dir=str(cache))
    except Exception as exc:  # the library raises many kinds; each becomes the same one-line advice
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise HubCacheError(f"{repo_id(task_dir)}: the test split in {cache} cannot be read ({reason}); "
                            f"{how_to_get(task_dir)}") from exc
    finally:
        datasets.logging.set_verbosity(verbosity)


def _cached_rows(task_dir: Path, columns: list[str]) -> Iterator[dict]:
    # Arrow batches, not `datasets`' decoded rows: the images stay {"bytes", "path"} for the caller to decode.
    dataset = load_cached_test_split(task_dir)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise HubCacheError(f"{repo_id(task_dir)}: the test split in {hf_cache(task_dir)} has no column(s) "
                            f"{missing} (it has {dataset.column_names}); {how_to_get(task_dir)}")
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=64):
        for row in batch.to_pylist():
            row["__dir__"] = hf_cache(task_dir)
            yield row


def _visible_files(task_dir: Path, pattern: str) -> list[Path]:
    """Files matching pattern under task_dir, skipping hidden folders (the Hub client's `.cache/`)."""
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        return []
    return sorted(p for p in task_dir.rglob(pattern)
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(task_dir).parts))


def _caption_tables(task_dir: Path) -> list[Path]:
    """The csv files whose header has the retrieval repos' `filename` and `raw` columns."""
    tables = []
    for path in _visible_files(task_dir, "*.csv"):
        with path.open(newline="", encoding="utf-8") as table:
            header = next(csv.reader(table), [])
        if {"filename", "raw"} <= set(header):
            tables.append(path)
    return tables


def has_files(task_dir: Path) -> bool:
    """True when task_dir itself holds parquet rows, or a caption csv beside a zip of images."""
    return bool(_visible_files(task_dir, "*.parquet")) or bool(
        _caption_tables(task_dir) and _visible_files(task_dir, "*.zip"))


def has_rows(task_dir: Path) -> bool:
    """True when the task's rows are on disk: in the `datasets` cache beside task_dir, or in task_dir's files."""
    return bool(cached_test_files(task_dir)) or has_files(task_dir)


def _only(files: list[Path], what: str, task_dir: Path) -> Path:
    if len(files) != 1:
        raise ValueError(f"{task_dir}: expected one {what}, found {[str(f) for f in files]}")
    return files[0]


def _parse_captions(raw: str) -> list[str]:
    # JSON in the published files; literal_eval (which evaluates no code) also accepts a Python list repr.
    try:
        return list(json.loads(raw))
    except json.JSONDecodeError:
        return list(ast.literal_eval(raw))


def iter_rows(task_dir: Path, columns: list[str]) -> Iterator[dict]:
    """The test rows, in file order: dicts with the named columns.

    Images come as `{"bytes": ..., "path": ...}`; read them with `image_bytes(value, base_dir)`, whose
    base_dir is the row's `__dir__`.
    """
    import pyarrow.parquet as pq

    task_dir = Path(task_dir)
    if cached_test_files(task_dir):
        yield from _cached_rows(task_dir, columns)
        return
    parquets = _visible_files(task_dir, "*.parquet")
    if parquets:
        for path in parquets:
            # Small batches: an image column holds whole encoded images.
            for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=columns):
                for row in batch.to_pylist():
                    row["__dir__"] = path.parent  # relative image paths are relative to the file
                    yield row
        return
    csv_path = _only(_caption_tables(task_dir), "caption csv (filename, raw)", task_dir)
    zip_path = _only(_visible_files(task_dir, "*.zip"), "zip of images", task_dir)
    with zipfile.ZipFile(zip_path) as archive, csv_path.open(newline="", encoding="utf-8") as table:
        # The zip holds <folder>/<filename>; the csv names the file only.
        members = {PurePosixPath(n).name: n for n in archive.namelist() if not n.endswith("/")}
        for record in csv.DictReader(table):
            member = members.get(record["filename"])
            if member is None:
                raise ValueError(f"{zip_path}: no image {record['filename']!r} named in {csv_path.name}")
            yield {"image": {"bytes": archive.read(member), "path": record["filename"]},
                   "caption": _parse_captions(record["raw"]), "__dir__": task_dir}


def _image_file(path: Path, base_dir: Path) -> Path:
    """Where an image a row names lives. A cache stores absolute paths into its `downloads/` folder; a data
    directory copied or moved since then is found again by that folder's place under base_dir (the cache)."""
    if not path.is_absolute():
        return base_dir / path
    if path.exists():
        return path
    for i, part in enumerate(path.parts):  # the first "downloads" may be the user's own folder of that name
        moved = Path(base_dir).joinpath(*path.parts[i:])
        if part == "downloads" and moved.exists():
            return moved
    return path


def image_bytes(value, base_dir: Path) -> bytes:
    """The encoded bytes of an image value as `datasets` stores it ({"bytes", "path"}, or bare bytes)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if value.get("bytes") is not None:
        return value["bytes"]
    path = _image_file(Path(value["path"]), Path(base_dir))
    if not path.is_file():
        raise HubCacheError(f"{value['path']}: an image the test rows in {base_dir} name is not there, nor under "
                            f"{base_dir} (was the data_dir copied without hf_cache/downloads/?); copy the whole "
                            f"data_dir, or fetch the test set again")
    return path.read_bytes()


def check_cache(task_dir: Path) -> None:
    """Open the cached test split and read its first image, so that an unreadable cache, or one copied without
    its images, fails now with HubCacheError rather than when its task's turn comes."""
    dataset = load_cached_test_split(task_dir)
    column = next((c for c in ("image", "candidate_images") if c in dataset.column_names), None)
    if column is None or not len(dataset):
        raise HubCacheError(f"{repo_id(task_dir)}: the test split in {hf_cache(task_dir)} has no rows with images "
                            f"(columns {dataset.column_names}); {how_to_get(task_dir)}")
    first = dataset.select_columns([column]).with_format("arrow")[0:1].to_pylist()[0][column]
    image_bytes(first[0] if column == "candidate_images" else first, hf_cache(task_dir))


def retrieval_examples(task_dir: Path) -> Iterator[tuple[bytes, list[str]]]:
    """(encoded image, its captions) per row of Flickr or MSCOCO."""
    for row in iter_rows(task_dir, columns=["image", "caption"]):
        yield image_bytes(row["image"], row["__dir__"]), list(row["caption"])


def winogavil_examples(task_dir: Path) -> Iterator[tuple[str, list[str], list[str], list[bytes]]]:
    """(cue, candidates, associations, encoded candidate images) per WinoGAViL instance."""
    for row in iter_rows(task_dir, columns=["cue", "candidates", "associations", "candidate_images"]):
        images = [image_bytes(value, row["__dir__"]) for value in row["candidate_images"]]
        yield row["cue"], list(row["candidates"]), list(row["associations"]), images
