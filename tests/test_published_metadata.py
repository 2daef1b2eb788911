"""pool_metadata at a published pool: the published files linked as they are, and the pool's sorted uid index."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.uid_index import load_uid_index
from datacomp_assets.core.uids import arrow_uids_to_array, sort_uids
from datacomp_assets.metadata.published import link_published_metadata
from datacomp_assets.world.published_mirror import write_synthetic_mirror


@pytest.fixture
def mirror(tmp_path):
    return write_synthetic_mirror(tmp_path / "mirror", rows=3_000, files=3, progress=None)


def test_published_files_are_linked_as_they_are_with_the_pools_uid_index(mirror, tmp_path):
    summary = link_published_metadata(mirror, tmp_path / "out", log=lambda _: None)
    assert (summary["files"], summary["embedding_files"], summary["rows_indexed"]) == (3, 3, 3_000)
    for source in mirror:
        for suffix in (".parquet", ".npz"):
            link = (tmp_path / "out" / source.name).with_suffix(suffix)
            assert link.is_symlink() and link.resolve() == source.with_suffix(suffix).resolve()
    # no caption feature is computed here: the rules that read one compute it
    assert "language" not in pq.read_schema(tmp_path / "out" / mirror[0].name).names
    index = load_uid_index(tmp_path / "out")
    uids = arrow_uids_to_array(pq.read_table(mirror, columns=["uid"]).column("uid").combine_chunks())
    assert np.array_equal(index.sorted_uids, sort_uids(uids))
    assert np.array_equal(index.sorted_uids[index.rank], uids)  # each row's rank finds its own uid


def test_materializing_again_with_fewer_files_drops_the_others(mirror, tmp_path):
    link_published_metadata(mirror, tmp_path / "out", log=lambda _: None)
    link_published_metadata(mirror[:2], tmp_path / "out", log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == [m.name for m in mirror[:2]]
    assert not (tmp_path / "out" / mirror[2].with_suffix(".npz").name).exists()
    assert load_uid_index(tmp_path / "out").rows == pq.read_table(mirror[:2]).num_rows


def test_a_malformed_published_file_is_named_before_any_work(mirror, tmp_path):
    table = pq.read_table(mirror[1]).drop(["clip_l14_similarity_score"])
    pq.write_table(table, mirror[1])
    with pytest.raises(ValueError, match=rf"{mirror[1].name}: missing metadata columns clip_l14_similarity_score"):
        link_published_metadata(mirror, tmp_path / "out", log=lambda _: None)
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_a_file_with_a_bad_uid_is_named(mirror, tmp_path):
    table = pq.read_table(mirror[2])
    uids = table.column("uid").to_pylist()
    uids[5] = "not-a-uid"
    pq.write_table(table.set_column(0, "uid", pa.array(uids)), mirror[2])
    with pytest.raises(ValueError, match=rf"{mirror[2].name}: cannot read its uids: .*not-a-uid"):
        link_published_metadata(mirror, tmp_path / "out", log=lambda _: None)
