"""Who's in and who's out: the share of the pool a subset keeps, broken down by groups.

For each dimension (language, caption length, image size, aspect ratio, and optionally a concept column and
the synthetic pool's ground truth) every pool row falls in one group; a group's row says how many pool rows
it has, how many the subset keeps, and their ratio. That shows what a filter excludes, e.g. "keeps 40% of
English captions but 2% of everything else".

One DuckDB query over the metadata parquet files does it all (GROUPING SETS: a single pass). The subset is
joined on the uid's two uint64 halves, computed in SQL, so no Python string is made per row. A uid repeated
in the subset (up-weighting) counts as kept once; `overall` reports the total with repeats separately.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core.uids import UID_DTYPE, sort_uids, unique_sorted

REQUIRED_COLUMNS = ("uid", "text", "original_width", "original_height")
TRUTH_COLUMNS = ("uid", "kind", "object")
TOP_GROUPS = 12  # categorical dimensions: the largest groups, then one OTHER row for the rest
OTHER, MISSING, NOT_COMPUTED = "(other)", "(missing)", "(not computed)"

# Ordered dimensions: (name, SQL label expression over the row alias `m`, labels in display order).
# least()/greatest() skip NULLs, so a missing width or height must be caught first.
_NO_SIZE = "m.original_width IS NULL OR m.original_height IS NULL"
_MIN_SIDE = "least(m.original_width, m.original_height)"
_MAX_SIDE = "greatest(m.original_width, m.original_height)"
_BUCKETED = [
    ("caption_words", f"""CASE WHEN {{words}} IS NULL THEN '{MISSING}' WHEN {{words}} = 0 THEN '0'
                               WHEN {{words}} <= 2 THEN '1-2' WHEN {{words}} <= 5 THEN '3-5'
                               WHEN {{words}} <= 10 THEN '6-10' ELSE '>10' END""",
     ["0", "1-2", "3-5", "6-10", ">10", MISSING]),
    ("image_min_side", f"""CASE WHEN {_NO_SIZE} THEN '{MISSING}' WHEN {_MIN_SIDE} < 100 THEN '<100'
                                WHEN {_MIN_SIDE} < 200 THEN '100-199' WHEN {_MIN_SIDE} < 400 THEN '200-399'
                                ELSE '>=400' END""",
     ["<100", "100-199", "200-399", ">=400", MISSING]),
    ("aspect_ratio", f"""CASE WHEN {_NO_SIZE} OR {_MIN_SIDE} <= 0 THEN '{MISSING}'
                              WHEN {_MAX_SIDE} <= 1.5 * {_MIN_SIDE} THEN '<=1.5'
                              WHEN {_MAX_SIDE} <= 3 * {_MIN_SIDE} THEN '1.5-3' ELSE '>3' END""",
     ["<=1.5", "1.5-3", ">3", MISSING]),
]
# Python's str.split() whitespace (the basic filter's word count) as an RE2 class: \s is ASCII-only in RE2.
_WORD = r"[^\s\p{Z}\x0b\x1c-\x1f\x85]+"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_path(path: str | os.PathLike) -> str:
    return "'" + os.fspath(path).replace("'", "''") + "'"


def _parquet_files(metadata_dir: str | os.PathLike, needed: list[str]) -> tuple[list[str], set[str]]:
    """The metadata parquet files, each checked (footer only) for the columns the audit reads, and the
    columns every file has."""
    files = sorted(glob.glob(os.path.join(glob.escape(os.fspath(metadata_dir)), "*.parquet")))
    if not files:
        raise FileNotFoundError(f"{metadata_dir}: no metadata parquet files")
    common = None
    for path in files:
        names = set(pq.read_schema(path).names)
        common = names if common is None else common & names
        missing = [c for c in needed if c not in names]
        if missing:
            raise ValueError(f"{path}: metadata lacks column(s) {', '.join(map(repr, missing))} "
                             f"needed by the filter audit (metadata dir {metadata_dir})")
    return files, common


def _kept_table(subset: np.ndarray) -> pa.Table:
    subset = np.asarray(subset)
    if subset.dtype != UID_DTYPE or subset.ndim != 1:
        raise ValueError(f"a subset must be a 1-d array of dtype {UID_DTYPE}, got {subset.dtype} {subset.shape}")
    unique = unique_sorted(sort_uids(subset))
    return pa.table({"hi": pa.array(unique["f0"], pa.uint64()), "lo": pa.array(unique["f1"], pa.uint64())})


def _row(group: str, pool: int, kept: int) -> dict:
    return {"group": group, "pool": int(pool), "kept": int(kept), "kept_share": kept / pool if pool else 0.0}


def _top_groups(counts: dict[str, tuple[int, int]]) -> list[dict]:
    """Largest groups first (ties by name), the tail beyond TOP_GROUPS folded into one OTHER row."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1][0], item[0]))
    rows = [_row(group, pool, kept) for group, (pool, kept) in ranked[:TOP_GROUPS]]
    if len(ranked) > TOP_GROUPS:
        tail = ranked[TOP_GROUPS:]
        rows.append(_row(OTHER, sum(p for _, (p, _) in tail), sum(k for _, (_, k) in tail)))
    return rows


def audit_subset(metadata_dir: str | os.PathLike, subset: np.ndarray,
                 ground_truth_path: str | os.PathLike | None = None,
                 concept_column: str | None = None,
                 language_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """The kept share of the pool per group, for each dimension.

    Returns {dimension: [{"group", "pool", "kept", "kept_share"}, ...]}. Categorical dimensions (language,
    concept, ground_truth_kind, ground_truth_object) list their largest groups first, the tail as "(other)";
    bucketed ones (caption_words, image_min_side, aspect_ratio) list buckets in order, empty ones left out.
    NULL labels group as "(missing)", as do pool rows absent from the ground truth. Without a `language` column in
    the metadata, languages come from the parquet files of `language_dir` (uid, language: the caption feature
    store's, which holds the rows some rule needed), and rows it lacks group as "(not computed)". `concept` and the
    ground-truth dimensions appear only when asked for. "overall" is one row for the whole pool, with
    `kept_unique` (distinct subset uids, in the pool or not) and `kept_with_repeats` (the subset's length).
    Subset uids not in the pool count in neither `pool` nor `kept`.
    """
    kept = _kept_table(subset)
    needed = list(REQUIRED_COLUMNS) + ([concept_column] if concept_column else [])
    files, columns = _parquet_files(metadata_dir, needed)
    # num_words is the basic filter's own count; without it, count the same words in SQL.
    words = "m.num_words" if "num_words" in columns else f"len(regexp_extract_all(coalesce(m.text, ''), '{_WORD}'))"

    language_join = ""
    if "language" in columns:
        labels = {"language": f"coalesce(m.language, '{MISSING}')"}
    elif language_dir is not None and any(Path(language_dir).glob("*.parquet")):
        labels = {"language": f"coalesce(f.language, '{NOT_COMPUTED}')"}
        language_join = (f"LEFT JOIN read_parquet({_quote_path(Path(language_dir) / '*.parquet')}) f "
                         f"ON f.uid = m.uid")
    else:
        labels = {"language": f"'{NOT_COMPUTED}'"}
    labels.update({name: expr.format(words=words) for name, expr, _ in _BUCKETED})
    if concept_column:
        labels["concept"] = f"coalesce(CAST(m.{_quote_ident(concept_column)} AS VARCHAR), '{MISSING}')"
    truth_join = ""
    if ground_truth_path is not None:
        missing = [c for c in TRUTH_COLUMNS if c not in pq.read_schema(ground_truth_path).names]
        if missing:
            raise ValueError(f"{ground_truth_path}: ground truth lacks column(s) {', '.join(map(repr, missing))}")
        labels["ground_truth_kind"] = f"coalesce(t.kind, '{MISSING}')"
        labels["ground_truth_object"] = f"coalesce(t.object, '{MISSING}')"
        truth_join = (f"LEFT JOIN (SELECT uid, any_value(kind) AS kind, any_value(object) AS object "
                      f"FROM read_parquet({_quote_path(ground_truth_path)}) GROUP BY uid) t ON t.uid = m.uid")

    # Label columns are named d0, d1, ... so no metadata column name can clash with them.
    names = list(labels)
    file_list = "[" + ", ".join(map(_quote_path, files)) + "]"
    query = f"""
        WITH m AS (
            SELECT *, ('0x' || substr(checked_uid, 1, 16))::UBIGINT AS _hi,
                      ('0x' || substr(checked_uid, 17, 16))::UBIGINT AS _lo
            FROM (SELECT *, CASE WHEN length(uid) = 32 THEN uid
                                 ELSE error('uid is not 32 hex chars: ' || coalesce(uid, 'NULL')) END AS checked_uid
                  FROM read_parquet({file_list}))
        ), labelled AS (
            SELECT {', '.join(f'{expr} AS d{i}' for i, expr in enumerate(labels.values()))},
                   k.hi IS NOT NULL AS is_kept
            FROM m LEFT JOIN kept k ON m._hi = k.hi AND m._lo = k.lo {truth_join} {language_join}
        )
        SELECT {', '.join(f'd{i}' for i in range(len(names)))}, count(*) AS pool, count_if(is_kept) AS kept
        FROM labelled
        GROUP BY GROUPING SETS ({', '.join(f'(d{i})' for i in range(len(names)))}, ())
    """
    con = duckdb.connect()
    try:
        con.register("kept", kept)
        rows = con.execute(query).fetchall()
    finally:
        con.close()

    counts: dict[str, dict[str, tuple[int, int]]] = {name: {} for name in names}
    total_pool = total_kept = 0
    for row in rows:
        *groups, pool, n_kept = row
        grouped = [i for i, g in enumerate(groups) if g is not None]  # labels are never NULL (coalesced)
        if not grouped:  # the () grouping set: the whole pool
            total_pool, total_kept = pool, n_kept
        else:
            counts[names[grouped[0]]][groups[grouped[0]]] = (pool, n_kept)

    order = {name: buckets for name, _, buckets in _BUCKETED}
    audit: dict[str, list[dict]] = {}
    for name in names:
        if name in order:
            audit[name] = [_row(b, *counts[name][b]) for b in order[name] if b in counts[name]]
        else:
            audit[name] = _top_groups(counts[name])
    audit["overall"] = [{**_row("all", total_pool, total_kept),
                         "kept_unique": kept.num_rows, "kept_with_repeats": int(len(subset))}]
    return audit


def audit_markdown(audit: dict[str, list[dict]]) -> str:
    """One compact markdown table per dimension (group | pool | kept | kept share %), for Dagster metadata."""
    parts = []
    for name, rows in audit.items():
        lines = [f"**{name}**", "", "| group | pool | kept | kept share % |", "|---|---:|---:|---:|"]
        for r in rows:
            group = str(r["group"]).replace("|", "\\|")
            lines.append(f"| {group} | {r['pool']:,} | {r['kept']:,} | {100 * r['kept_share']:.1f} |")
        if name == "overall" and rows:
            lines += ["", f"kept unique uids: {rows[0]['kept_unique']:,}; "
                          f"with repeats: {rows[0]['kept_with_repeats']:,}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
