"""Caption features of a metadata set, computed once from its parquet files (plain Python; no Dagster).

For each `<metadata_dir>/<stem>.parquet` (reference schema; only `uid` and `text` are read) this writes
`<out_dir>/<stem>.parquet` with `uid` and the caption columns of the metadata schema's EXTRA_COLUMNS:
fastText lid.176 `language` and `language_score`, `num_words`, `num_chars`, `num_tokens`, and (optionally,
it is the slow part) CLD3 `cld3_language`. Filters join these on uid (`select_uids(feature_dirs=[out_dir])`).

Files are mapped over a process pool or a Ray cluster's tasks, one file per task. Each output is written under a temporary name and
renamed, so a reader never sees a partial file; an output that already exists with every needed column is
skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core.engine import Engine
from datacomp_assets.core.files import write_parquet_atomically
from datacomp_assets.core.schema import EXTRA_COLUMNS
from datacomp_assets.metadata.language import caption_stats, identify_languages, identify_languages_cld3

CAPTION_COLUMNS = ("language", "language_score", "cld3_language", "num_words", "num_chars", "num_tokens")


def feature_schema(cld3: bool = True) -> pa.Schema:
    """uid plus the caption feature columns, typed as in EXTRA_COLUMNS."""
    names = [c for c in CAPTION_COLUMNS if cld3 or c != "cld3_language"]
    return pa.schema([pa.field("uid", pa.string())] + [EXTRA_COLUMNS.field(name) for name in names])


def caption_features(table: pa.Table, cld3: bool = True) -> pa.Table:
    """The features of one table with `uid` and `text` columns (rows in the same order)."""
    text = table.column("text")
    languages, scores = identify_languages(text)
    stats = caption_stats(text)
    columns = {"uid": table.column("uid"), "language": languages, "language_score": scores}
    if cld3:
        columns["cld3_language"] = identify_languages_cld3(text)
    columns.update(stats)
    schema = feature_schema(cld3)
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


def _is_done(path: Path, schema: pa.Schema) -> bool:
    if not path.exists():
        return False
    try:
        return set(schema.names) <= set(pq.read_schema(path).names)
    except (OSError, pa.ArrowInvalid):  # unreadable: recompute it
        return False



def _features_of_file(task: tuple[str, str, bool]) -> tuple[str, int, float]:
    source, target, cld3 = task
    start = time.perf_counter()
    table = pq.read_table(source, columns=["uid", "text"])
    write_parquet_atomically(caption_features(table, cld3), Path(target))
    return Path(source).name, table.num_rows, time.perf_counter() - start


def compute_caption_features(metadata_dir: str | os.PathLike, out_dir: str | os.PathLike, processes: int = 2,
                             cld3: bool = True, log: Callable[[str], None] = print, engine: Engine = Engine()) -> dict:
    """Write `<out_dir>/<stem>.parquet` (uid + caption features) for every `<metadata_dir>/<stem>.parquet`.

    `processes` worker processes (spawned: the caller's threads are not forked), one file per task; with
    `processes=1` everything runs in this process. Outputs already there with every needed column are kept.
    Returns counts and timings: files, written, skipped, rows (of the written files), seconds, rows_per_second.
    """
    metadata_dir, out_dir = Path(metadata_dir), Path(out_dir)
    sources = sorted(metadata_dir.glob("*.parquet"))
    if not sources:
        raise FileNotFoundError(f"no parquet files in {metadata_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = feature_schema(cld3)
    tasks = [(str(s), str(out_dir / s.name), cld3) for s in sources if not _is_done(out_dir / s.name, schema)]
    skipped = len(sources) - len(tasks)
    if skipped:
        log(f"caption features: {skipped} of {len(sources)} files already written, skipped")
    start = time.perf_counter()
    rows = 0

    def done(result: tuple[str, int, float], count: int) -> None:
        nonlocal rows
        name, n, seconds = result
        rows += n
        log(f"caption features: {name} ({n:,} rows, {n / max(seconds, 1e-9):,.0f} rows/s) [{count}/{len(tasks)}]")

    for count, result in enumerate(engine.map_unordered(_features_of_file, tasks, processes, "caption features"), 1):
        done(result, count)
    seconds = time.perf_counter() - start
    return {"files": len(sources), "written": len(tasks), "skipped": skipped, "rows": rows,
            "seconds": seconds, "rows_per_second": rows / seconds if rows else 0.0}
