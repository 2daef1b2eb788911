"""The strategy registry: filtering strategies as data, and combinations of them.

A strategy is one of:
- a rule: a SQL predicate `where` over the view `pool` (every `<metadata_dir>/*.parquet`, joined on uid
  with any per-sample feature tables), optionally ranked by `order_by` keeping the top `fraction` of the
  candidates, or sampled uniformly (`random`), optionally only among another strategy's uids (`within`) or
  only outside them (`outside`); with `source`, the rule runs over an external source's rows instead of the
  pool (`within` and `outside` then match a derived source's `pool_uid`: the pool image it was made from);
- a set operation over other strategies: `intersect` or `union` (each uid once);
- a `mixture`: other strategies' uids and external sources' samples, each repeated `upsample` times
  (bring your own data; a repeated uid is trained on that many times).

The registry is `strategies.toml` beside this file plus any files named in `$DATACOMP_STRATEGIES`
(os.pathsep-separated, read by `settings`): a user's file adds strategies under new names, and replaces a built-in
(or an earlier file's) only where its table says `override = true`. Every registered strategy is a partition, is
trained and evaluated, and has a leaderboard row, except a `building_block`: a named stage of a longer method that
other strategies are built from, never trained on its own (`BUILDING_BLOCKS`). The paper's sweeps (`SWEEPS`) are
partitions too (`PARTITIONED`), so any of them can be named (`--strategies clip_score_b32_thr0.28`), but `all` and the
schedules request only the registered strategies.
The filtering stage runs the rules (`filtering.selection`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from datacomp_assets.core import settings

SCORE_COLUMNS = {"b32": "clip_b32_similarity_score", "l14": "clip_l14_similarity_score"}
REGISTRY_FILE = Path(__file__).with_name("strategies.toml")
NAME_PATTERN = re.compile(r"[a-z0-9_]+")
# A strategy's name is a partition key and a folder name (`<root>/<scale>/subset/<name>/`): dots may separate its
# parts (`clip_score_b32_thr0.28`), but never lead, trail or repeat, so no name is "..", hidden, or a path.
STRATEGY_NAME_PATTERN = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")
SOURCE_PREFIX = "source:"  # a mixture component naming an external source instead of a strategy
# `{b32>=0.28}` in a rule: a reference score threshold, resolved per scale when the rule runs.
THRESHOLD_PLACEHOLDER = re.compile(r"\{(b32|l14)>=([0-9.]+)\}")


@dataclass(frozen=True)
class Strategy:
    description: str = ""
    where: str = "true"                 # SQL predicate over `pool`
    order_by: str | None = None         # SQL expression; with `fraction`, keep the highest-ranked rows
    fraction: float | None = None       # kept share of the candidates (ranked or random)
    fraction_of: str = "candidates"     # or "pool": `fraction` counts rows of the whole pool
    random: bool = False                # a seeded uniform sample of `fraction` of the candidates
    within: str | None = None           # candidates are only this strategy's uids
    outside: str | None = None          # candidates are only uids this strategy does not keep
    source: str | None = None           # the rule's rows are this external source's, not the pool's
    intersect: tuple[str, ...] = ()
    union: tuple[str, ...] = ()
    mixture: tuple[tuple[str, int], ...] = ()  # (strategy name or "source:<name>", times each uid)
    building_block: bool = False        # only a part of other strategies: not a partition, not trained
    override: bool = False              # a user's file replaces the built-in of this name on purpose

    @property
    def parts(self) -> tuple[str, ...]:
        """Strategies this one is built from."""
        return tuple(part for _, part in self.references)

    @property
    def references(self) -> tuple[tuple[str, str], ...]:
        """(setting, strategy name) for each strategy this one is built from, for errors that name the setting."""
        mixed = tuple(("mixture", name) for name, _ in self.mixture if not name.startswith(SOURCE_PREFIX))
        return (*((key, p) for key, p in (("within", self.within), ("outside", self.outside)) if p),
                *(("intersect", p) for p in self.intersect), *(("union", p) for p in self.union), *mixed)

    @property
    def expected_fraction(self) -> float | None:
        """The share of the pool it keeps by construction (None when that depends on the data)."""
        if (self.intersect or self.union or self.mixture or self.within or self.outside or self.source
                or self.where.strip() != "true"):
            return None
        if self.fraction is None:
            return None if self.order_by else 1.0
        return self.fraction


def random_fraction(fraction: float) -> Strategy:
    return Strategy(f"uniform random {fraction:.0%} of the pool", fraction=fraction, random=True)


def top_fraction(model: str, fraction: float) -> Strategy:
    # quantile_disc is an exact order statistic (numpy's method="inverted_cdf"): the smallest score
    # with at least (1 - f) of the pool at or below it, so about f * n rows (plus ties) score >= it.
    return Strategy(f"top {fraction:.0%} of the pool by CLIP {model.upper()} image-text similarity",
                    order_by=SCORE_COLUMNS[model], fraction=fraction)


def score_threshold(model: str, threshold: float) -> Strategy:
    return Strategy(f"CLIP {model.upper()} image-text similarity >= {threshold}",
                    where=f"{SCORE_COLUMNS[model]} >= {{{model}>={threshold}}}")


# The paper's sweeps, by name: random fractions, top fractions by each scorer, and fixed thresholds.
SWEEPS: dict[str, Strategy] = {
    **{f"random_{round(f * 100)}pct": random_fraction(f) for f in (0.01, 0.10, 0.25, 0.50, 0.75)},
    **{f"clip_score_{m}_{round(f * 100)}pct": top_fraction(m, f)
       for m in ("b32", "l14") for f in (0.10, 0.20, 0.30, 0.40, 0.45)},
    **{f"clip_score_b32_thr{t}": score_threshold("b32", t) for t in (0.25, 0.28, 0.30)},
}


def parse_strategies(table: Mapping, where: str) -> dict[str, Strategy]:
    """Strategies from a TOML table (`[name]` sections); errors name the file and the strategy."""
    known = {f.name for f in fields(Strategy)}
    out = {}
    for name, spec in table.items():
        if not STRATEGY_NAME_PATTERN.fullmatch(name):
            raise ValueError(f"{where}: strategy name {name!r} must be lowercase letters, digits and _, with single "
                             "dots between them (not at either end)")
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: [{name}] must be a table of settings")
        unknown = set(spec) - known
        nested = sorted(key for key in unknown if isinstance(spec[key], Mapping))
        if nested:  # TOML reads [my_thr0.33] as table "my_thr0" holding table "33"
            raise ValueError(f"{where}: [{name}] holds a table {nested[0]!r}: a name with a dot must be quoted in "
                             f"TOML, as [\"{name}.{nested[0]}\"]")
        if unknown:
            raise ValueError(f"{where}: [{name}] has unknown settings {sorted(unknown)}; known: {sorted(known)}")
        spec = dict(spec)
        check_types(spec, f"{where}: [{name}]")
        for key in ("intersect", "union"):
            spec[key] = tuple(spec.get(key, ()))
        spec["mixture"] = tuple((m["from"], m.get("upsample", 1)) for m in spec.get("mixture", ()))
        strategy = Strategy(**spec)
        if strategy.fraction is not None and not 0 < strategy.fraction <= 1:
            raise ValueError(f"{where}: [{name}] fraction must be in (0, 1], got {strategy.fraction}")
        if strategy.fraction_of not in ("candidates", "pool"):
            raise ValueError(f"{where}: [{name}] fraction_of must be 'candidates' or 'pool'")
        if (strategy.random or strategy.order_by) and strategy.fraction is None:
            raise ValueError(f"{where}: [{name}] `random` and `order_by` need a `fraction`")
        if sum(map(bool, (strategy.intersect, strategy.union, strategy.mixture))) > 1:
            raise ValueError(f"{where}: [{name}] takes one of intersect, union or mixture")
        if strategy.source is not None and (strategy.intersect or strategy.union or strategy.mixture
                                            or not NAME_PATTERN.fullmatch(strategy.source)):
            raise ValueError(f"{where}: [{name}] `source` names an external source (lowercase letters, digits "
                             "and _) and goes with a rule, not with intersect, union or mixture")
        check_expression(strategy.where, "SELECT uid FROM pool WHERE ({})", f"{where}: [{name}] `where`")
        if strategy.order_by:
            check_expression(strategy.order_by, "SELECT ({}) FROM pool", f"{where}: [{name}] `order_by`")
        out[name] = strategy
    return out


# What each setting holds. TOML gives a string where a number was meant (`fraction = "0.5"`) without complaint,
# and the mistake would surface later as a TypeError naming nothing: check each value's type on reading.
TEXT_SETTINGS = ("description", "where", "fraction_of", "order_by", "within", "outside", "source")
FLAG_SETTINGS = ("random", "building_block", "override")
MIXTURE_KEYS = ("from", "upsample")


def check_types(spec: Mapping, place: str) -> None:
    """Each setting of one strategy's table is of its kind; `place` is "<file>: [<name>]"."""
    for key in TEXT_SETTINGS:
        if key in spec and not isinstance(spec[key], str):
            raise ValueError(f"{place} `{key}` must be text (a quoted TOML string), not {spec[key]!r}")
    for key in FLAG_SETTINGS:
        if key in spec and not isinstance(spec[key], bool):
            raise ValueError(f"{place} `{key}` must be true or false, not {spec[key]!r}")
    fraction = spec.get("fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))):
        raise ValueError(f"{place} `fraction` must be a number in (0, 1] (e.g. fraction = 0.5, no quotes), "
                         f"not {fraction!r}")
    for key in ("intersect", "union"):
        names = spec.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{place} `{key}` must be a list of strategy names "
                             f"(e.g. {key} = [\"basic\", \"no_filter\"]), not {names!r}")
    mixture = spec.get("mixture", [])
    if not isinstance(mixture, list):
        raise ValueError(f"{place} `mixture` must be a list of tables "
                         f"(e.g. mixture = [{{ from = \"basic\", upsample = 2 }}]), not {mixture!r}")
    for i, part in enumerate(mixture, 1):
        entry = f"{place} `mixture` entry {i}"
        if not isinstance(part, Mapping):
            raise ValueError(f"{entry} must be a table like {{ from = \"basic\", upsample = 2 }}, not {part!r}")
        unknown = sorted(set(part) - set(MIXTURE_KEYS))
        if unknown:
            raise ValueError(f"{entry} has unknown keys {unknown}; known: {list(MIXTURE_KEYS)}")
        if not isinstance(part.get("from"), str):
            raise ValueError(f"{entry} needs `from`: a strategy's name or \"{SOURCE_PREFIX}<external source>\"")
        upsample = part.get("upsample", 1)
        if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 1:
            raise ValueError(f"{entry}: upsample must be a whole number >= 1 (times each uid is repeated), "
                             f"not {upsample!r}")


def check_expression(text: str, template: str, what: str) -> None:
    """A rule's `where` and `order_by` are each one SQL expression over the view `pool`: a strategy file is data
    shared between people, not a script, so a second statement (or a comment hiding the rest of the query) is
    refused here, naming the file, the strategy and the text. Reading files is refused when the rule runs:
    the filtering stage's DuckDB can read only the pool's own directories."""
    import duckdb

    probe = template.format(THRESHOLD_PLACEHOLDER.sub("0.0", text))
    if any(kind == duckdb.token_type.comment for _, kind in duckdb.tokenize(text)):
        raise ValueError(f"{what} holds a SQL comment, which would hide the rest of the query: {text!r}")
    try:
        statements = duckdb.extract_statements(probe)
    except duckdb.Error as err:
        raise ValueError(f"{what} is not a SQL expression: {text!r} (DuckDB: {str(err).splitlines()[0]})") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise ValueError(f"{what} must be one SQL expression over `pool`, not statements of its own: {text!r}")


def load_registry(extra_files: Sequence[str | os.PathLike] = ()) -> dict[str, Strategy]:
    """The shipped strategies plus those in `extra_files`. A user's file adds strategies; it replaces one defined
    before it (built-in or in an earlier file) only where its table says `override = true`. Every referenced
    strategy must exist, and none may be built from itself."""
    registry: dict[str, Strategy] = {}
    defined_in: dict[str, str] = {}  # strategy -> the file that defines it
    for path in (REGISTRY_FILE, *extra_files):
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"strategy file {path} does not exist (named in $DATACOMP_STRATEGIES?)") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
        parsed = parse_strategies(table, str(path))
        if path != REGISTRY_FILE:
            for name, strategy in parsed.items():
                check_replacement(name, strategy, str(path), defined_in)
        registry.update(parsed)
        defined_in.update(dict.fromkeys(parsed, str(path)))
    check_references(registry, defined_in)
    return registry


def check_replacement(name: str, strategy: Strategy, path: str, defined_in: Mapping[str, str]) -> None:
    """A user's strategy takes a name already taken only when it says so: a silent replacement would change what a
    leaderboard row named `basic` means."""
    if name in defined_in or name in SWEEPS:
        if strategy.override:
            return
        if name not in defined_in:
            what = f"one of the paper's sweeps, {name!r}"
        elif defined_in[name] == str(REGISTRY_FILE):
            what = f"the built-in strategy {name!r}"
        else:
            what = f"the strategy {name!r} of {defined_in[name]}"
        raise ValueError(f"{path}: [{name}] redefines {what}; give yours a new name (e.g. [my_{name}]), or add "
                         f"`override = true` to [{name}] to replace it on purpose (its version changes and the "
                         "leaderboard marks the row)")
    if strategy.override:
        raise ValueError(f"{path}: [{name}] sets `override = true`, but there is no strategy {name!r} to override; "
                         "remove that line (a new strategy needs no marker)")


def check_references(registry: Mapping[str, Strategy], defined_in: Mapping[str, str]) -> None:
    """Every strategy a strategy is built from exists, and no strategy is built from itself (which would recurse
    without end when its version or its rule is worked out)."""
    for name, strategy in registry.items():
        unknown = [(key, part) for key, part in strategy.references if part not in registry and part not in SWEEPS]
        if unknown:
            key = unknown[0][0]  # one setting at a time, named
            missing = [part for k, part in unknown if k == key]
            close = difflib.get_close_matches(missing[0], [*registry, *SWEEPS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{defined_in[name]}: [{name}] `{key}` names unknown strategies {missing}{hint}; "
                             "correct the name, or define that strategy in a strategy file")
    done: set[str] = set()

    def visit(name: str, trail: list[tuple[str, str]]) -> None:
        # trail: (strategy, the setting that leads on) from the first strategy visited down to this one
        if name in done:
            return
        on_trail = [n for n, _ in trail]
        if name in on_trail:
            cycle = trail[on_trail.index(name):]
            steps = " -> ".join(f"[{n}] `{key}`" for n, key in cycle)
            raise ValueError(f"{defined_in[name]}: [{name}] is built from itself: {steps} -> [{name}]; remove one "
                             "of these references")
        for key, part in registry[name].references if name in registry else ():
            visit(part, [*trail, (name, key)])
        done.add(name)

    for name in registry:
        visit(name, [])


_REGISTRY = load_registry(settings.strategy_files())
STRATEGIES: dict[str, Strategy] = {name: s for name, s in _REGISTRY.items() if not s.building_block}
BUILDING_BLOCKS: dict[str, Strategy] = {name: s for name, s in _REGISTRY.items() if s.building_block}
# The strategy partition's keys: every registered strategy, then the paper's sweeps not registered under their name,
# so a sweep can be materialized (and shows on the leaderboard) without `all` or a schedule training every sweep.
PARTITIONED: tuple[str, ...] = (*STRATEGIES, *(name for name in SWEEPS if name not in _REGISTRY))


def get_strategy(name: str) -> Strategy:
    """A registered strategy, a building block or one of the paper's sweeps, by name."""
    try:
        return STRATEGIES.get(name) or BUILDING_BLOCKS.get(name) or SWEEPS[name]
    except KeyError:
        known = ", ".join({**STRATEGIES, **BUILDING_BLOCKS, **SWEEPS})
        raise ValueError(f"unknown strategy {name!r}; known: {known}") from None


def expected_fraction(strategy_name: str) -> float | None:
    """The fraction of the pool a strategy keeps by construction (None when it depends on the data)."""
    return get_strategy(strategy_name).expected_fraction


def strategy_definition(name: str) -> dict:
    """A strategy's settings as plain data (for metadata and hashing)."""
    strategy = get_strategy(name)
    return {f.name: getattr(strategy, f.name) for f in fields(Strategy)
            if getattr(strategy, f.name) != f.default}


def strategy_version(name: str) -> str:
    """A short hash of one strategy's definition and those of the strategies it is built from: the data version of
    its `strategy_definitions` partition, so editing one rule (or a building block of it) marks only the strategies
    that use it stale."""
    definition = strategy_definition(name)
    parts = get_strategy(name).parts
    if parts:
        definition = {**definition, "parts": {part: strategy_version(part) for part in parts}}
    text = json.dumps(definition, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def overrides(name: str) -> list[str]:
    """The strategies, this one or those it is built from, that a user's file replaced on purpose
    (`override = true`): the leaderboard marks the row, since it no longer measures the built-in rule."""
    if name.startswith(SOURCE_PREFIX):
        return []
    strategy = get_strategy(name)
    found = [name] if strategy.override else []
    for part in strategy.parts:
        found += [n for n in overrides(part) if n not in found]
    return found


def strategy_identifiers(name: str) -> set[str]:
    """Every word that the strategy's rules (and those of the strategies it is built from) mention: a superset
    of the columns it reads."""
    if name.startswith(SOURCE_PREFIX):
        return set()
    strategy = get_strategy(name)
    # A rule over an external source reads the source's columns, not the pool's.
    rule = "" if strategy.source else f"{strategy.where} {strategy.order_by or ''}"
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rule))
    for part in strategy.parts:
        words |= strategy_identifiers(part)
    return words


def sources_read(name: str) -> set[str]:
    """The external sources whose samples the strategy (or a strategy it is built from) keeps."""
    strategy = get_strategy(name)
    own = {part.removeprefix(SOURCE_PREFIX) for part, _ in strategy.mixture if part.startswith(SOURCE_PREFIX)}
    if strategy.source:
        own.add(strategy.source)
    # `within` and `outside` only narrow a rule: their uids are not kept.
    kept_parts = set(strategy.parts) - {strategy.within, strategy.outside}
    return own.union(*(sources_read(p) for p in kept_parts))


def track(name: str) -> str:
    """"byod" when the strategy keeps samples from outside the pool, else "filtering"."""
    return "byod" if sources_read(name) else "filtering"
