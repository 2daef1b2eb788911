"""Byte-pair-encoding merges in the file format of open_clip's `SimpleTokenizer` (CLIP's BPE), learned from texts.

The tiny captioner (`datacomp-tiny-coca`) decodes into a vocabulary learned from the synthetic world's captions
instead of CLIP's 49,408 tokens: a captioner's decoder scores every token of its vocabulary at every position, and
with CLIP's that softmax is over 90% of a training step on a CPU. The tokenizer itself is open_clip's, unchanged:
the same cleaning, word splitting and byte alphabet, only another merges file (`text_cfg.tokenizer_kwargs`).
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

# open_clip's SimpleTokenizer: 256 byte symbols, the same 256 ending a word, then one token per merge, then
# <start_of_text> and <end_of_text>.
BASE_SYMBOLS = 512
SPECIAL_TOKENS = 2
HEADER = "#version: datacomp-tiny-captioner (learned by datacomp_assets.core.bpe)"


def vocabulary_size(n_merges: int) -> int:
    """The token count of a SimpleTokenizer built from `n_merges` merges (a model's `vocab_size`)."""
    return BASE_SYMBOLS + n_merges + SPECIAL_TOKENS


def _words(texts: Iterable[str]) -> Counter:
    """Each word as open_clip's tokenizer sees it before merging (cleaned, split, bytes as symbols, the last one
    marked `</w>`), counted."""
    import regex
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer(context_length=None)  # CLIP's own: its cleaning, pattern and byte alphabet
    words: Counter = Counter()
    for text in texts:
        for token in regex.findall(reference.pat, reference.clean_fn(text)):
            symbols = "".join(reference.byte_encoder[b] for b in token.encode("utf-8"))
            words[tuple(symbols[:-1]) + (symbols[-1] + "</w>",)] += 1
    return words


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(texts: Iterable[str], max_merges: int, min_count: int = 2) -> list[tuple[str, str]]:
    """Sennrich et al.'s BPE: repeatedly merge the most frequent adjacent pair of symbols (ties: the
    lexicographically smallest pair), until `max_merges` or no pair occurs `min_count` times. A pair whose
    merged symbol already exists is never merged again, so every merge adds one distinct token (open_clip's
    tokenizer numbers tokens by their merge)."""
    words = _words(texts)
    merges: list[tuple[str, str]] = []
    symbols = {s for word in words for s in word}
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        candidates = [(-count, pair) for pair, count in pairs.items()
                      if count >= min_count and pair[0] + pair[1] not in symbols]
        if not candidates:
            break
        _, best = min(candidates)
        merges.append(best)
        symbols.add(best[0] + best[1])
        words = Counter({_merge(word, best): count for word, count in words.items()})
    return merges


def write_merges(merges: list[tuple[str, str]], path: str | os.PathLike) -> None:
    """A gzip merges file that open_clip's `SimpleTokenizer(bpe_path=...)` reads; byte-identical for the same
    merges (no timestamp in the gzip header)."""
    # No newline at the end: open_clip would read an empty last line as one more (empty) merge.
    text = "\n".join([HEADER, *(f"{a} {b}" for a, b in merges)])
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(text.encode("utf-8"))


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    lines = gzip.open(Path(path)).read().decode("utf-8").split("\n")[1:]
    return [tuple(line.split()) for line in lines if line]
