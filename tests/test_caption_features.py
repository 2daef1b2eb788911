"""Caption features of a reference-schema metadata set, computed once and joined by the strategies."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.filtering.selection import select_uids
from datacomp_assets.core.caption_features import compute_caption_features
from datacomp_assets.core.language import caption_stats, identify_languages, identify_languages_cld3

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


# ---------------------------------------------------------------- on demand

def store_rows(store, group):
    """uid -> the group's values, over every part; a uid held twice fails."""
    parts = sorted(store.group_dir(group).glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None
    uids = table.column("uid").to_pylist() if table else []
    assert len(uids) == len(set(uids)), "a row was computed twice"
    return {u: row for u, row in zip(uids, table.drop_columns(["uid"]).to_pylist())} if table else {}


def test_a_rule_computes_only_the_features_it_reads_on_the_rows_that_pass_its_cheaper_terms(tmp_path):
    from datacomp_assets.core.caption_features import CaptionFeatureStore

    table = reference_files(tmp_path / "meta")
    store = CaptionFeatureStore(tmp_path / "store", processes=1, log=lambda _: None)
    b32 = table.column("clip_b32_similarity_score").to_numpy()
    cld3 = identify_languages_cld3(CAPTIONS)

    # LAION-2B: CLD3 only where the B/32 score passes (the reference's order), nothing else computed.
    kept = select_uids(tmp_path / "meta", "laion2b", reference_scorers=True, caption_features=store)
    candidates = [i for i in range(len(CAPTIONS)) if b32[i] >= np.float32(0.28)]
    assert 0 < len(candidates) < len(CAPTIONS)
    assert sorted(store_rows(store, "cld3")) == [f"{i:032x}" for i in candidates]
    assert not store.has("fasttext") and not store.has("counts")
    assert [int(lo) for _, lo in kept.tolist()] == [i for i in candidates if cld3[i] == "en"]

    # basic: counts where the image size passes (all rows here), fastText where the counts pass too.
    kept = select_uids(tmp_path / "meta", "basic", caption_features=store)
    stats = caption_stats(CAPTIONS)
    long_enough = [i for i in range(len(CAPTIONS)) if stats["num_words"][i] > 2 and stats["num_chars"][i] > 5]
    assert len(store_rows(store, "counts")) == len(CAPTIONS)
    fasttext = store_rows(store, "fasttext")
    assert sorted(fasttext) == [f"{i:032x}" for i in long_enough] and len(long_enough) < len(CAPTIONS)
    languages, _ = identify_languages(CAPTIONS)
    assert [fasttext[f"{i:032x}"]["language"] for i in long_enough] == [languages[i] for i in long_enough]
    assert [int(lo) for _, lo in kept.tolist()] == [i for i in long_enough if languages[i] == "en"]

    # image_based's caption terms need fastText on more rows (more than 1 token): only the new ones are computed,
    # as a new part; the rows already held are not computed again (store_rows fails on a repeat).
    parts = store.parts("fasttext")
    from datacomp_assets.filtering.selection import rows_where
    mask = rows_where(tmp_path / "meta", "language = 'en' AND num_tokens > 1 AND num_chars > 5",
                      caption_features=store)
    assert store.parts("fasttext") > parts
    more = [i for i in range(len(CAPTIONS)) if stats["num_tokens"][i] > 1 and stats["num_chars"][i] > 5]
    assert set(store_rows(store, "fasttext")) == {f"{i:032x}" for i in set(long_enough) | set(more)}
    assert np.flatnonzero(mask).tolist() == [i for i in more if languages[i] == "en"]

    # The same rule again computes nothing.
    before = {g: store.parts(g) for g in ("counts", "fasttext", "cld3")}
    again = select_uids(tmp_path / "meta", "basic", caption_features=store)
    assert np.array_equal(again, kept) and {g: store.parts(g) for g in before} == before


def test_the_store_is_emptied_when_the_pool_changes(tmp_path):
    from datacomp_assets.core.caption_features import CaptionFeatureStore

    reference_files(tmp_path / "meta")
    store = CaptionFeatureStore(tmp_path / "store", processes=1, log=lambda _: None)
    select_uids(tmp_path / "meta", "laion2b", reference_scorers=True, caption_features=store)
    assert store.has("cld3")
    path = tmp_path / "meta" / "00000001.parquet"
    pq.write_table(pq.read_table(path).slice(0, 2), path)  # a different pool: its features are not reused
    select_uids(tmp_path / "meta", "no_filter", caption_features=store)
    assert not store.has("cld3")


def test_without_a_store_a_rule_names_the_missing_feature(tmp_path):
    import pytest

    reference_files(tmp_path / "meta")
    with pytest.raises(ValueError, match="basic.*'language'"):
        select_uids(tmp_path / "meta", "basic")


def test_two_subsets_asking_at_once_compute_each_row_once(tmp_path):
    import threading

    from datacomp_assets.core.caption_features import CaptionFeatureStore

    reference_files(tmp_path / "meta")
    results, errors = [], []

    def run(rule: str) -> None:
        try:  # one store object each, as two Dagster steps would have
            store = CaptionFeatureStore(tmp_path / "store", processes=1, log=lambda _: None)
            results.append((rule, select_uids(tmp_path / "meta", rule, caption_features=store)))
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=run, args=("basic",)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert np.array_equal(results[0][1], results[1][1])
    store_rows(CaptionFeatureStore(tmp_path / "store"), "fasttext")  # fails on a row computed twice


def test_a_rule_is_split_into_its_terms_by_duckdbs_parser():
    import duckdb

    from datacomp_assets.filtering.selection import conjuncts

    con = duckdb.connect()
    terms = conjuncts(con, "language = 'en' AND (num_words > 2 OR x BETWEEN 1 AND 2) AND "
                           "b >= (SELECT quantile_disc(c, 0.7) FROM pool)")
    assert [columns for _, columns in terms] == [{"language"}, {"num_words", "x"}, {"b", "c"}]
    assert terms[1][0] == "((num_words > 2) OR (x BETWEEN 1 AND 2))"
