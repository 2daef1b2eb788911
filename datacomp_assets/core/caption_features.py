"""Caption features of a metadata set (plain Python; no Dagster): fastText lid.176 `language` and
`language_score`, CLD3 `cld3_language`, and `num_words`, `num_chars`, `num_tokens` (metadata schema's EXTRA_COLUMNS).

Two ways to compute them:
- `CaptionFeatureStore`: on demand. A rule that reads a column asks for it on the rows that pass its cheaper
  conditions (the LAION-2B filter's CLD3 only where the CLIP score passes, as the reference does); the values
  are kept, one parquet part per metadata file and request, under `<store>/<group>/`, and rows already there are
  never computed again. Each part names its rows by the metadata file's number in the pool and the row's number in
  the file (`_file_index`, `_row_number`, as DuckDB numbers them), and filters join the groups on those two
  integers: a join on uid strings held 2.1 GB at 12.8M rows.
- `compute_caption_features`: every column for every row, `<out_dir>/<stem>.parquet` per metadata file
  (benchmarks and the cluster's throughput check).

Files are mapped over a process pool or a Ray cluster's tasks, one file per task. Each output is written under a
temporary name and renamed, so a reader never sees a partial file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core.engine import Engine
from datacomp_assets.core.files import replace_atomically, write_parquet_atomically
from datacomp_assets.core.integrity import record_table, require_valid, table_record, value_problems
from datacomp_assets.core.lineage import manifest_differences
from datacomp_assets.core.schema import EXTRA_COLUMNS
from datacomp_assets.core.language import caption_stats, identify_languages, identify_languages_cld3
from datacomp_assets.core.locks import waiting_for

# Column groups, each computed by one pass over the captions, cheapest first.
GROUPS: dict[str, tuple[str, ...]] = {
    "counts": ("num_words", "num_chars", "num_tokens"),
    "fasttext": ("language", "language_score"),
    "cld3": ("cld3_language",),
}
CAPTION_COLUMNS = ("language", "language_score", "cld3_language", "num_words", "num_chars", "num_tokens")


def feature_schema(cld3: bool = True) -> pa.Schema:
    """uid plus the caption feature columns, typed as in EXTRA_COLUMNS."""
    return _schema([c for c in CAPTION_COLUMNS if cld3 or c != "cld3_language"])


def _schema(names) -> pa.Schema:
    return pa.schema([pa.field("uid", pa.string())] + [EXTRA_COLUMNS.field(name) for name in names])


# A store part's row numbering: the metadata file's number in the pool (name order), the row's in the file.
ROW_COLUMNS = (pa.field("_file_index", pa.int64()), pa.field("_row_number", pa.int64()))


def _part_schema(group: str) -> pa.Schema:
    schema = _schema(GROUPS[group])
    for column in ROW_COLUMNS:
        schema = schema.append(column)
    return schema


def group_features(group: str, text) -> dict[str, pa.Array]:
    """One group's columns for the captions `text` (Arrow strings), typed as in EXTRA_COLUMNS."""
    if group == "counts":
        values = caption_stats(text)
    elif group == "fasttext":
        values = dict(zip(GROUPS[group], identify_languages(text)))
    elif group == "cld3":
        values = {"cld3_language": identify_languages_cld3(text)}
    else:
        raise ValueError(f"unknown caption feature group {group!r}; known: {', '.join(GROUPS)}")
    return {name: pa.array(values[name], EXTRA_COLUMNS.field(name).type) for name in GROUPS[group]}


def caption_features(table: pa.Table, cld3: bool = True) -> pa.Table:
    """The features of one table with `uid` and `text` columns (rows in the same order)."""
    text = table.column("text")
    columns = {"uid": table.column("uid")}
    for group in GROUPS:
        if cld3 or group != "cld3":
            columns.update(group_features(group, text))
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


# ---------------------------------------------------------------- on demand

def _compute_part(task: tuple[str, str, str, object, int]) -> tuple[str, int, float]:
    """One metadata file's rows `rows` (ascending row numbers): uid, the group's columns and the rows' numbers (the
    file is the pool's `file_index`-th), to `target`."""
    source, target, group, rows, file_index = task
    start = time.perf_counter()
    table = pq.read_table(source, columns=["uid", "text"]).take(pa.array(rows))
    features = pa.table({"uid": table.column("uid"), **group_features(group, table.column("text")),
                         "_file_index": pa.array(np.full(len(rows), file_index, np.int64)),
                         "_row_number": pa.array(np.asarray(rows, np.int64))}, schema=_part_schema(group))
    require_valid(features, target, f"Not written: the rows of {source} hold a uid twice, or the language "
                                    "identifier gave a probability that is not a finite number in [0, 1].")
    write_parquet_atomically(features, Path(target))
    return Path(source).name, table.num_rows, time.perf_counter() - start


class CaptionFeatureStore:
    """Caption features computed on demand and kept: `<directory>/<group>/<metadata stem>.<part>.parquet`, each
    part holding uid and the group's columns for the rows one request computed.

    The store belongs to one pool: `pool.json` describes the metadata files it was computed from (names, rows,
    sizes, modification times), and a store whose pool changed is emptied before use; so is a group whose parts are
    not those its `_manifest.json` records (`core.integrity`). One writer per group at a
    time (a second waits), so a row is computed once even when two subsets ask at the same moment."""

    def __init__(self, directory: str | os.PathLike, engine: Engine = Engine(), processes: int = 2,
                 log: Callable[[str], None] = print):
        self.directory, self.engine, self.processes, self.log = Path(directory), engine, processes, log
        self.computed: list[dict] = []  # what this object's requests computed: group, rows, files, seconds
        self.file_numbers: dict[str, int] = {}  # the pool's metadata files by name: their numbers (`for_pool`)

    def group_dir(self, group: str) -> Path:
        return self.directory / group

    def has(self, group: str) -> bool:
        return any(self.group_dir(group).glob("*.parquet"))

    def parts(self, group: str) -> int:
        return len(list(self.group_dir(group).glob("*.parquet")))

    def for_pool(self, description: list[dict]) -> CaptionFeatureStore:
        """This store, emptied first if it was computed from other metadata files than those `description` lists."""
        self.file_numbers = {entry["name"]: i for i, entry in enumerate(description)}
        with waiting_for(self.directory / ".lock", "caption features (pool)", self.log):
            self._empty_unless(description)
        for group in GROUPS:
            with self.lock(group):
                self._empty_group_unless_recorded(group)
        return self

    def _empty_group_unless_recorded(self, group: str) -> None:
        """Empty a group whose parts are not those the store wrote (a part changed, added or missing, by its
        manifest; or, in a store written before manifests, a part with bad values), naming them: its features are
        then computed again on demand, never read. An older store's valid parts are recorded as they are."""
        directory = self.group_dir(group)
        if not self.has(group):
            return
        try:
            manifest = table_record(directory).get("manifest")
        except ValueError:  # an unreadable record: the parts cannot be trusted
            manifest = {}
        problems = (manifest_differences(directory, manifest, "*.parquet") if manifest is not None
                    else value_problems(directory)) or self._unnumbered(directory)
        if problems:
            self.log(f"caption features: {directory}: {'; '.join(problems[:5])}; emptying it, to compute again")
            shutil.rmtree(directory)
        elif manifest is None:
            record_table(directory, directory.glob("*.parquet"), {"group": group})

    @staticmethod
    def _unnumbered(directory: Path) -> list[str]:
        """Parts without their rows' numbers (written before the store joined on them): computed again."""
        names = {column.name for column in ROW_COLUMNS}
        old = [path.name for path in sorted(directory.glob("*.parquet"))
               if not names <= set(pq.read_schema(path).names)]
        return [f"{len(old)} parts (e.g. {old[0]}) have no row numbers, as the store wrote before"] if old else []

    def _empty_unless(self, description: list[dict]) -> None:
        record = self.directory / "pool.json"
        try:
            current = json.loads(record.read_text())
        except (OSError, ValueError):
            current = None
        if current != description:
            if any(self.has(group) for group in GROUPS):
                self.log(f"caption features: the pool's metadata changed; emptying {self.directory}")
            for group in GROUPS:
                shutil.rmtree(self.group_dir(group), ignore_errors=True)
            self.directory.mkdir(parents=True, exist_ok=True)
            replace_atomically(lambda tmp: tmp.write_text(json.dumps(description)), record)

    def covers(self, group: str, condition: str) -> bool:
        """Whether `group` is held for every row where `condition` holds (recorded by `record_cover`): checking
        it row by row is a join of the pool with the store, which costs more than the rule."""
        try:
            return condition in json.loads((self.group_dir(group) / "covers.json").read_text())
        except (OSError, ValueError):
            return False

    def record_cover(self, group: str, condition: str) -> None:
        """Record that every row where `condition` holds has `group` (the caller holds `lock(group)`)."""
        path = self.group_dir(group) / "covers.json"
        try:
            covers = json.loads(path.read_text())
        except (OSError, ValueError):
            covers = []
        covers = [*covers, condition]
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(lambda tmp: tmp.write_text(json.dumps(covers)), path)

    def lock(self, group: str):
        return waiting_for(self.group_dir(group) / ".lock", f"caption features ({group})", self.log)

    def compute(self, group: str, rows_by_file: list[tuple[Path, object]]) -> dict:
        """Compute `group` for the given rows of each metadata file (ascending row numbers) and add them to the
        store as new parts. The caller holds `lock(group)` and asks only for rows the store lacks."""
        directory = self.group_dir(group)
        directory.mkdir(parents=True, exist_ok=True)
        existing = {path.name for path in directory.glob("*.parquet")}
        tasks = []
        for source, rows in rows_by_file:
            if len(rows):
                if source.name not in self.file_numbers:
                    raise ValueError(f"caption features ({group}): {source} is not a file of the pool this store "
                                     "was opened for (call `for_pool` with the pool's files first)")
                part = next(k for k in range(len(existing) + 1) if f"{source.stem}.{k}.parquet" not in existing)
                tasks.append((str(source), str(directory / f"{source.stem}.{part}.parquet"), group, rows,
                              self.file_numbers[source.name]))
        total = sum(len(task[3]) for task in tasks)
        start, done = time.perf_counter(), 0
        if total:
            self.log(f"caption features: {group} ({', '.join(GROUPS[group])}) for {total:,} rows of "
                     f"{len(tasks)} files")
        for count, (name, n, seconds) in enumerate(
                self.engine.map_unordered(_compute_part, tasks, self.processes, f"caption features ({group})"), 1):
            done += n
            self.log(f"caption features: {group}: {name}: {n:,} rows, {n / max(seconds, 1e-9):,.0f} rows/s "
                     f"[{count}/{len(tasks)}]")
        if tasks:  # the parts' manifest, which `for_pool` checks (only the new parts are hashed)
            record_table(directory, directory.glob("*.parquet"), {"group": group})
        summary = {"group": group, "rows": done, "files": len(tasks), "seconds": time.perf_counter() - start}
        if done:
            self.computed.append(summary)
        return summary
