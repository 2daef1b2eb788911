"""Running a strategy's rule: DuckDB over the pool metadata (and feature tables), to a sorted uid array.

Unscored samples (NaN scores, written when a scorer is absent) are read as NULL, so a score rule never
keeps them (DuckDB orders NaN above every number) and quantiles ignore them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core.inputs import INPUTS
from datacomp_assets.core.layout import Asset
from datacomp_assets.core.strategies import (
    SCORE_COLUMNS, SOURCE_PREFIX, THRESHOLD_PLACEHOLDER, Strategy, get_strategy, strategy_identifiers)
from datacomp_assets.core.caption_features import GROUPS, ROW_COLUMNS, CaptionFeatureStore
from datacomp_assets.core.uid_index import UidIndex, describe_files, metadata_parquet, uid_index
from datacomp_assets.core.uids import (
    UID_DTYPE, arrow_uids_to_array, intersect_sorted, sort_uids, union_sorted, unique_sorted)
from datacomp_assets.filtering.time_limit import RuleClock, rule_time_limit

# Where a column a rule reads comes from, for the error when it is missing.
COLUMN_SOURCES = {
    "language": f"{Asset.POOL_METADATA} (fastText caption features)", "num_words": Asset.POOL_METADATA,
    "num_chars": Asset.POOL_METADATA, "num_tokens": Asset.POOL_METADATA,
    "cld3_language": f"{Asset.POOL_METADATA} (CLD3)",
    **dict.fromkeys(("text_concept", "image_cluster", "semdedup_max_similarity"), Asset.POOL_FEATURES),
    **{column: f"{Asset.POOL_FEATURES}, from the file named by the scale's `{name}` setting ({spec.what})"
       for name, spec in INPUTS.items() for column in spec.columns if name != "dfn_checkpoint"},
    "dfn_score": f"{Asset.IMAGE_SCORES} (the data filtering network over the downloaded images; at a published "
                 "pool its checkpoint is the file named by the scale's `dfn_checkpoint` setting)",
    **dict.fromkeys(("sieve_score", "generated_caption"), f"{Asset.IMAGE_SCORES} (SIEVE: a captioner's captions of "
                    "the downloaded images; at a published pool the files named by the scale's "
                    "`captioner_checkpoint` and `clip_l14_checkpoint` settings)"),
}

# The pool view's row numbering, which the uid index reads (and the caption feature store's parts carry).
FILE_INDEX, ROW_NUMBER = (column.name for column in ROW_COLUMNS)
# One integer per pool row (files hold fewer than 2^40 rows): what `within`/`outside` match a pool rule's rows on.
ROW_KEY = f"({FILE_INDEX}::BIGINT * {1 << 40} + {ROW_NUMBER}::BIGINT)"
# The tables `within` and `outside` register: another strategy's rows (pool) or uid halves (a derived source).
NARROWING_TABLES = ("within_rows", "outside_rows", "within_uids", "outside_uids")

# Reference score thresholds are on OpenAI CLIP's cosine scale. Where the scorers are other models (the
# tiny scale's stand-ins), a threshold is carried over as the share of the pool it keeps on CommonPool.
COMMONPOOL_SHARE_AT_THRESHOLD = {("b32", 0.25): 0.30, ("b32", 0.28): 0.20, ("b32", 0.30): 0.10}


def _parquet_glob(directory: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(directory), "*.parquet").replace("'", "''")


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def parquet_columns(directory: str | os.PathLike) -> list[str]:
    """The columns every parquet file of `directory` has; files that disagree are named, with what each lacks
    (DuckDB would read the first file's columns and report a later one's lack as the pool's)."""
    files = sorted(Path(directory).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {directory}")
    names = {path: pq.read_schema(path).names for path in files}
    every = list(dict.fromkeys(c for columns in names.values() for c in columns))
    lacking = {path.name: [c for c in every if c not in columns] for path, columns in names.items()}
    lacking = {name: missing for name, missing in lacking.items() if missing}
    if lacking:
        shown = "; ".join(f"{name} lacks {missing}" for name, missing in list(lacking.items())[:5])
        raise ValueError(f"{directory}: the parquet files do not all have the same columns: {shown}"
                         f"{' ...' if len(lacking) > 5 else ''}. Materialize the asset that wrote them again.")
    return every


def sandboxed_connection(readable: Sequence[str | os.PathLike]) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that can read and write files only under `readable` (and its own temporary
    directory), with its configuration locked: strategy rules run here, and a rule is data that may come from
    someone else's file, so it must not reach the rest of the machine."""
    con = duckdb.connect()
    temp = con.execute("SELECT current_setting('temp_directory')").fetchall()[0][0]
    directories = [os.path.join(os.path.abspath(d), "") for d in (*readable, *([temp] if temp else []))]
    con.execute(f"SET allowed_directories = [{', '.join(map(_sql_string, directories))}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def connect_pool(metadata_dir: str | os.PathLike, feature_dirs: Sequence[str | os.PathLike] = (),
                 needed: set[str] | None = None, readable: Sequence[str | os.PathLike] = ()):
    """A sandboxed DuckDB connection with the view `pool` (see `create_pool_view`). `readable`: further
    directories the queries may read (external sources, the caption feature store)."""
    con = sandboxed_connection([*pool_directories(metadata_dir), *feature_dirs, *readable])
    create_pool_view(con, metadata_dir, feature_dirs, needed)
    return con


def pool_directories(metadata_dir: str | os.PathLike) -> list[Path]:
    """The metadata directory and the directories its files link into (a published pool's mirror): DuckDB's
    sandbox checks the file a link points to."""
    linked = {path.resolve().parent for path in Path(metadata_dir).glob("*.parquet") if path.is_symlink()}
    return [Path(metadata_dir), *sorted(linked)]


def create_pool_view(con, metadata_dir: str | os.PathLike, feature_dirs: Sequence[str | os.PathLike] = (),
                     needed: set[str] | None = None, row_keyed: Sequence[str | os.PathLike] = ()) -> None:
    """(Re)define the view `pool`: the metadata parquet files (NaN scores as NULL), left-joined on uid with each
    feature directory's parquet files (columns the metadata already has are not repeated), and on (file, row)
    numbers with each `row_keyed` directory's (the caption feature store's groups: two integers a row, where a
    join on uid strings holds 12.8M strings in its hash table). `needed`: the identifiers the queries will use; a
    directory with none of them is not joined (a join on 12.8M rows costs more than the rest of a simple rule)."""
    columns = parquet_columns(metadata_dir)
    files = ", ".join(_sql_string(os.path.abspath(path)) for path in metadata_parquet(metadata_dir))
    # isfinite, not isnan: DuckDB 2.0 folds isnan() to false from parquet min/max statistics, which leave NaN out.
    nan_to_null = [f"CASE WHEN isfinite({c}) THEN {c} END AS {c}" for c in SCORE_COLUMNS.values() if c in columns]
    replace = f" REPLACE ({', '.join(nan_to_null)})" if nan_to_null else ""
    # Each row's file and row number (DuckDB numbers the files in list order, as the uid index does).
    select, joins = [f"m.*{replace}", f"m.file_index AS {FILE_INDEX}", f"m.file_row_number AS {ROW_NUMBER}"], []
    keyed = [(d, False) for d in feature_dirs] + [(d, True) for d in row_keyed]
    for i, (directory, by_row) in enumerate(keyed):
        new = [c for c in parquet_columns(directory) if c not in columns and c not in (FILE_INDEX, ROW_NUMBER)]
        if needed is not None and not needed & set(new):
            continue
        columns += new
        select += [f"f{i}.{c}" for c in new]
        on = (f"ON f{i}.{FILE_INDEX} = m.file_index::BIGINT AND f{i}.{ROW_NUMBER} = m.file_row_number" if by_row
              else "USING (uid)")
        joins.append(f"LEFT JOIN read_parquet('{_parquet_glob(directory)}') f{i} {on}")
    con.execute(f"CREATE OR REPLACE VIEW pool AS SELECT {', '.join(select)} "
                f"FROM read_parquet([{files}]) m {' '.join(joins)}")


def conjuncts(con, where: str) -> list[tuple[str, set[str]]]:
    """The top-level AND terms of a WHERE clause, each with the column names it reads, by DuckDB's own parser
    (a clause that is not an AND is one term)."""
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [f"SELECT 1 FROM pool WHERE {where}"])
                      .fetchall()[0][0])
    if tree.get("error"):  # (an expression the serializer does not know): one term, reading every word in it
        return [(where, set(re.findall(r"\w+", where)))]
    node = tree["statements"][0]["node"]

    def terms(expression: dict) -> list[dict]:
        if expression.get("type") == "CONJUNCTION_AND":
            return [t for child in expression["children"] for t in terms(child)]
        return [expression]

    out = []
    for term in terms(node["where_clause"]):
        node["where_clause"] = term
        sql = con.execute("SELECT json_deserialize_sql(?::JSON)", [json.dumps(tree)]).fetchall()[0][0]
        out.append((sql.split(" WHERE ", 1)[1], _column_refs(term)))
    return out


def _column_refs(tree) -> set[str]:
    if isinstance(tree, list):
        return {name for item in tree for name in _column_refs(item)}
    if not isinstance(tree, dict):
        return set()
    if tree.get("class") == "COLUMN_REF":
        return {tree["column_names"][-1]}
    return {name for value in tree.values() for name in _column_refs(value)}


def resolve_thresholds(sql: str, reference_scorers: bool) -> str:
    """`{b32>=0.28}` -> the literal at the paper's scales (OpenAI CLIP scorers); elsewhere the score the same
    share of the pool reaches as reaches 0.28 on CommonPool."""
    def replace(match: re.Match) -> str:
        model, threshold = match.group(1), float(match.group(2))
        if reference_scorers:
            return repr(threshold)
        share = COMMONPOOL_SHARE_AT_THRESHOLD.get((model, threshold))
        if share is None:
            raise ValueError(f"no CommonPool share known for CLIP {model} >= {threshold}; add it to "
                             "COMMONPOOL_SHARE_AT_THRESHOLD or use a fraction")
        col = SCORE_COLUMNS[model]
        return f"(SELECT quantile_disc({col}, {round(1 - share, 6)}) FROM pool)"
    return THRESHOLD_PLACEHOLDER.sub(replace, sql)


def _uid_halves(con, query: str) -> np.ndarray:
    """Rows of `query` (a column `uid`) as an unsorted `u8,u8` array, converted batch by batch from DuckDB's
    Arrow output (no Python string per row)."""
    parts = []
    for batch in con.sql(f"SELECT uid FROM ({query})").to_arrow_reader(1 << 20):
        column = batch.column(0)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = column.cast(pa.string())
        parts.append(arrow_uids_to_array(column))
    return np.concatenate(parts) if parts else np.empty(0, dtype=UID_DTYPE)


@dataclass
class PoolView:
    """How the view `pool` is made: so that it can be made again once the caption feature store holds more."""
    metadata_dir: str | os.PathLike
    feature_dirs: Sequence[str | os.PathLike] = ()
    needed: set[str] | None = None
    store: CaptionFeatureStore | None = None

    def __post_init__(self) -> None:
        self.base_columns = set(parquet_columns(self.metadata_dir)).union(
            *(parquet_columns(d) for d in self.feature_dirs))

    def create(self, con) -> None:
        groups = [self.store.group_dir(g) for g in GROUPS if self.store.has(g)] if self.store else []
        create_pool_view(con, self.metadata_dir, self.feature_dirs, self.needed, row_keyed=groups)

    def groups_to_compute(self, columns_read: set[str]) -> list[str]:
        """The caption feature groups (cheapest first) of columns read that neither the metadata nor a feature
        directory has."""
        return [g for g in GROUPS if any(c in columns_read and c not in self.base_columns for c in GROUPS[g])]


@dataclass
class PoolQuery:
    """Everything a strategy can be computed from: the pool view, external sources, the seed."""
    con: duckdb.DuckDBPyConnection
    source: str
    seed: int = 0
    reference_scorers: bool = False
    external_dirs: Mapping[str, str | os.PathLike] | None = None
    index: UidIndex | None = None  # the pool's; without it, kept uids are parsed from their strings and sorted
    view: PoolView | None = None   # with a caption feature store: the caption features a rule reads, on demand
    clock: RuleClock | None = None  # the rule's time limit: interrupts the connections it watches

    def run(self, name: str, strategy: Strategy) -> np.ndarray:
        try:
            if strategy.intersect or strategy.union:
                return self._set_operation(strategy)
            if strategy.mixture:
                return sort_uids(np.concatenate([self._component(c, n) for c, n in strategy.mixture]))
            return self._rule(strategy)
        except duckdb.BinderException as err:
            missing = re.search(r'column "(\w+)" not found', str(err))
            if missing is None:
                raise ValueError(f"{self.source}: strategy {name!r}: {str(err).splitlines()[0]}") from None
            column = missing.group(1)
            origin = f"; it comes from {COLUMN_SOURCES[column]}" if column in COLUMN_SOURCES else ""
            raise ValueError(f"{self.source}: strategy {name!r} reads column {column!r}, which the pool lacks"
                             f"{origin}. DuckDB: {str(err).splitlines()[0]}") from None
        except duckdb.PermissionException as err:
            raise ValueError(f"{self.source}: strategy {name!r} may read only the pool's own files; refused: "
                             f"{str(err).splitlines()[0]}") from None
        except duckdb.Error as err:
            raise ValueError(f"{self.source}: strategy {name!r}: {str(err).splitlines()[0]}") from None

    def uids_of(self, name: str) -> np.ndarray:
        return self.run(name, get_strategy(name))

    def _set_operation(self, strategy: Strategy) -> np.ndarray:
        parts = [self.uids_of(n) for n in (strategy.intersect or strategy.union)]  # each sorted
        combine = intersect_sorted if strategy.intersect else union_sorted
        out = unique_sorted(parts[0])
        for part in parts[1:]:
            out = combine(out, part)
        return out

    def _component(self, name: str, times: int) -> np.ndarray:
        if name.startswith(SOURCE_PREFIX):
            source = name.removeprefix(SOURCE_PREFIX)
            uids = _uid_halves(self.con, f"SELECT uid FROM read_parquet('{_parquet_glob(self._source_dir(source))}') "
                                         "WHERE status = 'success'")
        else:
            uids = unique_sorted(self.uids_of(name))
        return np.repeat(uids, times)

    def _source_dir(self, source: str):
        directory = (self.external_dirs or {}).get(source)
        if directory is None:
            raise ValueError(f"external source {source!r} is not available; known: {sorted(self.external_dirs or {})}")
        return directory

    def _rule(self, s: Strategy) -> np.ndarray:
        if not s.source:
            return self._ranked(self.con, s, key="uid", index=self.index)
        directory = self._source_dir(s.source)
        columns = parquet_columns(directory)
        if (s.within or s.outside) and "pool_uid" not in columns:
            raise ValueError(f"external source {s.source!r} has no `pool_uid` column: `within` and `outside` "
                             "need a source made from the pool's images")
        con = connect_pool(directory)
        try:
            with self.clock.watch(con) if self.clock else nullcontext():
                successful = "status = 'success'" if "status" in columns else "true"
                return self._ranked(con, replace(s, where=f"({s.where}) AND {successful}"), key="pool_uid")
        finally:
            con.close()

    def _ranked(self, con, s: Strategy, key: str, index: UidIndex | None = None) -> np.ndarray:
        """The rule `s` over the view `pool` of `con`; `within` and `outside` match the `key` column against the
        uids another strategy keeps from the pool. With the pool's `index`, kept rows are read as (file, row)
        numbers and looked up in it; otherwise their `key` uids are parsed and sorted."""
        where = resolve_thresholds(s.where, self.reference_scorers)
        # Both parts are computed before either is registered: computing one may register its own `within_rows`.
        narrowing = [(inside, unique_sorted(self.uids_of(part))) for part, inside in
                     ((s.within, True), (s.outside, False)) if part]
        for inside, uids in narrowing:
            where = f"({where}) AND {self._narrowed(con, key, index, uids, inside)}"
        if index is not None:
            self._compute_caption_features(con, where, s.order_by)
        if s.order_by:
            where = f"({where}) AND ({s.order_by}) IS NOT NULL"
            n_candidates = con.execute(f"SELECT count(*) FROM pool WHERE {where}").fetchall()[0][0]
            n_keep = s.fraction * (_rows(con) if s.fraction_of == "pool" else n_candidates)
            if n_keep < n_candidates:  # the (1 - q) order statistic; ties at the threshold are all kept
                q = round(1 - n_keep / n_candidates, 6)
                where = (f"{where} AND ({s.order_by}) >= "
                         f"(SELECT quantile_disc(({s.order_by}), {q}) FROM pool WHERE {where})")
        if index is None:
            uids = sort_uids(_uid_halves(con, f"SELECT uid FROM pool WHERE {where}"))
        else:
            rows = con.sql(f"SELECT {FILE_INDEX}, {ROW_NUMBER} FROM pool WHERE {where}").to_arrow_reader(1 << 20)
            uids = index.subset((batch.column(0).to_numpy(), batch.column(1).to_numpy()) for batch in rows)
        if s.random:  # sorted first so that the sample does not depend on file order
            n_keep = round(s.fraction * (_rows(con) if s.fraction_of == "pool" else len(uids)))
            rng = np.random.default_rng(self.seed)
            uids = uids[np.sort(rng.choice(len(uids), size=min(n_keep, len(uids)), replace=False))]
        return uids

    @staticmethod
    def _narrowed(con, key: str, index: UidIndex | None, uids: np.ndarray, inside: bool) -> str:
        """The condition that a row's `key` is (`inside`) or is not among the sorted distinct `uids`, with the table
        it reads registered on `con`. Never uid strings (two Python strings a uid, 2 GB at 12.8M): the pool's rows
        holding them as one integer each, by the index; for a derived source, the uids' two 64-bit halves."""
        if key == "uid" and index is not None:
            table = "within_rows" if inside else "outside_rows"
            keys = [np.int64(f) * (1 << 40) + rows.astype(np.int64) for f, rows in index.pool_rows(uids)]
            con.register(table, pa.table({"row_key": np.concatenate(keys) if keys else np.empty(0, np.int64)}))
            return f"{ROW_KEY} {'IN' if inside else 'NOT IN'} (SELECT row_key FROM {table})"
        table = "within_uids" if inside else "outside_uids"
        con.register(table, pa.table({"hi": np.ascontiguousarray(uids["f0"]), "lo": np.ascontiguousarray(uids["f1"])}))
        # TRY_CAST: a key that is not 32 hex digits matches no uid, as its string would not have
        halves = " AND ".join(f"n.{half} = TRY_CAST('0x' || substr({key}, {start}, 16) AS UBIGINT)"
                              for half, start in (("hi", 1), ("lo", 17)))
        found = f"EXISTS (SELECT 1 FROM {table} n WHERE length({key}) = 32 AND {halves})"
        # a NULL key was neither in nor outside the uids (`NOT IN` gave NULL): never kept
        return found if inside else f"({key} IS NOT NULL AND NOT {found})"

    def _compute_caption_features(self, con, where: str, order_by: str | None) -> None:
        """Compute the caption features the rule reads and the pool lacks, group by group (cheapest first), each
        on the rows that pass the rule's terms already computable and that the store does not hold yet."""
        view = self.view
        if view is None or view.store is None:
            return  # a missing column is then named by the query
        # every word of the rule, a superset of the columns it reads: most rules need no caption feature
        groups = view.groups_to_compute(set(re.findall(r"\w+", f"{where} {order_by or ''}")))
        if not groups:
            return
        terms = conjuncts(con, where)
        on_demand = {c for g in groups for c in GROUPS[g]}
        ready: set[str] = set()
        for group in groups:
            prefilter = " AND ".join(f"({sql})" for sql, columns in terms
                                     if not columns & (on_demand - ready)) or "true"
            # A condition over the pool's own columns means the same rows next time; one that reads another
            # strategy's uids (within, outside) may not, so it is checked row by row every time.
            stable = not (set(re.findall(r"\w+", prefilter)) & set(NARROWING_TABLES))
            with view.store.lock(group):
                if not (stable and view.store.covers(group, prefilter)):
                    directory = view.store.group_dir(group)
                    held = (f" AND {ROW_KEY} NOT IN (SELECT {ROW_KEY} FROM read_parquet('{_parquet_glob(directory)}'))"
                            if view.store.has(group) else "")
                    rows = self._matching_rows(con, f"({prefilter}){held}")
                    view.store.compute(group, [(path, np.flatnonzero(rows[a:b]).astype(np.int32)) for path, a, b in
                                               zip(self.index.files, self.index.starts[:-1], self.index.starts[1:])])
                    if stable:
                        view.store.record_cover(group, prefilter)
            ready |= set(GROUPS[group])
            view.create(con)

    def _matching_rows(self, con, where: str) -> np.ndarray:
        """The pool's rows (in index order) where `where` holds, as a boolean mask."""
        mask = np.zeros(self.index.rows, dtype=bool)
        for batch in con.sql(f"SELECT {FILE_INDEX}, {ROW_NUMBER} FROM pool WHERE {where}").to_arrow_reader(1 << 20):
            mask[self.index.starts[batch.column(0).to_numpy()] + batch.column(1).to_numpy()] = True
        return mask


def _rows(con) -> int:
    return con.execute("SELECT count(*) FROM pool").fetchall()[0][0]


def select_uids(metadata_dir: str | os.PathLike, strategy_name: str, seed: int = 0,
                feature_dirs: Sequence[str | os.PathLike] = (), reference_scorers: bool = False,
                external_dirs: Mapping[str, str | os.PathLike] | None = None,
                caption_features: CaptionFeatureStore | None = None) -> np.ndarray:
    """The uids the strategy keeps from the pool in `metadata_dir`, as a sorted `u8,u8` array.

    `feature_dirs`: parquet directories of per-sample features (uid + columns) joined to the metadata.
    `reference_scorers`: the scores come from OpenAI's CLIP models (the paper's scales), so reference
    thresholds apply as they are. `external_dirs`: downloaded external sources a mixture may draw from.
    `caption_features`: where caption features the metadata lacks are computed on demand, and kept.
    """
    strategy = get_strategy(strategy_name)
    with pool_query(metadata_dir, strategy_identifiers(strategy_name), feature_dirs, caption_features, seed,
                    reference_scorers, external_dirs, rule=f"strategy {strategy_name!r}") as query:
        return query.run(strategy_name, strategy)


def rows_where(metadata_dir: str | os.PathLike, where: str, feature_dirs: Sequence[str | os.PathLike] = (),
               caption_features: CaptionFeatureStore | None = None) -> np.ndarray:
    """A boolean mask over the pool's rows (files in name order, rows in file order): where `where` holds, with
    the caption features it reads computed on demand."""
    with pool_query(metadata_dir, None, feature_dirs, caption_features, rule=f"the rule {where!r}") as query:
        query._compute_caption_features(query.con, where, None)
        return query._matching_rows(query.con, f"({where}) IS TRUE")


@contextmanager
def pool_query(metadata_dir: str | os.PathLike, needed: set[str] | None, feature_dirs: Sequence = (),
               caption_features: CaptionFeatureStore | None = None, seed: int = 0, reference_scorers: bool = False,
               external_dirs: Mapping[str, str | os.PathLike] | None = None,
               rule: str = "the rule") -> Iterator[PoolQuery]:
    """The pool's query, its connection watched by the rule's time limit (`time_limit`): a rule that overruns
    fails as RuleTimeLimitExceeded, naming `rule`, whatever error the interrupt raised where it struck."""
    index = uid_index(metadata_dir)
    store = caption_features.for_pool(describe_files(index.files)) if caption_features else None
    con = sandboxed_connection([*pool_directories(metadata_dir), *feature_dirs, *(external_dirs or {}).values(),
                                *([store.directory] if store else [])])
    clock = RuleClock(*rule_time_limit(index.rows))
    try:
        with clock, clock.watch(con):
            try:
                view = PoolView(metadata_dir, feature_dirs, needed, store)
                view.create(con)
                yield PoolQuery(con, os.fspath(metadata_dir), seed, reference_scorers, external_dirs, index, view,
                                clock)
            except Exception:
                if clock.expired:
                    raise clock.overran(f"{os.fspath(metadata_dir)}: {rule}") from None
                raise
    finally:
        con.close()
