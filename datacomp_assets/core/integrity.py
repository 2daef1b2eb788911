"""Tables of per-sample values trusted by content, not size (plain Python; no Dagster).

Every table a rule reads (pool metadata, caption features, pool features, image scores, external sources) is a
directory of parquet files, checked in two ways:
- its values, when written (and when read, where no check was recorded): each uid once, every floating-point
  value a finite number, scores within their range (`table_problems`);
- its bytes, before every read, against the manifest recorded when it was written (size, modification time and
  sha256 of each file, in the directory's `_manifest.json`; pool_metadata's, with the pool's version, in its
  lineage.json). A file of the recorded size and time is not read again, so the check costs a stat per file; one
  whose time changed (a same-size rewrite sets it) is hashed again (`lineage.manifest_differences`).
A file that fails is named with what is wrong, and its writer, materialized again, recomputes it instead of
keeping it (`RecordedTable.reason_to_redo`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datacomp_assets.core.files import replace_atomically
from datacomp_assets.core.lineage import (
    file_manifest, file_sha256, manifest_differences, read_lineage, stat_unchanged, verified_version)
from datacomp_assets.core.scorers import IMAGE_SCORERS, image_score_column
from datacomp_assets.core.uid_index import UidIndex
from datacomp_assets.core.uids import array_to_uids

MANIFEST_FILE = "_manifest.json"  # a table's record of its files, beside them
# A record's key saying that the values of its manifest's files were checked when they were written
# (a record without it was written before values were checked: its files' values are checked when read).
VALUES_CHECKED = "values_checked"

# Columns with a known range: cosines of unit embeddings, and probabilities. Every other floating-point column of
# a per-sample table must hold finite numbers.
COSINE, PROBABILITY = (-1.0, 1.0), (0.0, 1.0)
VALUE_RANGES: dict[str, tuple[float, float]] = {
    "clip_b32_similarity_score": COSINE, "clip_l14_similarity_score": COSINE,
    **{image_score_column(scorer): COSINE for scorer in IMAGE_SCORERS},
    "semdedup_max_similarity": COSINE, "language_score": PROBABILITY, "text_area_share": PROBABILITY,
    "metaclip_keep_probability": PROBABILITY, "metaclip_draw": PROBABILITY,
}
SLACK = 0.01  # rounding: the published cosines are of float16 embeddings


def table_problems(table: pa.Table) -> list[str]:
    """What is wrong with a table's values (empty when nothing is): a missing or repeated uid, a floating-point
    value that is not a finite number (NaN, infinite or missing), a score outside its range."""
    problems = []
    if "uid" in table.column_names:
        uid = table.column("uid")
        if uid.null_count:
            problems.append(f"{uid.null_count:,} rows have no uid")
        counts = pc.value_counts(uid.drop_null())
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))
        if len(repeated):
            example = repeated[0].as_py()
            problems.append(f"{_uids_appear(len(repeated))} more than once (uid {example['values']} "
                            f"{example['counts']} times)")
    for field in table.schema:
        if not pa.types.is_floating(field.type):
            continue
        values = table.column(field.name).to_numpy()  # nulls become NaN
        finite = np.isfinite(values)
        if not finite.all():
            problems.append(f"{int((~finite).sum()):,} {field.name} values are not finite numbers "
                            "(NaN, infinite or missing)")
        if field.name in VALUE_RANGES:
            low, high = VALUE_RANGES[field.name]
            outside = finite & ((values < low - SLACK) | (values > high + SLACK))
            if outside.any():
                problems.append(f"{int(outside.sum()):,} {field.name} values lie outside [{low:g}, {high:g}] "
                                f"(e.g. {values[outside][0]:g})")
    return problems


def _uids_appear(n: int) -> str:
    return "1 uid appears" if n == 1 else f"{n:,} uids appear"


def file_problems(path: str | os.PathLike) -> list[str]:
    """`table_problems` of one parquet file (its uid and floating-point columns only), or why it cannot be read."""
    try:
        schema = pq.read_schema(path)
        columns = [f.name for f in schema if f.name == "uid" or pa.types.is_floating(f.type)]
        return table_problems(pq.read_table(path, columns=columns))
    except (OSError, pa.ArrowException) as err:
        return [f"is not a readable parquet file ({str(err).splitlines()[0] if str(err) else type(err).__name__})"]


def require_valid(table: pa.Table, where: str, what_to_do: str) -> None:
    """Refuse to write a table whose values are wrong: ValueError naming `where`, what is wrong and what to do."""
    problems = table_problems(table)
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}. {what_to_do}")


def require_unique_pool(index: UidIndex, what_to_do: str) -> None:
    """Refuse a pool in which a uid appears more than once (in one file or two): ValueError naming the uid, the two
    rows and `what_to_do`. Counted by the index's merge, or one linear pass over its sorted uids in chunks."""
    repeats, first = index.repeats()
    if not repeats:
        return
    rows = np.flatnonzero(np.isin(index.rank, [first - 1, first]))  # the pool rows of the first pair
    where = [f"{index.files[f].name} row {row - index.starts[f]}" for row in rows
             for f in [int(np.searchsorted(index.starts, row, side="right")) - 1]]
    raise ValueError(f"{index.files[0].parent}: {_uids_appear(repeats)} more than once in the pool (uid "
                     f"{array_to_uids(index.sorted_uids[first:first + 1])[0]} in {' and '.join(where)}). {what_to_do}")


class RecordedTable:
    """A directory of parquet files as its writer last recorded it: which of the files there may be kept."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        record = _record_or_nothing(self.directory)
        self.manifest: dict[str, dict] = record.get("manifest") or {}
        self.values_checked = bool(record.get(VALUES_CHECKED))

    def unchanged(self, path: str | os.PathLike) -> bool:
        """Whether the file is recorded, with its values checked, at its present size and modification time."""
        entry = self.manifest.get(Path(path).name)
        return entry is not None and self.values_checked and stat_unchanged(entry, Path(path).stat())

    def reason_to_redo(self, path: str | os.PathLike) -> str | None:
        """None when the file may be kept: its content is the one recorded, or, where none was recorded (a run
        interrupted before it recorded its files), its values pass. Otherwise why it must be written again."""
        path = Path(path)
        entry = self.manifest.get(path.name)
        if entry is not None:
            stat = path.stat()
            if not (stat_unchanged(entry, stat) or (stat.st_size == entry["size"]
                                                    and file_sha256(path) == entry["sha256"])):
                return "its content changed since it was recorded"
            if self.values_checked:
                return None
        problems = file_problems(path)
        return "; ".join(problems) if problems else None


def table_record(directory: str | os.PathLike) -> dict:
    """What a table's writer recorded of its files: `_manifest.json` (a name pyarrow's dataset reader skips, as it
    reads every other file of a directory), or, where the writer records the table's version with its files
    (pool_metadata), its lineage.json; {} where neither was written."""
    path = Path(directory) / MANIFEST_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return read_lineage(directory)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); materialize the asset that wrote it again") from None


def _record_or_nothing(directory: Path) -> dict:
    # A writer treats an unreadable record as none (every file there is then checked), so that materializing
    # again needs no file deleted by hand; a reader refuses it.
    try:
        return table_record(directory)
    except ValueError:
        return {}


def recorded_manifest(directory: str | os.PathLike) -> dict[str, dict]:
    """The manifest a writer last recorded in `directory` ({} where none, or the record is unreadable)."""
    return _record_or_nothing(Path(directory)).get("manifest") or {}


def record_table(directory: str | os.PathLike, files: Iterable[str | os.PathLike], record: dict | None = None) -> dict:
    """Record the files' manifest (hashing only those written since the last record) in `directory`'s
    `_manifest.json`, with `record`'s other fields, as files whose values were checked when written; returns it."""
    directory = Path(directory)
    manifest = file_manifest(sorted(files), recorded=recorded_manifest(directory))
    text = json.dumps({**(record or {}), "manifest": manifest, VALUES_CHECKED: True}, indent=2, sort_keys=True)
    replace_atomically(lambda tmp: tmp.write_text(text + "\n"), directory / MANIFEST_FILE)
    return manifest


def check_and_record_table(directory: str | os.PathLike, what_to_do: str, record: dict | None = None) -> dict:
    """For a writer that does not check each file as it writes it: every file's values (ValueError naming those that
    fail, and `what_to_do`), then `record_table`."""
    _refuse(directory, value_problems(directory), what_to_do)
    return record_table(directory, Path(directory).glob("*.parquet"), record)


def verify_table(directory: str | os.PathLike, what_to_do: str, pattern: str = "*.parquet") -> None:
    """Before a table is read: ValueError naming each file that is not the one recorded (missing, added, rewritten),
    or, where no record says its values were checked, each file whose values are wrong; then `what_to_do`."""
    record = table_record(directory)
    manifest = record.get("manifest")
    problems = manifest_differences(directory, manifest, pattern) if manifest is not None else []
    _refuse(directory, problems or ([] if record.get(VALUES_CHECKED) else value_problems(directory, pattern)),
            what_to_do)


def verified_values_version(directory: str | os.PathLike, what_to_do: str, pattern: str = "*.parquet") -> str:
    """`lineage.verified_version` (the files are those of the recorded version), and, where the record does not say
    their values were checked when written (an older record), their values."""
    version = verified_version(directory, pattern, what_to_do)
    if not read_lineage(directory).get(VALUES_CHECKED):
        _refuse(directory, value_problems(directory, pattern), what_to_do)
    return version


def value_problems(directory: str | os.PathLike, pattern: str = "*.parquet") -> list[str]:
    """`file_problems` of each file of `directory`, as "<name>: <problems>"."""
    return [f"{path.name}: {'; '.join(found)}" for path in sorted(Path(directory).glob(pattern))
            if (found := file_problems(path))]


def _refuse(directory, problems: list[str], what_to_do: str) -> None:
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{directory}: {shown}. {what_to_do}")
