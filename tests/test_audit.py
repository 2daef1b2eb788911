"""The filter audit: kept share of the pool per group, checked against hand-counted expectations."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.uids import UID_DTYPE, uids_to_array
from datacomp_assets.filtering.audit import audit_markdown, audit_subset


def _uid(i: int) -> str:
    return f"{0xF000000000000000 + i:016x}{i:016x}"  # high bit set: the halves exceed int64


TWELVE_WORDS = "one two three four five six seven eight nine ten eleven twelve"
# language, text, width, height, concept | truth kind, object (row 9 has no truth row)
ROWS = [
    ("en", "", 50, 40, "vehicle", "short", "car"),  # 0 words, min 40, ratio 1.25
    ("en", "car", 150, 100, "vehicle", "short", "car"),  # ratio exactly 1.5
    ("en", "a red car", 300, 200, "vehicle", "clean", "car"),
    ("en", "a red car on the road", 1200, 400, "vehicle", "clean", "car"),  # ratio exactly 3
    ("en", TWELVE_WORDS, 800, 200, "animal", "clean", "dog"),  # ratio 4
    ("en", "two\u00a0dogs", 100, 100, "animal", "clean", "dog"),  # NBSP splits words, as str.split() does
    ("de", "ein roter wagen", 400, 400, "vehicle", "non_english", "car"),
    ("de", "ein hund", 90, 300, "animal", "non_english", "dog"),
    ("fr", "un chien noir", 250, 500, None, "non_english", "dog"),
    (None, "x y z w", None, 200, None, None, None),
]
KEPT_ROWS = [1, 2, 2, 2, 3, 4, 6]  # row 2 up-weighted three times
NOT_IN_POOL = "0" * 32


def _write_pool(directory, rows=ROWS, drop=()):
    """Two shards of metadata, and a ground truth (with one uid the metadata lacks) beside them."""
    directory.mkdir()
    cols = {
        "uid": [_uid(i) for i in range(len(rows))],
        "text": [r[1] for r in rows],
        "original_width": pa.array([r[2] for r in rows], pa.int64()),
        "original_height": pa.array([r[3] for r in rows], pa.int64()),
        "language": [r[0] for r in rows],
        "concept": pa.array([r[4] for r in rows], pa.string()),
    }
    table = pa.table({k: v for k, v in cols.items() if k not in drop})
    half = len(rows) // 2
    pq.write_table(table.slice(0, half), directory / "00000.parquet")
    pq.write_table(table.slice(half), directory / "00001.parquet")
    with_truth = [i for i, r in enumerate(rows) if r[5] is not None]
    truth = pa.table({
        "uid": [_uid(i) for i in with_truth] + [NOT_IN_POOL],
        "kind": [rows[i][5] for i in with_truth] + ["unsafe"],
        "object": [rows[i][6] for i in with_truth] + ["cat"],
    })
    truth_path = directory.parent / "truth.parquet"
    pq.write_table(truth, truth_path)
    return truth_path


def _subset(indices, extra=()):
    return uids_to_array([_uid(i) for i in indices] + list(extra))


def _table(rows):
    return [(r["group"], r["pool"], r["kept"]) for r in rows]


def test_audit_counts_each_dimension(tmp_path):
    truth = _write_pool(tmp_path / "meta")
    audit = audit_subset(tmp_path / "meta", _subset(KEPT_ROWS, [NOT_IN_POOL]), truth, concept_column="concept")

    assert _table(audit["language"]) == [("en", 6, 4), ("de", 2, 1), ("(missing)", 1, 0), ("fr", 1, 0)]
    assert _table(audit["caption_words"]) == [("0", 1, 0), ("1-2", 3, 1), ("3-5", 4, 2), ("6-10", 1, 1),
                                              (">10", 1, 1)]
    assert _table(audit["image_min_side"]) == [("<100", 2, 0), ("100-199", 2, 1), ("200-399", 3, 2),
                                               (">=400", 2, 2), ("(missing)", 1, 0)]
    assert _table(audit["aspect_ratio"]) == [("<=1.5", 5, 3), ("1.5-3", 2, 1), (">3", 2, 1), ("(missing)", 1, 0)]
    assert _table(audit["concept"]) == [("vehicle", 5, 4), ("animal", 3, 1), ("(missing)", 2, 0)]
    # The truth-only uid (kind "unsafe", object "cat") is not in the pool, so it counts nowhere.
    assert _table(audit["ground_truth_kind"]) == [("clean", 4, 3), ("non_english", 3, 1), ("short", 2, 1),
                                                  ("(missing)", 1, 0)]
    assert _table(audit["ground_truth_object"]) == [("car", 5, 4), ("dog", 4, 1), ("(missing)", 1, 0)]
    assert audit["language"][0]["kept_share"] == pytest.approx(4 / 6)
    assert audit["overall"] == [{"group": "all", "pool": 10, "kept": 5, "kept_share": 0.5,
                                 "kept_unique": 6, "kept_with_repeats": 8}]


def test_optional_dimensions_absent_unless_asked(tmp_path):
    _write_pool(tmp_path / "meta")
    audit = audit_subset(tmp_path / "meta", _subset(KEPT_ROWS))
    assert list(audit) == ["language", "caption_words", "image_min_side", "aspect_ratio", "overall"]


def test_long_tail_folds_into_other(tmp_path):
    # 14 languages: "l00" has 14 rows, "l01" 13, ... "l13" 1; the two smallest fold into "(other)".
    rows = [(f"l{k:02d}", "a b c", 300, 300, None, None, None) for k in range(14) for _ in range(14 - k)]
    _write_pool(tmp_path / "meta", rows)
    audit = audit_subset(tmp_path / "meta", _subset([len(rows) - 1, len(rows) - 3]))  # an "l13" and an "l12"
    language = audit["language"]
    assert [r["group"] for r in language] == [f"l{k:02d}" for k in range(12)] + ["(other)"]
    assert (language[-1]["pool"], language[-1]["kept"], language[-1]["kept_share"]) == (3, 2, 2 / 3)


def test_empty_subset_keeps_nothing(tmp_path):
    truth = _write_pool(tmp_path / "meta")
    audit = audit_subset(tmp_path / "meta", np.empty(0, dtype=UID_DTYPE), truth, concept_column="concept")
    assert all(r["kept"] == 0 and r["kept_share"] == 0.0 for rows in audit.values() for r in rows)
    assert sum(r["pool"] for r in audit["language"]) == len(ROWS)
    assert (audit["overall"][0]["kept_unique"], audit["overall"][0]["kept_with_repeats"]) == (0, 0)


def test_num_words_column_is_preferred(tmp_path):
    (tmp_path / "meta").mkdir()
    pq.write_table(pa.table({"uid": [_uid(0)], "text": ["two words"], "original_width": [300],
                             "original_height": [300], "language": ["en"], "num_words": pa.array([20], pa.int32())}),
                   tmp_path / "meta" / "00000.parquet")
    assert _table(audit_subset(tmp_path / "meta", _subset([0]))["caption_words"]) == [(">10", 1, 1)]


def test_languages_come_from_the_caption_feature_store_when_the_metadata_has_none(tmp_path):
    _write_pool(tmp_path / "meta", drop=("language",))
    assert _table(audit_subset(tmp_path / "meta", _subset([1]))["language"]) == [("(not computed)", len(ROWS), 1)]
    # the store holds the languages of the rows some rule needed (here rows 0-3)
    (tmp_path / "fasttext").mkdir()
    pq.write_table(pa.table({"uid": [_uid(i) for i in range(4)], "language": [ROWS[i][0] for i in range(4)]}),
                   tmp_path / "fasttext" / "00000.0.parquet")
    audit = audit_subset(tmp_path / "meta", _subset([1]), language_dir=tmp_path / "fasttext")
    assert sum(r["pool"] for r in audit["language"]) == len(ROWS)
    assert ("(not computed)", len(ROWS) - 4, 0) in _table(audit["language"])


def test_missing_columns_are_named(tmp_path):
    _write_pool(tmp_path / "meta", drop=("original_width",))
    with pytest.raises(ValueError, match=r"00000\.parquet.*'original_width'"):
        audit_subset(tmp_path / "meta", _subset([1]))
    truth = _write_pool(tmp_path / "meta2")
    with pytest.raises(ValueError, match=r"'topic'.*meta2"):
        audit_subset(tmp_path / "meta2", _subset([1]), concept_column="topic")
    pq.write_table(pa.table({"uid": [_uid(0)], "kind": ["clean"]}), truth)
    with pytest.raises(ValueError, match=r"truth\.parquet.*'object'"):
        audit_subset(tmp_path / "meta2", _subset([1]), truth)
    with pytest.raises(FileNotFoundError, match="no metadata parquet"):
        audit_subset(tmp_path / "nowhere", _subset([1]))


def test_markdown_has_a_table_per_dimension(tmp_path):
    truth = _write_pool(tmp_path / "meta")
    text = audit_markdown(audit_subset(tmp_path / "meta", _subset(KEPT_ROWS), truth, concept_column="concept"))
    for name in ("language", "caption_words", "image_min_side", "aspect_ratio", "concept", "ground_truth_kind",
                 "ground_truth_object", "overall"):
        assert f"**{name}**" in text
    assert text.count("| group | pool | kept | kept share % |") == 8
    assert "| en | 6 | 4 | 66.7 |" in text
    assert "| >10 | 1 | 1 | 100.0 |" in text
    assert "with repeats: 7" in text
