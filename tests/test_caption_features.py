"""Caption features of a reference-schema metadata set, computed once and joined by the strategies."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.filtering.selection import select_uids
from datacomp_assets.metadata.caption_features import compute_caption_features
from datacomp_assets.metadata.language import caption_stats, identify_languages, identify_languages_cld3

CAPTIONS = ["a photo of a red circle on a table", "une photo d'un cercle rouge sur la table", "IMG_1234",
            "ein Foto von einem roten Kreis", "two\twords", None, "a dog playing in the snow with a ball",
            "caf\u00e9 au lait\nin a cup", "x"]


def reference_files(directory, parts=((0, 5), (5, 9))):
    """Metadata in the reference schema only (no language or count columns), split over two files."""
    directory.mkdir()
    n = len(CAPTIONS)
    table = pa.table({"uid": [f"{i:032x}" for i in range(n)], "text": CAPTIONS,
                      "original_width": [400] * n, "original_height": [300] * n,
                      "clip_b32_similarity_score": np.linspace(0.1, 0.4, n).astype(np.float32),
                      "clip_l14_similarity_score": np.linspace(0.1, 0.4, n).astype(np.float32)})
    for i, (start, stop) in enumerate(parts):
        pq.write_table(table.slice(start, stop - start), directory / f"{i:08d}.parquet")
    return table


def test_features_match_the_per_caption_functions_and_feed_the_strategies(tmp_path):
    table = reference_files(tmp_path / "meta")
    summary = compute_caption_features(tmp_path / "meta", tmp_path / "features", processes=2, log=lambda _: None)
    assert summary["files"] == summary["written"] == 2 and summary["rows"] == len(CAPTIONS)

    features = pq.read_table(tmp_path / "features").sort_by("uid")
    assert features.column("uid").to_pylist() == table.column("uid").to_pylist()
    languages, scores = identify_languages(CAPTIONS)
    assert features.column("language").to_pylist() == languages
    assert np.allclose(features.column("language_score").to_numpy(), scores)
    assert features.column("cld3_language").to_pylist() == identify_languages_cld3(CAPTIONS)
    for name, values in caption_stats(CAPTIONS).items():
        assert features.column(name).to_numpy().tolist() == values.tolist(), name

    # The basic rule over reference metadata + these features keeps exactly the English captions with more
    # than two words and five characters (every image here is 400 x 300).
    kept = select_uids(tmp_path / "meta", "basic", feature_dirs=[tmp_path / "features"])
    stats = caption_stats(CAPTIONS)
    expected = [i for i in range(len(CAPTIONS))
                if languages[i] == "en" and stats["num_words"][i] > 2 and stats["num_chars"][i] > 5]
    assert [int(lo) for _, lo in kept.tolist()] == expected


def test_an_interrupted_run_resumes_and_a_corrupt_output_is_redone(tmp_path):
    reference_files(tmp_path / "meta")
    out = tmp_path / "features"
    compute_caption_features(tmp_path / "meta", out, processes=1, log=lambda _: None)
    (out / "00000001.parquet").write_bytes(b"not parquet")  # e.g. a disk that filled up mid-write
    first = (out / "00000000.parquet").stat().st_mtime_ns
    summary = compute_caption_features(tmp_path / "meta", out, processes=1, log=lambda _: None)
    assert summary["skipped"] == 1 and summary["written"] == 1
    assert (out / "00000000.parquet").stat().st_mtime_ns == first
    assert pq.read_table(out / "00000001.parquet").num_rows == 4
