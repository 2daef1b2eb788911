"""The pool's metadata at a published scale: DataComp's parquet and npz as they are, joined with caption features.

The published files already hold what the miniature computes from images (OpenAI CLIP B/32 and L/14 scores and
embeddings, face boxes, sha256), and DataComp removed unsafe and evaluation-duplicate samples before publishing.
What filters still need is computed here once per caption: fastText language and its score, CLD3 language, and
word, character and token counts. Each file is streamed in record batches (memory holds one batch per process,
whatever the pool's size), files are mapped over worker processes or a Ray cluster's tasks, and a file already written is skipped, so an
interrupted run resumes where it stopped. The npz beside each file is linked, not copied (75 GB at `small`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core.engine import Engine
from datacomp_assets.core.files import temporary_sibling
from datacomp_assets.core.layout import Asset
from datacomp_assets.core.schema import FULL_SCHEMA, POOL_METADATA_SCHEMA, validate_metadata
from datacomp_assets.core.caption_features import CAPTION_COLUMNS, caption_features

BATCH_ROWS = 65_536


def _is_done(path: Path) -> bool:
    try:
        return path.exists() and set(FULL_SCHEMA.names) <= set(pq.read_schema(path).names)
    except (OSError, pa.ArrowInvalid):  # unreadable: write it again
        return False


def link_embeddings(source: Path, target: Path) -> bool:
    """Link the published `<stem>.npz` beside the metadata parquet (False when the mirror has none)."""
    npz = source.with_suffix(".npz")
    if not npz.exists():
        return False
    link = target.with_suffix(".npz")
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(npz.resolve())
    return True


def _join_file(task: tuple[str, str]) -> tuple[str, int, float]:
    source, target = Path(task[0]), Path(task[1])
    start, rows = time.perf_counter(), 0
    tmp = temporary_sibling(target)
    try:
        with pq.ParquetWriter(tmp, FULL_SCHEMA) as writer:
            for batch in pq.ParquetFile(source).iter_batches(BATCH_ROWS, columns=POOL_METADATA_SCHEMA.names):
                table = pa.Table.from_batches([batch]).cast(POOL_METADATA_SCHEMA)
                features = caption_features(table)
                for name in CAPTION_COLUMNS:
                    table = table.append_column(FULL_SCHEMA.field(name), features.column(name))
                writer.write_table(table.select(FULL_SCHEMA.names))
                rows += table.num_rows
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return source.name, rows, time.perf_counter() - start


def join_caption_features(published_files: Sequence[Path], out_dir: str | os.PathLike, processes: int = 2,
                          log: Callable[[str], None] = print, engine: Engine = Engine()) -> dict:
    """Write `<out_dir>/<stem>.parquet` (published columns + caption features) and link `<stem>.npz` for every
    published parquet; returns counts and timings (files, written, skipped, rows, seconds, rows_per_second)."""
    if not published_files:
        raise FileNotFoundError("no published metadata files; materialize pool_index first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for source in published_files:
        validate_metadata(source)  # a malformed file fails here, naming it, before hours of work
    tasks = [(str(s), str(out_dir / s.name)) for s in published_files if not _is_done(out_dir / s.name)]
    skipped = len(published_files) - len(tasks)
    if skipped:
        log(f"pool_metadata: {skipped} of {len(published_files)} files already written, skipped")
    start, rows = time.perf_counter(), 0
    results = engine.map_unordered(_join_file, tasks, processes, step=Asset.POOL_METADATA)
    for count, (name, n, seconds) in enumerate(results, 1):
        rows += n
        log(f"pool_metadata: {name}: {n:,} rows, {n / max(seconds, 1e-9):,.0f} rows/s [{count}/{len(tasks)}]")
    embeddings = sum(link_embeddings(s, out_dir / s.name) for s in published_files)
    seconds = time.perf_counter() - start
    return {"files": len(published_files), "written": len(tasks), "skipped": skipped, "rows_computed": rows,
            "embedding_files": embeddings, "seconds": seconds, "rows_per_second": rows / seconds if rows else 0.0}
