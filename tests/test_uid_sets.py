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
