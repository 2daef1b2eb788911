"""Caption features (language ID, counts) and the metadata shard format."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.schema import (
    EXTRA_COLUMNS,
    NPZ_KEYS,
    POOL_METADATA_SCHEMA,
    validate_metadata,
    write_metadata_shard,
)
from datacomp_assets.core.language import caption_stats, identify_languages


def test_identify_languages_top1_labels():
    texts = ["a photo of a red circle", "une photo d'un cercle rouge",
             "ein Foto von einem roten Kreis", "una foto de un círculo rojo"]
    labels, scores = identify_languages(texts)
    assert labels == ["en", "fr", "de", "es"]
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert ((scores > 0) & (scores <= 1)).all()


def test_identify_languages_handles_newlines_empty_and_bad_unicode():
    labels, scores = identify_languages(["a photo\nof a red circle", "", "caf\udce9 au lait"])
    assert labels[0] == "en" and len(labels) == 3 and all(labels)
    labels, scores = identify_languages([])
    assert labels == [] and scores.shape == (0,)


def test_caption_stats_counts():
    stats = caption_stats(["a photo of a red circle", "  two\twords ", "", "a\u00a0b"])
    assert stats["num_words"].tolist() == [6, 2, 0, 2]  # str.split() splits on U+00A0
    assert stats["num_chars"].tolist() == [23, 12, 0, 3]
    assert stats["num_tokens"].tolist() == [6, 2, 0, 1]  # fastText splits on ASCII whitespace only
    assert all(a.dtype == np.int32 for a in stats.values())


def _table(n=3, drop=()):
    columns = {
        "uid": [f"{i:032x}" for i in range(n)], "url": ["http://x"] * n, "text": ["a cat"] * n,
        "original_width": pa.array([300] * n, pa.int64()), "original_height": pa.array([200] * n, pa.int64()),
        "clip_b32_similarity_score": pa.array([0.3] * n, pa.float32()),
        "clip_l14_similarity_score": pa.array([0.2] * n, pa.float32()),
        "face_bboxes": pa.array([[[0.1, 0.1, 0.2, 0.2]]] * n, pa.list_(pa.list_(pa.float64()))),
        "sha256": ["0" * 64] * n,
        "language": ["en"] * n, "language_score": pa.array([0.9] * n, pa.float32()), "cld3_language": ["en"] * n,
        "num_words": [2] * n, "num_chars": [5] * n, "num_tokens": [2] * n,  # int64: cast on write
    }
    return pa.table({k: v for k, v in columns.items() if k not in drop})


def test_validate_metadata_names_file_and_missing_columns(tmp_path):
    path = tmp_path / "00000000.parquet"
    pq.write_table(_table(drop=("sha256", "clip_l14_similarity_score")), path)
    with pytest.raises(ValueError, match="00000000.parquet") as err:
        validate_metadata(path)
    assert "sha256" in str(err.value) and "clip_l14_similarity_score" in str(err.value)
    validate_metadata(_table())
    with pytest.raises(ValueError, match="num_tokens"):
        validate_metadata(_table(drop=("num_tokens",)), require_extra=True)


def test_write_metadata_shard(tmp_path):
    n = 3
    emb = {k: np.random.default_rng(0).standard_normal((n, 512 if k.startswith("b32") else 768))
           for k in NPZ_KEYS}
    write_metadata_shard(_table(n), emb, tmp_path / "00000001")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000001.npz", "00000001.parquet"]
    table = pq.read_table(tmp_path / "00000001.parquet")
    expected = pa.schema(list(POOL_METADATA_SCHEMA) + list(EXTRA_COLUMNS))
    assert table.schema.remove_metadata().equals(expected)
    npz = np.load(tmp_path / "00000001.npz")
    assert set(npz.files) == set(NPZ_KEYS)
    assert npz["b32_img"].dtype == np.float16
    np.testing.assert_array_equal(npz["l14_txt"], emb["l14_txt"].astype(np.float16))
    with pytest.raises(ValueError, match="rows"):
        write_metadata_shard(_table(n), {"b32_img": np.zeros((n + 1, 512))}, tmp_path / "00000002")
    assert not list(tmp_path.glob("00000002*"))
