"""pool_metadata at a published pool: the published files joined with caption features, file by file, resumable."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.schema import FULL_SCHEMA, POOL_METADATA_SCHEMA
from datacomp_assets.core.caption_features import caption_features
from datacomp_assets.metadata.published import join_caption_features
from datacomp_assets.world.published_mirror import write_synthetic_mirror


@pytest.fixture
def mirror(tmp_path):
    return write_synthetic_mirror(tmp_path / "mirror", rows=3_000, files=3, progress=None)


def test_published_columns_are_kept_as_they_are_and_caption_features_joined_row_for_row(mirror, tmp_path):
    summary = join_caption_features(mirror, tmp_path / "out", processes=2, log=lambda _: None)
    assert (summary["files"], summary["written"], summary["rows_computed"]) == (3, 3, 3_000)
    for source in mirror:
        written = pq.read_table(tmp_path / "out" / source.name)
        published = pq.read_table(source)
        assert written.schema.names == FULL_SCHEMA.names
        assert written.select(POOL_METADATA_SCHEMA.names).equals(published.cast(POOL_METADATA_SCHEMA))
        expected = caption_features(published.select(["uid", "text"]))
        for column in ("language", "cld3_language", "num_words", "num_chars", "num_tokens"):
            assert written[column].to_pylist() == expected[column].to_pylist()
        link = (tmp_path / "out" / source.name).with_suffix(".npz")
        assert link.is_symlink() and link.resolve() == source.with_suffix(".npz").resolve()


def test_an_interrupted_run_resumes_with_the_files_not_yet_written(mirror, tmp_path):
    out = tmp_path / "out"
    join_caption_features(mirror[:1], out, processes=1, log=lambda _: None)
    before = os.stat(out / mirror[0].name).st_mtime_ns
    (out / "partial.parquet.tmp").write_bytes(b"half a file")  # what a killed writer leaves is never read
    summary = join_caption_features(mirror, out, processes=1, log=lambda _: None)
    assert (summary["written"], summary["skipped"]) == (2, 1)
    assert os.stat(out / mirror[0].name).st_mtime_ns == before
    assert pq.read_table(sorted(out.glob("*.parquet"))).num_rows == 3_000


def test_a_malformed_published_file_is_named_before_any_work(mirror, tmp_path):
    table = pq.read_table(mirror[1]).drop(["clip_l14_similarity_score"])
    pq.write_table(table, mirror[1])
    with pytest.raises(ValueError, match=rf"{mirror[1].name}: missing metadata columns clip_l14_similarity_score"):
        join_caption_features(mirror, tmp_path / "out", processes=1, log=lambda _: None)
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_a_file_without_captions_still_gets_its_features(tmp_path):
    (tmp_path / "mirror").mkdir()
    rows = {name: [None] for name in POOL_METADATA_SCHEMA.names}
    rows.update(uid=["0" * 32], text=[""], face_bboxes=[[]])
    pq.write_table(pa.table(rows, schema=POOL_METADATA_SCHEMA), tmp_path / "mirror" / "0000.parquet")
    join_caption_features([tmp_path / "mirror" / "0000.parquet"], tmp_path / "out", processes=1, log=lambda _: None)
    written = pq.read_table(tmp_path / "out" / "0000.parquet")
    assert written["num_words"].to_pylist() == [0]
