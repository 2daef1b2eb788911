"""MetaCLIP curation (datacomp_assets/filtering/metaclip.py): matching, counts, probabilities, sampling."""

from __future__ import annotations

import random

import numpy as np
import pytest

from datacomp_assets.filtering.metaclip import (
    EntryMatcher,
    balance,
    count_shard,
    entry_counts,
    entry_probabilities,
    keep_probabilities,
    match_entries,
    normalize_caption,
    reduce_counts,
    sample_shard,
    shard_rng,
)


def _naive(texts, entries):
    """Upstream substr_matching: `" entry " in spacing(text)` for every entry."""
    spaced = [f" {e} " for e in entries]
    return [[i for i, e in enumerate(spaced) if e in normalize_caption(t)] for t in texts]


# ------------------------------------------------------------------------------------------ matching


def test_normalize_caption_spaces_punctuation():
    # upstream wraps each punctuation mark in spaces after adding the outer spaces (so doubles can occur)
    assert normalize_caption("a dog.") == " a dog .  "
    assert normalize_caption("dog,cat;bird:fish?yes!`q`") == " dog , cat ; bird : fish ? yes !  ` q `  "
    assert normalize_caption("a\tb\nc\rd") == " a b c d "
    assert normalize_caption("") == "  "


def test_punctuation_words_and_phrases():
    entries = ["dog", "hot dog", "cat", "Dog", "New York City"]
    texts = [
        "a dog.",  # trailing punctuation
        "dogs playing",  # plural is a different word
        "hot dog, with mustard",  # multi-word entry and its last word
        "hotdog",  # no boundary
        "DOG dog!",  # case-sensitive
        "I love New York City!",
        "New York",  # partial phrase
        "(dog)",  # parentheses are not wrapped upstream
        "cat,dog",
        "",
    ]
    assert match_entries(texts, entries) == [
        [0],
        [],
        [0, 1],
        [],
        [0],
        [4],
        [],
        [],
        [0, 2],
        [],
    ]


def test_each_entry_counted_once_per_caption_and_duplicates():
    entries = ["dog", "a", "dog", "big dog"]
    assert match_entries(["dog dog dog", "a big dog and a big dog"], entries) == [[0, 2], [0, 1, 2, 3]]


def test_matches_upstream_substring_semantics_on_random_text():
    rng = random.Random(0)
    words = ["a", "b", "c", "dog", "hot", "Dog", ".", ",", "x.y", ""]
    entries = sorted({" ".join(rng.choices(words, k=rng.randint(1, 3))) for _ in range(200)})
    entries += ["", " a", "a ", "a  b", "Mr.", ". ,"]
    seps = [" ", " ", " ", "  ", ".", ",", "\t", "!"]
    texts = []
    for _ in range(500):
        n = rng.randint(0, 8)
        texts.append("".join(rng.choice(words) + rng.choice(seps) for _ in range(n)))
    assert match_entries(texts, entries) == _naive(texts, entries)


def test_matcher_reuse_equals_entry_list():
    entries = ["dog", "hot dog"]
    m = EntryMatcher(entries)
    texts = ["hot dog.", "dog"]
    assert match_entries(texts, m) == match_entries(texts, entries)
    assert m.n_entries == len(m) == 2


# -------------------------------------------------------------------------------- counts / probabilities


def test_entry_counts_and_count_shard():
    entries = ["dog", "cat", "hot dog", "bird"]
    texts = ["a dog.", "a cat and a dog", "hot dog!", "dog dog", "nothing"]
    matches = match_entries(texts, entries)
    counts = entry_counts(matches, len(entries))
    assert counts.dtype == np.int64
    assert counts.tolist() == [4, 1, 1, 0]
    assert count_shard(texts, EntryMatcher(entries)).tolist() == [4, 1, 1, 0]
    # map/reduce: per-shard counts sum to the whole-pool counts
    shards = [texts[:2], texts[2:4], texts[4:]]
    total = reduce_counts(count_shard(s, entries) for s in shards)
    assert total.tolist() == counts.tolist()


def test_probabilities_hand_computed():
    counts = np.array([10, 40, 100, 0])
    t = 20
    np.testing.assert_allclose(entry_probabilities(counts, t), [1.0, 0.5, 0.2, 1.0])
    matches = [[0], [1], [2], [1, 2], [0, 2], [], [1, 1]]
    probs = keep_probabilities(matches, counts, t)
    # [1,2]: 1 - (1-0.5)(1-0.2) = 0.6 ; [1,1]: 1 - 0.25
    np.testing.assert_allclose(probs, [1.0, 0.5, 0.2, 0.6, 1.0, 0.0, 0.75])
    assert keep_probabilities([], counts, t).shape == (0,)
    with pytest.raises(ValueError):
        entry_probabilities(counts, 0)


# --------------------------------------------------------------------------------------------- sampling


def _pool():
    """Head entry "dog" in 20,000 captions, tail entry "cat" in 50, 30 without any entry."""
    texts = ["a dog."] * 20_000 + ["a cat"] * 50 + ["a dog and a cat"] * 10 + ["nothing here"] * 30
    return texts, ["dog", "cat"]


def test_tail_kept_head_downsampled_no_match_dropped():
    texts, entries = _pool()
    t = 1_000
    mask = balance(texts, entries, t=t, seed=0)
    assert mask.dtype == bool and mask.shape == (len(texts),)
    head, tail, both, none = mask[:20_000], mask[20_000:20_050], mask[20_050:20_060], mask[20_060:]
    assert tail.all()  # count("cat") = 60 <= t: always kept
    assert both.all()  # matches a tail entry too
    assert not none.any()  # no match: dropped
    # "dog" count = 20,010 -> p = t / 20,010; expected head kept = 20,000 * p ~= 999.5, sd ~= 30.8
    expected = 20_000 * t / 20_010
    sd = np.sqrt(20_000 * (t / 20_010) * (1 - t / 20_010))
    assert abs(head.sum() - expected) < 4 * sd


def test_entries_under_threshold_always_kept():
    texts = [f"item {i % 7}" for i in range(700)]  # each of "0".."6" in 100 captions
    entries = [str(i) for i in range(10)]
    mask = balance(texts, entries, t=100, seed=3)
    assert mask.all()


def test_determinism_and_seed_sensitivity():
    texts, entries = _pool()
    a = balance(texts, entries, t=500, seed=7)
    b = balance(texts, entries, t=500, seed=7)
    c = balance(texts, entries, t=500, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_map_reduce_sampling():
    texts, entries = _pool()
    m = EntryMatcher(entries)
    shards = [texts[i : i + 4_000] for i in range(0, len(texts), 4_000)]
    counts = reduce_counts(count_shard(s, m) for s in shards)
    assert counts.tolist() == [20_010, 60]

    def run():
        return np.concatenate([sample_shard(s, m, counts, 1_000, shard_rng(11, i)) for i, s in enumerate(shards)])

    mask = run()
    np.testing.assert_array_equal(mask, run())
    assert mask[20_000:20_060].all() and not mask[20_060:].any()
    expected = 20_000 * 1_000 / 20_010
    assert abs(mask[:20_000].sum() - expected) < 4 * np.sqrt(expected)
    with pytest.raises(ValueError):
        sample_shard(shards[0], m, counts[:1], 1_000, shard_rng(11, 0))
