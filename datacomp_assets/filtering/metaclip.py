"""MetaCLIP curation ("Demystifying CLIP Data", Xu et al. 2023) as plain Python + numpy (no Dagster).

Reference (``/work/shared/reference/datacomp.md`` section 4, and upstream
``metaclip/metaclip1/substr_matching.py``):

1. **Matching.** A caption matches a metadata entry when ``" " + entry + " "`` occurs in the caption
   after spacing: the caption is wrapped in one space each side, each of ``, . ; : ? ! `` gets a space
   either side, and ``\\t \\n \\r`` become spaces (:func:`normalize_caption`). Case-sensitive; an entry
   occurs once per caption at most, however often it appears.
2. **Counting.** ``count_e`` = number of pool captions that match entry ``e`` (:func:`entry_counts`).
3. **Balancing.** ``p_e = t / max(count_e, t)``; a pair is kept with probability
   ``1 - prod_{e matched} (1 - p_e)`` (:func:`keep_probabilities`); pairs with no match are dropped.
   Entries with ``count_e <= t`` (the tail) have ``p_e = 1``, so every pair matching one is kept; pairs
   matching only one head entry are kept with ``t / count_e``, i.e. about ``t`` of them in expectation.
   ``t`` is 20,000 for a 400M pool and 170,000 for 2.5B upstream. Balancing is meant to be the last step.

Matching algorithm. Upstream does ``entry in text`` for every entry (or Aho-Corasick at scale). Here we
use an exactly equivalent token formulation that needs no dependency: split the spaced caption on
single spaces, ``" t " = " " + " ".join(parts) + " "``; ``" E "`` occurs in it iff ``E`` equals
``" ".join(parts[a:b])`` for some non-empty span of the inner parts (a space can only start and end on
part boundaries). So an entry with ``k`` space-separated pieces is a ``k``-gram lookup in a dict.
Single-piece entries are found with one C-level ``frozenset.intersection`` per caption; multi-piece
entries only at positions whose part is the first piece of some multi-piece entry. Edge cases follow
upstream too (double spaces, entries containing punctuation such as ``"Mr."`` never matching, the empty
entry matching an empty caption or a double space).

Map/reduce for scale (counts need the whole pool before any sampling):

- map 1: :func:`count_shard` per shard -> ``int64[n_entries]``; reduce: :func:`reduce_counts` (a sum).
- map 2: :func:`sample_shard` per shard with the global counts and ``shard_rng(seed, shard_index)``.

One-shard convenience: :func:`balance`. Lower-level pieces: :class:`EntryMatcher`,
:func:`match_entries`, :func:`entry_counts`, :func:`keep_probabilities`, :func:`sample_matches`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

PUNCTS_TO_WRAP: tuple[str, ...] = (",", ".", ";", ":", "?", "!", "`")
"""Characters that get a space either side (upstream ``puncts_to_wrap``)."""

CHARS_TO_SPACE: tuple[str, ...] = ("\t", "\n", "\r")
"""Characters replaced by a space (upstream ``chars_to_space``)."""

REFERENCE_T = {400_000_000: 20_000, 2_500_000_000: 170_000}
"""Upstream balancing thresholds by pool size."""


def _space_punctuation(text: str) -> str:
    for p in PUNCTS_TO_WRAP:
        if p in text:
            text = text.replace(p, f" {p} ")
    for c in CHARS_TO_SPACE:
        if c in text:
            text = text.replace(c, " ")
    return text


def normalize_caption(text: str) -> str:
    """Upstream ``spacing``: ``" " + text + " "`` with spaces put around punctuation.

    ``"a dog."`` -> ``" a dog . "``, so ``" dog "`` is found with plain substring search.
    """
    return f" {_space_punctuation(text)} "  # the outer spaces are neither punctuation nor \t \n \r


def _inner_parts(text: str) -> list[str]:
    """The space-separated parts of ``normalize_caption(text)`` without the two outer empty parts."""
    return _space_punctuation(text).split(" ")


class EntryMatcher:
    """A compiled metadata list (the "automaton"): finds which entries occur in a caption.

    Build once per metadata list and reuse it across shards; it is picklable (plain dicts and sets).
    Duplicate entry strings are allowed; each of their indices is reported.
    """

    def __init__(self, entries: Sequence[str]):
        self.entries: list[str] = list(entries)
        single: dict[str, list[int]] = {}
        multi: dict[str, list[int]] = {}
        lengths_by_first: dict[str, set[int]] = {}
        for i, entry in enumerate(self.entries):
            if not isinstance(entry, str):
                raise TypeError(f"metadata entry {i} is not a str: {entry!r}")
            pieces = entry.split(" ")
            if len(pieces) == 1:
                single.setdefault(entry, []).append(i)
            else:
                multi.setdefault(entry, []).append(i)
                lengths_by_first.setdefault(pieces[0], set()).add(len(pieces))
        self._single: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in single.items()}
        self._single_keys: frozenset[str] = frozenset(self._single)
        self._multi: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in multi.items()}
        self._multi_first: frozenset[str] = frozenset(lengths_by_first)
        self._lengths_by_first: dict[str, tuple[int, ...]] = {k: tuple(sorted(v)) for k, v in lengths_by_first.items()}

    @property
    def n_entries(self) -> int:
        return len(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, text: str) -> list[int]:
        """Sorted indices of the entries occurring in ``text`` (each at most once)."""
        parts = _inner_parts(text)
        single = self._single
        found: list[int] = []
        for tok in self._single_keys.intersection(parts):
            found.extend(single[tok])
        starts = self._multi_first.intersection(parts)
        if starts:
            multi = self._multi
            lengths_by_first = self._lengths_by_first
            n = len(parts)
            seen: set[str] = set()
            for i, tok in enumerate(parts):
                if tok in starts:
                    for k in lengths_by_first[tok]:
                        if i + k > n:
                            break
                        gram = " ".join(parts[i : i + k])
                        ids = multi.get(gram)
                        if ids is not None and gram not in seen:
                            seen.add(gram)
                            found.extend(ids)
        if len(found) > 1:
            found.sort()
        return found

    def match_many(self, texts: Iterable[str]) -> list[list[int]]:
        match = self.match
        return [match(t) for t in texts]

    def count(self, texts: Iterable[str]) -> np.ndarray:
        """Per-entry number of captions in ``texts`` matching it (``int64[n_entries]``)."""
        flat: list[int] = []
        extend = flat.extend
        match = self.match
        for t in texts:
            extend(match(t))
        return np.bincount(np.asarray(flat, dtype=np.int64), minlength=self.n_entries).astype(np.int64)


def _as_matcher(entries_or_matcher: Sequence[str] | EntryMatcher) -> EntryMatcher:
    if isinstance(entries_or_matcher, EntryMatcher):
        return entries_or_matcher
    return EntryMatcher(entries_or_matcher)


def build_matcher(entries: Sequence[str]) -> EntryMatcher:
    """Compile a metadata list once (pass the result to :func:`count_shard` / :func:`sample_shard`)."""
    return EntryMatcher(entries)


def match_entries(texts: Iterable[str], entries: Sequence[str] | EntryMatcher) -> list[list[int]]:
    """For each caption, the sorted indices of the metadata entries occurring in it."""
    return _as_matcher(entries).match_many(texts)


def entry_counts(matches: Iterable[Sequence[int]], n_entries: int) -> np.ndarray:
    """``int64[n_entries]``: how many captions match each entry."""
    flat = [i for m in matches for i in m]
    return np.bincount(np.asarray(flat, dtype=np.int64), minlength=n_entries).astype(np.int64)


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """``p_e = t / max(count_e, t)`` (1 for tail entries with ``count_e <= t``)."""
    if not t > 0:
        raise ValueError(f"t must be positive, got {t!r}")
    counts = np.asarray(counts, dtype=np.float64)
    return t / np.maximum(counts, float(t))


def keep_probabilities(matches: Sequence[Sequence[int]], counts: np.ndarray, t: float) -> np.ndarray:
    """``float64[len(matches)]``: ``1 - prod(1 - p_e)`` over each caption's matched entries; 0 if none."""
    p = entry_probabilities(counts, t)
    n = len(matches)
    lengths = np.fromiter((len(m) for m in matches), dtype=np.int64, count=n)
    flat = np.fromiter((i for m in matches for i in m), dtype=np.int64, count=int(lengths.sum()))
    owner = np.repeat(np.arange(n, dtype=np.int64), lengths)
    pe = p[flat]
    certain = pe >= 1.0
    # log(1 - p_e) summed per caption; p_e == 1 handled separately (log 0 = -inf).
    log_miss = np.log1p(-np.where(certain, 0.0, pe))
    miss = np.exp(np.bincount(owner, weights=log_miss, minlength=n))
    has_certain = np.bincount(owner, weights=certain.astype(np.float64), minlength=n) > 0
    probs = 1.0 - miss
    probs[has_certain] = 1.0
    probs[lengths == 0] = 0.0
    return probs


def sample_matches(
    matches: Sequence[Sequence[int]], counts: np.ndarray, t: float, rng: np.random.Generator
) -> np.ndarray:
    """Keep mask: one uniform draw per caption against :func:`keep_probabilities`."""
    probs = keep_probabilities(matches, counts, t)
    return rng.random(len(probs)) < probs


# ---------------------------------------------------------------------------------------- map/reduce


def count_shard(texts: Iterable[str], matcher: EntryMatcher | Sequence[str]) -> np.ndarray:
    """Map step 1: per-entry match counts of one shard (``int64[n_entries]``)."""
    return _as_matcher(matcher).count(texts)


def reduce_counts(shard_counts: Iterable[np.ndarray]) -> np.ndarray:
    """Reduce step: global counts are the sum of the shards' counts."""
    total: np.ndarray | None = None
    for c in shard_counts:
        c = np.asarray(c, dtype=np.int64)
        if total is None:
            total = c.copy()
        else:
            if c.shape != total.shape:
                raise ValueError(f"shard counts of different lengths: {c.shape} vs {total.shape}")
            total += c
    if total is None:
        raise ValueError("no shard counts to reduce")
    return total


def shard_rng(seed: int, shard_index: int) -> np.random.Generator:
    """Independent, reproducible generator for one shard (independent of shard processing order)."""
    return np.random.default_rng([int(seed), int(shard_index)])


def sample_shard(
    texts: Sequence[str],
    matcher: EntryMatcher | Sequence[str],
    counts: np.ndarray,
    t: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Map step 2: keep mask of one shard, given the *global* counts from :func:`reduce_counts`."""
    m = _as_matcher(matcher)
    counts = np.asarray(counts)
    if counts.shape != (m.n_entries,):
        raise ValueError(f"counts has shape {counts.shape}, expected ({m.n_entries},)")
    return sample_matches(m.match_many(texts), counts, t, rng)


def balance(texts: Sequence[str], entries: Sequence[str] | EntryMatcher, t: float, seed: int) -> np.ndarray:
    """Whole-pool MetaCLIP curation in one process: ``bool[len(texts)]`` keep mask.

    Counts over ``texts``, then one draw per caption from ``np.random.default_rng(seed)``.
    """
    m = _as_matcher(entries)
    matches = m.match_many(texts)
    counts = entry_counts(matches, m.n_entries)
    return sample_matches(matches, counts, t, np.random.default_rng(seed))


def read_entries(path: str | os.PathLike) -> list[str]:
    """MetaCLIP's metadata entries from a file: a JSON list of strings (upstream's metadata.json), or one entry per
    line of a text file."""
    import json

    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".json":
        entries = json.loads(text)
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError(f"{path}: expected a JSON list of strings (MetaCLIP's metadata.json)")
    else:
        entries = [line for line in text.splitlines() if line.strip()]
    if not entries:
        raise ValueError(f"{path}: no MetaCLIP entries")
    return entries
