"""Ask again for the samples of finished shards that failed for a reason that may pass (img2dataset #395).

A shard's parquet holds each sample's `status` and `error_message`. The samples that failed with a retryable
error (a timeout, an HTTP 5xx, 408 or 429, a refused, reset or dropped connection) are fetched again by
img2dataset, into temporary shards of their own; what comes back is merged into the original shards in
img2dataset's own format: the parquet keeps its rows in their order (a retried row replaced where it was), the tar
holds the successes in that same order (the kept members copied byte for byte, a recovered sample's members named
with its original key), and `_stats.json` counts the merged rows. Every other sample, a success or a permanent
failure (404, bytes that do not decode, a hash mismatch), is left as it is and never fetched again.

Each merged shard is written under `_retry/commit/` (the shards folder's file system) and marked ready once whole;
when every merged shard of the pass is ready, they are renamed into place, the `_stats.json` last. A retry cut off
before that leaves the shards as they were; `finish_interrupted_merges` (run before anything reads the folder)
completes the renames of one cut off after, so no shard is left a mixture of the two. A shard in which nothing
changed (every retry failed as before) is not rewritten.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datacomp_assets.core.shards import STATS_SUFFIX

RETRY_DIR = "_retry"  # inside the shards folder: the same file system, so merged files rename into place
RETRYABLE = re.compile(
    r"http error (5\d\d|408|429)\b|timed out|timeout|connection (refused|reset|aborted)|remote end closed"
    r"|temporary failure in name resolution|network is unreachable|no route to host|incompleteread|broken pipe",
    re.IGNORECASE)
PARQUET_ROW_GROUP = 100  # img2dataset's BufferedParquetWriter flushes every 100 rows


def is_retryable(error_message: str | None) -> bool:
    """Whether a failure may pass if asked again (the host or the network had a bad moment)."""
    return bool(error_message) and RETRYABLE.search(error_message) is not None


@dataclass
class RetryReport:
    """What a retry pass did: samples asked again, how many came back, and why the rest still failed."""

    retried: int = 0
    recovered: int = 0
    retried_by_kind: dict[str, int] = field(default_factory=dict)  # the first failure's kind -> samples
    still_failed_by_kind: dict[str, int] = field(default_factory=dict)  # the retry's failure kind -> samples
    shards_merged: int = 0

    @property
    def still_failed(self) -> int:
        return sum(self.still_failed_by_kind.values())

    def line(self) -> str:
        def kinds(counts: dict[str, int]) -> str:
            return ", ".join(f"{k} {n}" for k, n in counts.items())

        if not self.retried:
            return "no failed download was retryable"
        still = f" ({kinds(self.still_failed_by_kind)})" if self.still_failed else ""
        return (f"retried {self.retried} failed downloads ({kinds(self.retried_by_kind)}): {self.recovered} "
                f"recovered, {self.still_failed} still failed{still}")


def stats_path(shard: Path) -> Path:
    return shard.with_name(shard.name + STATS_SUFFIX)


def retryable_rows(shard: Path) -> pa.Table:
    """uid, key and error_message of the shard's samples whose failure may pass (`shard` is `dir/NNNNNNNN`)."""
    table = pq.read_table(shard.with_suffix(".parquet"), columns=["uid", "key", "status", "error_message"])
    failed = pc.not_equal(table.column("status"), "success")
    table = table.filter(pc.fill_null(failed, True))
    keep = [is_retryable(m) for m in table.column("error_message").to_pylist()]
    return table.filter(pa.array(keep, pa.bool_())).select(["uid", "key", "error_message"])


def write_retry_index(index_parquet: Path, uids: list[str], out: Path) -> None:
    """The index's rows of `uids`, every column kept and in `uids`' order, streamed so a big index stays on disk."""
    wanted = pa.array(uids, pa.string())
    parts = []
    for batch in pq.ParquetFile(index_parquet).iter_batches(batch_size=65_536):
        rows = pa.Table.from_batches([batch])
        parts.append(rows.filter(pc.is_in(rows.column("uid"), value_set=wanted)))
    found = pa.concat_tables(parts) if parts else pq.read_schema(index_parquet).empty_table()
    if found.num_rows != len(uids) or len(set(found.column("uid").to_pylist())) != len(uids):
        raise ValueError(f"{index_parquet}: of the {len(uids)} failed samples to retry, not each is one row of "
                         "this index (it changed since the shards were downloaded?); to keep the shards as they are, "
                         "set the downloader resource's retry_failed to false")
    position = {uid: i for i, uid in enumerate(found.column("uid").to_pylist())}
    pq.write_table(found.take(pa.array([position[u] for u in uids], pa.int64())), out)


class RetriedSamples:
    """The retry's shards, read one at a time: each uid's parquet row and tar members (`uid_shard` tells which)."""

    def __init__(self, folder: Path, uid_shard: dict[str, str]):
        self.folder, self.uid_shard = folder, uid_shard
        self._loaded: tuple[str, dict[str, dict], dict[str, list[tuple[tarfile.TarInfo, bytes]]]] | None = None

    def get(self, uid: str) -> tuple[dict, list[tuple[tarfile.TarInfo, bytes]]] | None:
        """(parquet row, tar members) of a retried sample; None when its retry shard did not finish."""
        name = self.uid_shard[uid]
        if self._loaded is None or self._loaded[0] != name:
            self._loaded = self._load(name)
        _, rows, members = self._loaded
        row = rows.get(uid)
        if row is None or (row["status"] == "success" and not members.get(row["key"])):
            return None
        return row, members.get(row["key"], [])

    def _load(self, name: str):
        stem = self.folder / name
        if not stats_path(stem).exists():
            return name, {}, {}
        rows = {r["uid"]: r for r in pq.read_table(stem.with_suffix(".parquet")).to_pylist()}
        members: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
        with tarfile.open(stem.with_suffix(".tar")) as tar:
            for info in tar:
                if info.isfile():
                    members.setdefault(info.name.partition(".")[0], []).append((info, tar.extractfile(info).read()))
        return name, rows, members


def renamed_members(members: list[tuple[tarfile.TarInfo, bytes]], key: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    """A retried sample's tar members under its original key (its json's "key" too), headers otherwise as written."""
    out = []
    for info, data in members:
        ext = info.name.partition(".")[2]
        if ext == "json":  # img2dataset writes json.dumps(meta, indent=4); only the key differs
            data = json.dumps({**json.loads(data), "key": key}, indent=4).encode()
        renamed = tarfile.TarInfo(f"{key}.{ext}")
        renamed.size, renamed.mtime, renamed.mode = len(data), info.mtime, info.mode
        renamed.uname, renamed.gname = info.uname, info.gname
        out.append((renamed, data))
    return out


def original_members(tar: tarfile.TarFile) -> dict[str, list[tarfile.TarInfo]]:
    members: dict[str, list[tarfile.TarInfo]] = {}
    for info in tar:
        if info.isfile():
            members.setdefault(info.name.partition(".")[0], []).append(info)
    return members


def stats_of(rows: list[dict], original: dict) -> dict:
    """`_stats.json` of the merged rows: the counts and status_dict recomputed, the first download's times kept."""
    status = Counter("success" if r["status"] == "success" else r["error_message"] for r in rows)
    return {**original, "count": len(rows), "successes": status.get("success", 0),
            "failed_to_download": sum(r["status"] == "failed_to_download" for r in rows),
            "failed_to_resize": sum(r["status"] == "failed_to_resize" for r in rows),
            "status_dict": dict(status)}


def merged_rows(shard: Path, table: pa.Table, retried: RetriedSamples) -> tuple[list[dict], dict, Counter[str]]:
    """The shard's rows with each retried one replaced by what its retry gave (under the original key), the
    recovered samples' tar members by key, and the retried rows' outcomes ("success" or the error message)."""
    rows, recovered, outcomes = table.to_pylist(), {}, Counter()
    for i, row in enumerate(rows):
        again = retried.get(row["uid"]) if row["uid"] in retried.uid_shard else None
        if again is None:
            continue
        new_row, members = again
        if set(new_row) != set(table.schema.names):
            raise ValueError(f"{shard}.parquet has other columns than its retry ({sorted(new_row)}): it was not "
                             "downloaded from this index with these settings; to keep it as it is, set the downloader "
                             "resource's retry_failed to false")
        outcomes["success" if new_row["status"] == "success" else new_row["error_message"]] += 1
        rows[i] = {**new_row, "key": row["key"]}
        if new_row["status"] == "success":
            recovered[row["key"]] = renamed_members(members, row["key"])
    return rows, recovered, outcomes


def write_merged_tar(shard: Path, rows: list[dict], recovered: dict, out: Path) -> None:
    """The successes' members in the rows' order: a kept sample's copied as they are, a recovered one's as retried."""
    with tarfile.open(shard.with_suffix(".tar")) as source, \
            tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as merged:  # webdataset's TarWriter format
        kept = original_members(source)
        for row in rows:
            if row["key"] in recovered:
                for info, data in recovered[row["key"]]:
                    merged.addfile(info, io.BytesIO(data))
            elif row["status"] == "success":
                for info in kept.get(row["key"], []):
                    merged.addfile(info, source.extractfile(info))


def merge_shard(shard: Path, retried: RetriedSamples, commit_dir: Path) -> tuple[Counter[str], bool]:
    """Write the shard merged with its retried samples into `commit_dir` and mark it ready, unless no row changed;
    return the retried rows' outcomes and whether it was written."""
    table = pq.read_table(shard.with_suffix(".parquet"))
    rows, recovered, outcomes = merged_rows(shard, table, retried)
    if rows == table.to_pylist():  # every retry failed as before: the shard stays as it is
        return outcomes, False
    write_merged_tar(shard, rows, recovered, commit_dir / f"{shard.name}.tar")
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), commit_dir / f"{shard.name}.parquet",
                   row_group_size=PARQUET_ROW_GROUP)
    original_stats = json.loads(stats_path(shard).read_text())
    (commit_dir / stats_path(shard).name).write_text(json.dumps(stats_of(rows, original_stats), indent=4))
    _sync_files(commit_dir, shard.name)
    (commit_dir / f"{shard.name}.ready").touch()
    return outcomes, True


def _sync_files(folder: Path, name: str) -> None:
    """Flush the merged files to disk before they are marked ready (a power cut must not leave a ready husk)."""
    for path in (folder / f"{name}.tar", folder / f"{name}.parquet", folder / f"{name}{STATS_SUFFIX}"):
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _merged_names(name: str) -> tuple[str, str, str]:
    # the stats file last: it is what marks a shard finished
    return f"{name}.tar", f"{name}.parquet", f"{name}{STATS_SUFFIX}"


def commit(commit_dir: Path, out_dir: Path, name: str) -> None:
    """Rename a ready merged shard into place (each file that is still waiting), then drop its mark."""
    for file_name in _merged_names(name):
        if (commit_dir / file_name).exists():
            os.replace(commit_dir / file_name, out_dir / file_name)
    (commit_dir / f"{name}.ready").unlink()


def finish_interrupted_merges(out_dir: str | Path) -> list[str]:
    """Complete what a retry cut off: rename every shard it had merged and marked ready into place, and remove its
    work folder (a merge not yet ready is dropped: its shard is still the original). Returns the shards completed."""
    out_dir = Path(out_dir)
    work = out_dir / RETRY_DIR
    if not work.exists():
        return []
    commit_dir = work / "commit"
    done = sorted(p.stem for p in commit_dir.glob("*.ready")) if commit_dir.exists() else []
    for name in done:
        commit(commit_dir, out_dir, name)
    shutil.rmtree(work)
    return done


def retry_failed(index_parquet: str | Path, out_dir: str | Path, shards: list[str], shard_size: int,
                 name_digits: int, fetch: Callable[[Path, Path, int], None],
                 kind_of: Callable[[str], str]) -> RetryReport:
    """Fetch again the retryable failures of the finished `shards` (their names, `NNNNNNNN`) and merge them in.

    `fetch(url_list_parquet, folder, expected_shards)` downloads a url list into img2dataset shards of
    `shard_size` rows named with `name_digits` digits; `kind_of` names an error message's failure kind."""
    out_dir = Path(out_dir)
    finish_interrupted_merges(out_dir)
    report = RetryReport()
    todo = {name: retryable_rows(out_dir / name) for name in shards}
    todo = {name: rows for name, rows in todo.items() if rows.num_rows}
    uids = [uid for rows in todo.values() for uid in rows.column("uid").to_pylist()]
    if not uids:
        return report
    report.retried = len(uids)
    report.retried_by_kind = dict(Counter(kind_of(m) for rows in todo.values()
                                          for m in rows.column("error_message").to_pylist()))
    work = out_dir / RETRY_DIR
    (work / "commit").mkdir(parents=True)
    write_retry_index(Path(index_parquet), uids, work / "urls.parquet")
    expected = -(-len(uids) // shard_size)
    fetch(work / "urls.parquet", work / "shards", expected)
    # img2dataset cuts the url list into shards of shard_size rows in order: the uid at position i is in shard i // n
    uid_shard = {uid: f"{i // shard_size:0{name_digits}d}" for i, uid in enumerate(uids)}
    retried = RetriedSamples(work / "shards", uid_shard)
    still: Counter[str] = Counter()
    merged = []
    for name in todo:
        outcomes, written = merge_shard(out_dir / name, retried, work / "commit")
        report.recovered += outcomes.pop("success", 0)
        for message, n in outcomes.items():
            still[kind_of(message)] += n
        merged += [name] if written else []
    for name in merged:  # only once every merged shard is ready: a cut-off retry is then finished, not redone
        commit(work / "commit", out_dir, name)
    report.shards_merged = len(merged)
    shutil.rmtree(work)
    # a sample whose retry shard never finished keeps its first failure
    unanswered = report.retried - report.recovered - sum(still.values())
    if unanswered:
        still["not_retried"] = unanswered
    report.still_failed_by_kind = dict(still.most_common())
    return report


def finished_shards(out_dir: str | Path) -> list[str]:
    """The names (`NNNNNNNN`) of the shards img2dataset finished in `out_dir` (those with a `_stats.json`)."""
    names = (p.name.removesuffix(STATS_SUFFIX) for p in sorted(Path(out_dir).glob(f"*{STATS_SUFFIX}")))
    return [name for name in names if name.isdigit()]
