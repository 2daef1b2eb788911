"""Subset files: the uids a filter keeps, as the reference's sorted `u8,u8` NumPy array.

A uid is 32 hex chars (128 bits) stored as two uint64: (int(h[:16], 16), int(h[16:], 16)).
Conversions work on fixed-width byte arrays with NumPy (no per-uid Python loop), since a small-scale
pool has 12.8M uids.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from datacomp_assets.core.files import temporary_sibling

UID_DTYPE = np.dtype("u8,u8")

# ASCII byte -> nibble value; 255 marks a byte that is not a hex digit.
_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUE[_c] = 10 + _i
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def uid_to_pair(uid: str) -> tuple[int, int]:
    """One uid as the reference's (high, low) uint64 pair."""
    if len(uid) != 32:
        raise ValueError(f"uid must be 32 hex chars, got {uid!r}")
    return int(uid[:16], 16), int(uid[16:32], 16)


def uids_to_array(uids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Hex uids -> sorted `u8,u8` array (duplicates kept: they mean up-weighting)."""
    try:
        raw = np.asarray(uids, dtype="S")
    except UnicodeEncodeError as err:
        raise ValueError(f"uids must be ASCII hex strings: {err}") from None
    if raw.size == 0:
        return np.empty(0, dtype=UID_DTYPE)
    if raw.ndim != 1 or raw.dtype.itemsize != 32:
        raise ValueError(f"uids must be a flat list of 32-char hex strings (longest is {raw.dtype.itemsize})")
    # A shorter uid is NUL-padded by NumPy, so the bad-digit check catches it too.
    return sort_uids(_pairs_from_hex(raw.view(np.uint8).reshape(-1, 32), lambda row: raw[row]))


def arrow_uids_to_array(uids: pa.Array) -> np.ndarray:
    """Arrow strings of 32 hex chars -> `u8,u8` array in the same order, read from the Arrow buffers."""
    n = len(uids)
    if n == 0:
        return np.empty(0, dtype=UID_DTYPE)
    if uids.null_count:
        raise ValueError("a uid is NULL")
    offsets = np.frombuffer(uids.buffers()[1], np.int32 if pa.types.is_string(uids.type) else np.int64)
    offsets = offsets[uids.offset:uids.offset + n + 1]
    lengths = np.diff(offsets)
    if (lengths != 32).any():
        raise ValueError(f"not a 32-char hex uid: {uids[int(np.flatnonzero(lengths != 32)[0])]}")
    data = np.frombuffer(uids.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    try:  # C speed: 12.8M uids in under a second; a non-hex byte raises, and the slow path names the uid
        halves = np.frombuffer(binascii.unhexlify(data), dtype=">u8").reshape(n, 2)
    except binascii.Error:
        return _pairs_from_hex(data.reshape(n, 32), lambda row: uids[row])
    out = np.empty(n, dtype=UID_DTYPE)
    out["f0"], out["f1"] = halves[:, 0], halves[:, 1]
    return out


def _pairs_from_hex(raw: np.ndarray, uid_at) -> np.ndarray:
    """(n, 32) ASCII hex bytes -> `u8,u8` pairs; `uid_at(row)` names a bad uid in the error."""
    nibbles = _HEX_VALUE[raw]
    if (nibbles == 255).any():
        raise ValueError(f"not a 32-char hex uid: {uid_at(int(np.flatnonzero((nibbles == 255).any(axis=1))[0]))}")
    # Two nibbles per byte, then each 8-byte half read as a big-endian integer.
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    halves = packed.view(">u8")  # shape (n, 2): (high, low)
    out = np.empty(len(raw), dtype=UID_DTYPE)
    out["f0"], out["f1"] = halves[:, 0], halves[:, 1]
    return out


def sort_uids(arr: np.ndarray) -> np.ndarray:
    """Sorted by (high, low), as np.sort on the structured array."""
    return arr[sort_order(arr)]


def sort_order(arr: np.ndarray) -> np.ndarray:
    """The permutation that sorts `arr` by (high, low).

    Sorting on the high half alone is 2x faster than lexsort on both; uids are random, so two distinct uids
    almost never share a high half (a repeat of one uid is fine either way). When some do, lexsort decides."""
    order = np.argsort(arr["f0"], kind="stable")
    hi, lo = arr["f0"][order], arr["f1"][order]
    if ((hi[1:] == hi[:-1]) & (lo[1:] < lo[:-1])).any():
        order = np.lexsort((arr["f1"], arr["f0"]))
    return order


def unique_sorted(arr: np.ndarray) -> np.ndarray:
    """The distinct uids of a sorted array (np.unique on a structured array is several times slower)."""
    if len(arr) < 2:
        return arr
    new = np.ones(len(arr), dtype=bool)
    new[1:] = (arr["f0"][1:] != arr["f0"][:-1]) | (arr["f1"][1:] != arr["f1"][:-1])
    return arr[new]


def isin_sorted(arr: np.ndarray, sorted_pool: np.ndarray) -> np.ndarray:
    """For each uid of `arr`, whether it is in `sorted_pool` (sorted by `sort_uids`): one binary search on the
    high halves, then the low halves compared (np.isin on structured arrays takes a minute at 12.8M)."""
    if len(sorted_pool) == 0:
        return np.zeros(len(arr), dtype=bool)
    hi = sorted_pool["f0"]
    pos = np.minimum(np.searchsorted(hi, arr["f0"]), len(sorted_pool) - 1)
    same_high = hi[pos] == arr["f0"]
    found = same_high & (sorted_pool["f1"][pos] == arr["f1"])
    # Uids sharing a high half are next to each other; it is rare enough to walk them one by one.
    for i in np.flatnonzero(same_high & ~found):
        j = pos[i] + 1
        while j < len(sorted_pool) and hi[j] == arr["f0"][i] and not found[i]:
            found[i] = sorted_pool["f1"][j] == arr["f1"][i]
            j += 1
    return found


def intersect_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The distinct uids in both sorted arrays, sorted."""
    a = unique_sorted(a)
    return a[isin_sorted(a, b)]


def union_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The distinct uids in either array, sorted."""
    return unique_sorted(sort_uids(np.concatenate([a, b])))


class UidLookup:
    """Where a uid string is among sorted distinct uids: for a stream of samples asked one by one (a resharder's),
    with 16 bytes a uid where a dict or set of their strings takes about 100."""

    def __init__(self, sorted_distinct: np.ndarray):
        # contiguous halves: np.searchsorted copies a strided field view on every call
        self.hi, self.lo = np.ascontiguousarray(sorted_distinct["f0"]), np.ascontiguousarray(sorted_distinct["f1"])

    def __len__(self) -> int:
        return len(self.hi)

    def find(self, uid: object) -> int | None:
        """The uid's position, or None when it is not there (or is not a 32-char hex uid)."""
        try:
            hi, lo = uid_to_pair(uid)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return None
        i = int(np.searchsorted(self.hi, np.uint64(hi)))
        while i < len(self.hi) and self.hi[i] == hi:  # more than one only where high halves are shared
            if self.lo[i] == lo:
                return i
            i += 1
        return None


def array_to_uids(arr: np.ndarray) -> list[str]:
    """`u8,u8` array -> lowercase, zero-padded 32-char hex uids, in the array's order."""
    halves = np.empty((len(arr), 2), dtype=">u8")
    halves[:, 0], halves[:, 1] = arr["f0"], arr["f1"]
    packed = halves.view(np.uint8).reshape(-1, 16)
    chars = np.empty((len(arr), 32), dtype=np.uint8)
    chars[:, 0::2], chars[:, 1::2] = _HEX_DIGITS[packed >> 4], _HEX_DIGITS[packed & 0x0F]
    return chars.view("S32").ravel().astype("U32").tolist()


def _check_subset(arr: np.ndarray, where: str | os.PathLike) -> None:
    if arr.dtype != UID_DTYPE or arr.ndim != 1:
        raise ValueError(f"{where}: a subset must be a 1-d array of dtype {UID_DTYPE}, "
                         f"got {arr.dtype} with shape {arr.shape}")
    hi, lo = arr["f0"], arr["f1"]
    in_order = (hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] >= lo[:-1]))
    if not in_order.all():
        raise ValueError(f"{where}: subset uids are not sorted (first out of order at row "
                         f"{int(np.flatnonzero(~in_order)[0]) + 1})")


def save_subset(arr: np.ndarray, path: str | os.PathLike) -> None:
    """np.save a valid subset atomically (temp name, then rename), so readers never see half a file."""
    path = Path(path)
    _check_subset(arr, path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:  # a file object stops np.save from appending ".npy"
            np.save(f, arr)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_subset(path: str | os.PathLike) -> np.ndarray:
    """Load a subset file, rejecting a wrong dtype or unsorted uids (ValueError naming the file)."""
    arr = np.load(path, allow_pickle=False)
    _check_subset(arr, path)
    return arr
