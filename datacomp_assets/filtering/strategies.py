"""Baseline filtering strategies (reference section 4) as queries over the pool metadata.

Each rule is data: a SQL predicate over the view `pool` (every `<metadata_dir>/*.parquet`), so a
future config file can declare new strategies the same way. DuckDB scans only the columns a rule
reads, which keeps a 12.8M-row pool well under a gigabyte.

Unscored samples (NaN scores, written when a scorer is absent) are read as NULL, so a score rule
never keeps them (DuckDB orders NaN above every number) and quantiles ignore them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import duckdb
import numpy as np

from datacomp_assets.filtering.uids import UID_DTYPE, sort_uids

SCORE_COLUMNS = {"b32": "clip_b32_similarity_score", "l14": "clip_l14_similarity_score"}


@dataclass(frozen=True)
class Strategy:
    description: str
    where: str  # SQL predicate over `pool` selecting the kept rows ("true" keeps all)
    columns: tuple[str, ...] = ()  # metadata columns the rule reads, besides uid
    fraction: float | None = None  # kept fraction by construction; None when it depends on the data
    random: bool = False  # keep a seeded uniform sample of `fraction` of the rows matching `where`


def random_fraction(fraction: float) -> Strategy:
    return Strategy(f"uniform random {fraction:.0%} of the pool", "true", fraction=fraction, random=True)


def top_fraction(model: str, fraction: float) -> Strategy:
    # quantile_disc is an exact order statistic (numpy's method="inverted_cdf"): the smallest score
    # with at least (1 - f) of the pool at or below it, so about f * n rows (plus ties) score >= it.
    col = SCORE_COLUMNS[model]
    q = round(1 - fraction, 6)
    return Strategy(
        f"top {fraction:.0%} of the pool by CLIP {model.upper()} image-text similarity",
        f"{col} >= (SELECT quantile_disc({col}, {q}) FROM pool)",
        columns=(col,), fraction=fraction,
    )


def score_threshold(model: str, threshold: float) -> Strategy:
    col = SCORE_COLUMNS[model]
    return Strategy(f"CLIP {model.upper()} image-text similarity >= {threshold}", f"{col} >= {threshold}",
                    columns=(col,))


# The paper's sweeps, by name: random fractions, top fractions by each scorer, and fixed thresholds.
# (The thresholds are on OpenAI CLIP's cosine scale; the tiny scorers' scale differs.)
SWEEPS: dict[str, Strategy] = {
    **{f"random_{round(f * 100)}pct": random_fraction(f) for f in (0.01, 0.10, 0.25, 0.50, 0.75)},
    **{f"clip_score_{m}_{round(f * 100)}pct": top_fraction(m, f)
       for m in ("b32", "l14") for f in (0.10, 0.20, 0.30, 0.40)},
    **{f"clip_score_b32_thr{t}": score_threshold("b32", t) for t in (0.25, 0.28)},
}

# The registry: every strategy here is a partition, is trained and evaluated, and has a leaderboard row.
# Adding a strategy is adding an entry (each costs one training run per scale).
STRATEGIES: dict[str, Strategy] = {
    "no_filter": Strategy("every sample of the pool", "true", fraction=1.0),
    "random_10pct": SWEEPS["random_10pct"],
    "basic": Strategy(
        "English (fastText top-1), more than 2 words and 5 characters, min side >= 200 px, aspect <= 3",
        "language = 'en' AND num_words > 2 AND num_chars > 5"
        " AND least(original_width, original_height) >= 200"
        " AND greatest(original_width, original_height) / least(original_width, original_height) <= 3",
        columns=("language", "num_words", "num_chars", "original_width", "original_height"),
    ),
    "clip_score_b32_30pct": SWEEPS["clip_score_b32_30pct"],
    "clip_score_l14_30pct": SWEEPS["clip_score_l14_30pct"],
}


def get_strategy(name: str) -> Strategy:
    """A registered strategy, or one of the paper's sweeps, by name."""
    try:
        return STRATEGIES.get(name) or SWEEPS[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join({**STRATEGIES, **SWEEPS})}") from None


def expected_fraction(strategy_name: str) -> float | None:
    """The fraction of the pool a strategy keeps by construction (None when it depends on the data)."""
    return get_strategy(strategy_name).fraction


def _connect(metadata_dir: str | os.PathLike) -> tuple[duckdb.DuckDBPyConnection, set[str]]:
    """A connection with the view `pool` over the directory's parquet files (NaN scores as NULL),
    and the pool's column names."""
    pattern = os.path.join(os.fspath(metadata_dir), "*.parquet").replace("'", "''")
    con = duckdb.connect()
    try:
        columns = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{pattern}')").fetchall()}
    except duckdb.IOException as err:
        raise FileNotFoundError(f"no metadata parquet files in {metadata_dir}: {err}") from None
    # isfinite, not isnan: DuckDB 2.0 folds isnan() to false from parquet min/max statistics,
    # which leave NaN out.
    nan_to_null = [f"CASE WHEN isfinite({c}) THEN {c} END AS {c}" for c in SCORE_COLUMNS.values()
                   if c in columns]
    replace = f" REPLACE ({', '.join(nan_to_null)})" if nan_to_null else ""
    con.execute(f"CREATE VIEW pool AS SELECT *{replace} FROM read_parquet('{pattern}')")
    return con, columns


def select_uids(metadata_dir: str | os.PathLike, strategy_name: str, seed: int = 0) -> np.ndarray:
    """The uids the strategy keeps from the pool in `metadata_dir`, as a sorted `u8,u8` array."""
    strategy = get_strategy(strategy_name)
    con, columns = _connect(metadata_dir)
    try:
        missing = [c for c in ("uid", *strategy.columns) if c not in columns]
        if missing:
            raise ValueError(f"{metadata_dir}: metadata lacks columns {', '.join(missing)} "
                             f"needed by strategy {strategy_name!r}")
        # Split each 32-hex uid into its two uint64 halves in SQL: no Python string per row.
        result = con.execute(f"""
            SELECT ('0x' || substr(uid, 1, 16))::UBIGINT AS hi, ('0x' || substr(uid, 17, 16))::UBIGINT AS lo
            FROM (SELECT CASE WHEN length(uid) = 32 THEN uid
                              ELSE error('uid is not 32 hex chars: ' || coalesce(uid, 'NULL')) END AS uid
                  FROM pool WHERE {strategy.where})
        """).fetchnumpy()
    finally:
        con.close()
    uids = np.empty(len(result["hi"]), dtype=UID_DTYPE)
    uids["f0"], uids["f1"] = result["hi"], result["lo"]
    uids = sort_uids(uids)  # sorted first so that random sampling does not depend on file order
    if strategy.random:
        n_keep = round(len(uids) * strategy.fraction)
        rng = np.random.default_rng(seed)
        uids = uids[np.sort(rng.choice(len(uids), size=n_keep, replace=False))]
    return uids
