"""Set operations on sorted uid arrays agree with NumPy's (they exist to be fast at 12.8M uids)."""

import numpy as np
import pyarrow as pa
import pytest

from datacomp_assets.core.uids import (
    UID_DTYPE, array_to_uids, arrow_uids_to_array, intersect_sorted, isin_sorted, sort_uids, union_sorted,
    unique_sorted)


def uids(rng, n, shared_high=0):
    arr = np.empty(n, UID_DTYPE)
    arr["f0"], arr["f1"] = rng.integers(0, 2**63, n, dtype=np.uint64), rng.integers(0, 2**63, n, dtype=np.uint64)
    arr["f0"][:shared_high] = 7  # uids that share a high half exercise the slow path
    return arr


def test_set_operations_match_numpy_including_shared_high_halves_and_repeats():
    rng = np.random.default_rng(0)
    pool = uids(rng, 5_000, shared_high=40)
    a = sort_uids(np.concatenate([pool[rng.choice(5_000, 2_000)], uids(rng, 300, shared_high=5)]))  # repeats too
    b = sort_uids(pool[rng.choice(5_000, 3_000)])
    assert np.array_equal(unique_sorted(a), np.unique(a))
    assert np.array_equal(isin_sorted(a, sort_uids(pool)), np.isin(a, pool))
    assert np.array_equal(intersect_sorted(a, b), np.intersect1d(a, b))
    assert np.array_equal(union_sorted(a, b), np.union1d(a, b))
    assert not isin_sorted(a, np.empty(0, UID_DTYPE)).any()


def test_arrow_uids_parse_fast_and_name_a_bad_one():
    rng = np.random.default_rng(1)
    arr = uids(rng, 1_000)
    assert np.array_equal(arrow_uids_to_array(pa.array(array_to_uids(arr))), arr)
    with pytest.raises(ValueError, match="not a 32-char hex uid: 0123456789abcdefg"):
        arrow_uids_to_array(pa.array(["0123456789abcdefg123456789abcdef"]))


def write_pool(directory, arr, files=3):
    import pyarrow.parquet as pq

    directory.mkdir(exist_ok=True)
    for i, part in enumerate(np.array_split(arr, files)):
        pq.write_table(pa.table({"uid": array_to_uids(part), "x": np.arange(len(part))}), directory / f"{i:04d}.parquet")


def test_the_uid_index_gives_the_sorted_uids_of_any_rows_and_is_rebuilt_when_the_pool_changes(tmp_path):
    from datacomp_assets.core.uid_index import load_uid_index, uid_index, write_uid_index

    rng = np.random.default_rng(1)
    pool = uids(rng, 3_000, shared_high=30)
    pool[100] = pool[2_500]  # a uid twice in the pool: both rows are kept
    write_pool(tmp_path / "meta", pool)
    assert load_uid_index(tmp_path / "meta") is None
    index = write_uid_index(tmp_path / "meta")
    assert load_uid_index(tmp_path / "meta") is not None

    rows = np.sort(rng.choice(3_000, 1_200, replace=False))
    rows = np.union1d(rows, [100, 2_500])
    file_index = np.searchsorted(index.starts, rows, side="right") - 1
    pairs = (file_index.astype(np.uint64), rows - index.starts[file_index])
    half = len(rows) // 2  # in two batches, out of order, one pair repeated
    batches = [(pairs[0][half:], pairs[1][half:]), (pairs[0][:half + 1], pairs[1][:half + 1])]
    assert np.array_equal(index.subset(batches), sort_uids(pool[rows]))
    assert np.array_equal(index.subset([(file_index.astype(np.uint64)[:0], rows[:0])]), pool[:0])

    write_pool(tmp_path / "meta", pool[::-1])  # the same names, other contents: the written index is stale
    assert load_uid_index(tmp_path / "meta") is None
    assert np.array_equal(uid_index(tmp_path / "meta").sorted_uids[uid_index(tmp_path / "meta").rank], pool[::-1])


def test_the_external_merge_writes_the_bytes_a_whole_pool_sort_would(tmp_path):
    """Many merge rounds (a few rows each) over files of other sizes, one empty, with uids repeated within a file
    and across files and high halves shared: the same files as np.save of a stable sort of the whole pool."""
    import io

    import pyarrow.parquet as pq

    from datacomp_assets.core.uid_index import load_uid_index, write_uid_index

    rng = np.random.default_rng(5)
    pool = uids(rng, 2_000, shared_high=60)
    pool[rng.choice(2_000, 200)] = pool[rng.choice(2_000, 200)]  # repeats, in one file and across files
    cuts = [0, 700, 700, 710, 1_500, 2_000]  # the third file is empty
    (tmp_path / "meta").mkdir()
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        pq.write_table(pa.table({"uid": pa.array(array_to_uids(pool[a:b]), pa.string())}),
                       tmp_path / "meta" / f"{i:04d}.parquet")
    written = write_uid_index(tmp_path / "meta", merge_rows=37)

    order = np.lexsort((np.arange(len(pool)), pool["f1"], pool["f0"]))  # ties in pool order
    rank = np.empty(len(pool), np.int32)
    rank[order] = np.arange(len(pool), dtype=np.int32)
    for name, expected in (("uids.npy", pool[order]), ("rank.npy", rank)):
        buffer = io.BytesIO()
        np.save(buffer, expected)
        assert (tmp_path / "meta" / "uid_index" / name).read_bytes() == buffer.getvalue(), name
    loaded = load_uid_index(tmp_path / "meta")
    assert np.array_equal(loaded.starts, cuts) and np.array_equal(loaded.sorted_uids, pool[order])
    same = np.flatnonzero(pool[order][1:] == pool[order][:-1]) + 1
    assert written.repeats() == loaded.repeats() == (len(same), int(same[0]))
    assert not list((tmp_path / "meta" / "uid_index").glob(".*"))  # no run or temporary file left


def test_the_index_finds_the_pool_rows_of_uids(tmp_path):
    from datacomp_assets.core.uid_index import write_uid_index

    rng = np.random.default_rng(6)
    pool = uids(rng, 3_000, shared_high=30)
    pool[10] = pool[2_900]  # a uid in two files: both its rows
    write_pool(tmp_path / "meta", pool)
    index = write_uid_index(tmp_path / "meta")
    wanted = unique_sorted(sort_uids(np.concatenate([pool[rng.choice(3_000, 500)], pool[[10]], uids(rng, 20)])))
    found = {(f, int(r)) for f, rows in index.pool_rows(wanted) for r in rows}
    expected = {(int(np.searchsorted(index.starts, i, "right") - 1), i - int(index.starts[np.searchsorted(
        index.starts, i, "right") - 1])) for i in np.flatnonzero(np.isin(pool, wanted))}
    assert found == expected and (0, 10) in found and len(found) == np.isin(pool, wanted).sum()
