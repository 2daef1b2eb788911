"""Rows of the Hugging Face `datasets` repos DataComp evaluates on (Flickr, MSCOCO, WinoGAViL), read from disk.

DataComp loads these three with `datasets.load_dataset("nlphuji/<name>", split="test")` and reads `image` and
`caption` (a list of captions) for retrieval (eval_utils/retr_eval.py), `candidate_images`, `cue`, `candidates`
and `associations` for WinoGAViL (eval_utils/wino_eval.py). The same rows are read here from a local folder,
without the `datasets` library, in either of two layouts:

- parquet files of those rows (the Hub's parquet export of the repo, or `load_dataset(...).to_parquet(...)`),
  images stored as `datasets` stores them: `{"bytes": ..., "path": ...}`;
- for the two retrieval sets, the repo's own files: one `test_*.csv` with a `filename` column and a `raw`
  column (the JSON list of the image's captions), beside the `.zip` of the images.

This module imports neither torch nor Dagster.
"""

from __future__ import annotations

import ast
import csv
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath


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


def has_rows(task_dir: Path) -> bool:
    """True when task_dir holds parquet rows, or a caption csv beside a zip of images."""
    return bool(_visible_files(task_dir, "*.parquet")) or bool(
        _caption_tables(task_dir) and _visible_files(task_dir, "*.zip"))


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


def iter_rows(task_dir: Path, columns: list[str] | None = None) -> Iterator[dict]:
    """The test rows, in file order: dicts with (at least) the named columns.

    Images come as `{"bytes": ..., "path": ...}`; read them with `image_bytes(value, base_dir)`, whose
    base_dir is the row's `__dir__` (relative image paths in parquet files are relative to the file).
    """
    import pyarrow.parquet as pq

    task_dir = Path(task_dir)
    parquets = _visible_files(task_dir, "*.parquet")
    if parquets:
        for path in parquets:
            # Small batches: an image column holds whole encoded images.
            for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=columns):
                for row in batch.to_pylist():
                    row["__dir__"] = path.parent
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


def image_bytes(value, base_dir: Path) -> bytes:
    """The encoded bytes of an image value as `datasets` stores it ({"bytes", "path"}, or bare bytes)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if value.get("bytes") is not None:
        return value["bytes"]
    path = Path(value["path"])
    return (path if path.is_absolute() else Path(base_dir) / path).read_bytes()


def retrieval_examples(task_dir: Path) -> Iterator[tuple[bytes, list[str]]]:
    """(encoded image, its captions) per row of Flickr or MSCOCO."""
    for row in iter_rows(task_dir, columns=["image", "caption"]):
        yield image_bytes(row["image"], row["__dir__"]), list(row["caption"])


def winogavil_examples(task_dir: Path) -> Iterator[tuple[str, list[str], list[str], list[bytes]]]:
    """(cue, candidates, associations, encoded candidate images) per WinoGAViL instance."""
    for row in iter_rows(task_dir, columns=["cue", "candidates", "associations", "candidate_images"]):
        images = [image_bytes(value, row["__dir__"]) for value in row["candidate_images"]]
        yield row["cue"], list(row["candidates"]), list(row["associations"]), images
