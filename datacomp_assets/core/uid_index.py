"""The pool's uids, sorted once: a rule's kept rows become a sorted subset without sorting or parsing uids.

Written beside the metadata (`<metadata_dir>/uid_index/`) when the metadata is written:
- `uids.npy`: every uid of the pool as `u8,u8`, sorted as a subset file is;
- `rank.npy`: for each row of the pool (files in name order, rows in file order), its position in `uids.npy`;
- `files.json`: each parquet file's name, rows, size and modification time, so a stale index is never used.

A rule then returns (file index, row number) pairs, two integer columns DuckDB reads for free; marking their
positions in a boolean mask and taking `uids[mask]` gives the sorted subset in one linear pass. At `small`
(12.8M rows) the index is 256 MB and takes about 5 s to write, once; the parsing and sorting it saves (3.5 s) was
paid on every rule.

The index is built by an external merge, so its memory does not grow with the pool (medium's 128M rows would take
3 GB sorted in memory): each file's uids are sorted on their own and written to disk as a run, the runs are merged
in rounds of a bounded number of rows straight into `uids.npy`, and each file's ranks are then scattered from what
the merge recorded. Equal uids (in one file or two) keep pool order, as a stable sort of the whole pool would.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core.files import replace_atomically, temporary_sibling
from datacomp_assets.core.uids import UID_DTYPE, arrow_uids_to_array, isin_sorted, sort_order

INDEX_DIR = "uid_index"
MERGE_ROWS = 1 << 21  # rows held by one merge round, over all runs together (about 150 MB with its sort)
CHUNK_ROWS = 1 << 20  # rows read at a time by the linear passes over the index


def describe_files(files: list[Path]) -> list[dict]:
    """Each file's name, rows, size and modification time: what an index (or a cache) was made from."""
    return [_describe(path) for path in files]


def _describe(path: Path) -> dict:
    stat = path.stat()
    return {"name": path.name, "rows": pq.read_metadata(path).num_rows, "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}


@dataclass(frozen=True)
class UidIndex:
    files: list[Path]          # the metadata's parquet files, in the order DuckDB's `file_index` numbers them
    starts: np.ndarray         # int64, len(files) + 1: each file's first row in pool order
    sorted_uids: np.ndarray    # u8,u8, sorted
    rank: np.ndarray           # per pool row, its position in sorted_uids
    # (number of positions p whose uid equals that of p - 1, the first such p), when the merge counted them
    repeats_counted: tuple[int, int] | None = field(default=None, compare=False)

    @property
    def rows(self) -> int:
        return len(self.sorted_uids)

    def subset(self, rows: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """The sorted uids of the rows given as batches of (file index, row number) arrays; each row once, whatever
        the order or repeats of the pairs. Batches keep the temporary arrays small: a fresh array of the whole
        pool costs more in page faults than the lookups."""
        keep = np.zeros(self.rows, dtype=bool)
        for file_index, row_number in rows:
            keep[self.rank[self.starts[file_index] + row_number]] = True
        if keep.all():  # every row (no_filter): the index itself, read from its file, not copied
            return np.asarray(self.sorted_uids)
        return self.sorted_uids[keep]

    def repeats(self) -> tuple[int, int]:
        """(how many positions hold the same uid as the one before, the first such position; 0 when none)."""
        if self.repeats_counted is not None:
            return self.repeats_counted
        count, first = 0, 0
        for start in range(1, self.rows, CHUNK_ROWS):
            chunk = self.sorted_uids[start - 1:start + CHUNK_ROWS]
            same = np.flatnonzero(chunk[1:] == chunk[:-1])
            if len(same) and not count:
                first = start + int(same[0])
            count += len(same)
        return count, first

    def pool_rows(self, uids: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """For sorted distinct uids, the pool rows that hold one of them, file by file: (file index, ascending row
        numbers). Two linear passes over the index (its positions of the uids, then the ranks that are among them),
        so the memory is that of the uids and their positions, not of the pool."""
        positions = []
        for start in range(0, self.rows, CHUNK_ROWS):
            chunk = np.asarray(self.sorted_uids[start:start + CHUNK_ROWS])
            positions.append(start + np.flatnonzero(isin_sorted(chunk, uids)))
        kept = np.concatenate(positions) if positions else np.empty(0, np.int64)
        for f in range(len(self.files)):
            found = []
            for start in range(self.starts[f], self.starts[f + 1], CHUNK_ROWS):
                ranks = np.asarray(self.rank[start:min(start + CHUNK_ROWS, self.starts[f + 1])])
                at = np.minimum(np.searchsorted(kept, ranks), max(len(kept) - 1, 0))
                hit = kept[at] == ranks if len(kept) else np.zeros(len(ranks), dtype=bool)
                found.append(start - self.starts[f] + np.flatnonzero(hit))
            rows = np.concatenate(found) if found else np.empty(0, np.int64)
            if len(rows):
                yield f, rows


def metadata_parquet(metadata_dir: str | os.PathLike) -> list[Path]:
    files = sorted(Path(metadata_dir).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {metadata_dir}")
    return files


def _file_uids(path: Path) -> np.ndarray:
    try:
        column = pq.read_table(path, columns=["uid"]).column("uid")
        return arrow_uids_to_array(column.combine_chunks()) if len(column) else np.empty(0, UID_DTYPE)
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise ValueError(f"{path}: cannot read its uids: {err}") from None


def _npy_header(dtype: np.dtype, rows: int) -> bytes:
    """The header np.save writes for a 1-d array of `rows` of `dtype`, so the streamed file has its bytes."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows,)})
    return buffer.getvalue()


class _Run:
    """One file's uids, sorted (stably: equal uids in row order), on disk: `uids` and their row numbers `rows`;
    `positions` receives, in run order, where the merge put each."""

    def __init__(self, directory: Path, number: int, uids: np.ndarray):
        self.stem, self.length, self.done = directory / f"{number:06d}", len(uids), 0
        order = sort_order(uids)
        uids[order].tofile(self.stem.with_suffix(".uids"))
        order.astype(np.int64).tofile(self.stem.with_suffix(".rows"))
        self.stem.with_suffix(".positions").touch()

    def window(self, rows: int) -> np.ndarray:
        """The next `rows` (or fewer) uids not yet merged, read from the file (not memory-mapped: pages of a map
        would stay resident, and count, until the map is closed)."""
        count = min(rows, self.length - self.done)
        return np.fromfile(self.stem.with_suffix(".uids"), UID_DTYPE, count, offset=self.done * UID_DTYPE.itemsize)


def _count_before(window: np.ndarray, hi: int, lo: int, inclusive: bool) -> int:
    """How many uids of the sorted `window` are below (hi, lo), or at most it when `inclusive`."""
    side = "right" if inclusive else "left"
    a, b = np.searchsorted(window["f0"], hi, "left"), np.searchsorted(window["f0"], hi, "right")
    return int(a + np.searchsorted(window["f1"][a:b], lo, side))


def _merge(runs: list[_Run], out, rank_dtype: np.dtype, budget: int) -> tuple[int, int]:
    """Write the runs' uids in order to `out` and each run's output positions to its `positions` file; returns
    (repeats, first repeat) as `UidIndex.repeats`.

    Each round reads a window of every unfinished run and writes every uid at most the smallest window end: those
    are all the pool's uids before it, since every run is sorted. A tie is broken by run (file) number, which with
    the stable sort within a run keeps equal uids in pool order."""
    written, repeats, first, last = 0, 0, 0, None
    while True:
        active = [run for run in runs if run.done < run.length]
        if not active:
            return repeats, first
        size = max(1, budget // len(active))
        windows = [run.window(size) for run in active]
        # the smallest window end, with the run's number breaking ties (the run it ends is taken whole)
        end = min(range(len(active)), key=lambda i: (int(windows[i]["f0"][-1]), int(windows[i]["f1"][-1]), i))
        hi, lo = int(windows[end]["f0"][-1]), int(windows[end]["f1"][-1])
        taken = [len(w) if i == end else _count_before(w, hi, lo, inclusive=i < end) for i, w in enumerate(windows)]
        batch = np.concatenate([w[:t] for w, t in zip(windows, taken)])
        order = sort_order(batch)  # stable: equal uids stay in run order
        merged = batch[order]
        out.write(merged.tobytes())
        where = np.empty(len(batch), dtype=rank_dtype)
        where[order] = np.arange(written, written + len(batch), dtype=rank_dtype)
        offset = 0
        for run, t in zip(active, taken):
            with open(run.stem.with_suffix(".positions"), "ab") as positions:  # (a file held open per run
                where[offset:offset + t].tofile(positions)                     # could pass the open-file limit)
            run.done, offset = run.done + t, offset + t
        same = np.flatnonzero(merged[1:] == merged[:-1]) + 1
        if last is not None and len(merged) and merged[0] == last:
            same = np.concatenate([[0], same])
        if len(same) and not repeats:
            first = written + int(same[0])
        repeats += len(same)
        written, last = written + len(batch), (merged[-1] if len(merged) else last)


def _build_into(metadata_dir: str | os.PathLike, directory: Path, budget: int = MERGE_ROWS) -> UidIndex:
    """Build the index of the metadata's files into `directory` (`uids.npy`, `rank.npy`, each under a temporary
    name and renamed) and return it, memory-mapped; `files.json` is the caller's."""
    files = metadata_parquet(metadata_dir)
    work = temporary_sibling(directory / "runs")
    work.mkdir(parents=True)
    runs: list[_Run] = []
    try:
        for i, path in enumerate(files):
            runs.append(_Run(work, i, _file_uids(path)))
        starts = np.concatenate([[0], np.cumsum([run.length for run in runs])]).astype(np.int64)
        total = int(starts[-1])
        rank_dtype = np.dtype(np.int32 if total < 2**31 else np.int64)

        def write_uids(tmp: Path) -> None:
            nonlocal counted
            with open(tmp, "wb") as out:
                out.write(_npy_header(UID_DTYPE, total))
                counted = _merge(runs, out, rank_dtype, budget)

        def write_rank(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                out.write(_npy_header(rank_dtype, total))
                for run in runs:  # one file's ranks at a time
                    ranks = np.empty(run.length, dtype=rank_dtype)
                    ranks[np.fromfile(run.stem.with_suffix(".rows"), np.int64)] = np.fromfile(
                        run.stem.with_suffix(".positions"), rank_dtype)
                    out.write(ranks.tobytes())

        counted = (0, 0)
        replace_atomically(write_uids, directory / "uids.npy")
        replace_atomically(write_rank, directory / "rank.npy")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return UidIndex(files, starts, np.load(directory / "uids.npy", mmap_mode="r"),
                    np.load(directory / "rank.npy", mmap_mode="r"), counted)


def build_uid_index(metadata_dir: str | os.PathLike) -> UidIndex:
    """The index built now and written nowhere the pipeline reads (a temporary directory, removed at once: the
    arrays stay mapped), for a pool whose written index is stale."""
    with tempfile.TemporaryDirectory(prefix="uid_index-") as directory:
        return _build_into(metadata_dir, Path(directory))


def write_uid_index(metadata_dir: str | os.PathLike, merge_rows: int = MERGE_ROWS) -> UidIndex:
    """Build the index and write it under `<metadata_dir>/uid_index/` (each file atomically; the description last,
    so a half-written index is never read as whole). `merge_rows`: the rows one merge round holds."""
    directory = Path(metadata_dir) / INDEX_DIR
    directory.mkdir(exist_ok=True)
    (directory / "files.json").unlink(missing_ok=True)
    index = _build_into(metadata_dir, directory, merge_rows)
    description = json.dumps(describe_files(index.files))
    replace_atomically(lambda tmp: tmp.write_text(description), directory / "files.json")
    return index


def load_uid_index(metadata_dir: str | os.PathLike) -> UidIndex | None:
    """The written index, or None when there is none or the parquet files changed since it was written."""
    directory = Path(metadata_dir) / INDEX_DIR
    files = metadata_parquet(metadata_dir)
    try:
        described = json.loads((directory / "files.json").read_text())
        if described != describe_files(files):
            return None
        sorted_uids = np.load(directory / "uids.npy", mmap_mode="r")
        rank = np.load(directory / "rank.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    starts = np.concatenate([[0], np.cumsum([d["rows"] for d in described])]).astype(np.int64)
    if sorted_uids.dtype != UID_DTYPE or len(sorted_uids) != starts[-1] or len(rank) != starts[-1]:
        return None
    return UidIndex(files, starts, sorted_uids, rank)


def uid_index(metadata_dir: str | os.PathLike) -> UidIndex:
    """The written index when it is current, else one built now (`build_uid_index`: nothing is written)."""
    return load_uid_index(metadata_dir) or build_uid_index(metadata_dir)
