"""The pool-sized joins in integers, not uid strings: `within`/`outside` on pool rows and on a derived source's
`pool_uid`, the caption feature store's join on (file, row) numbers, and the subset's faces streamed in columns.
Each kept set is checked against a computation in plain Python."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.uids import UID_DTYPE, array_to_uids, uid_to_pair, uids_to_array

RULES = '''
[top_b32]
where = "clip_b32_similarity_score >= 0.5"

[low_l14_within_top_b32]
where = "clip_l14_similarity_score < 0.5"
within = "top_b32"

[outside_top_b32]
outside = "top_b32"

[top_b32_then_outside_a_random_half]
within = "top_b32"
outside = "a_random_half"

[a_random_half]
fraction = 0.5
random = true

[derived_within]
source = "derived"
within = "top_b32"

[derived_outside]
source = "derived"
outside = "top_b32"
'''


def sorted_array(strings):
    return np.array(sorted(uid_to_pair(u) for u in strings), dtype=UID_DTYPE)


@pytest.fixture
def pool(tmp_path, monkeypatch):
    from datacomp_assets.core import strategies

    rng = np.random.default_rng(3)
    n = 600
    uids = [f"{int(x):016x}{int(y):016x}" for x, y in zip(rng.integers(0, 2**62, n), rng.integers(0, 2**62, n))]
    b32, l14 = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    (tmp_path / "meta").mkdir()
    for i, (a, b) in enumerate([(0, 250), (250, 250), (250, 600)]):  # one file empty
        pq.write_table(pa.table({"uid": pa.array(uids[a:b], pa.string()), "clip_b32_similarity_score": b32[a:b],
                                 "clip_l14_similarity_score": l14[a:b]}), tmp_path / "meta" / f"{i:04d}.parquet")
    (tmp_path / "rules.toml").write_text(RULES)
    monkeypatch.setattr(strategies, "STRATEGIES", strategies.load_registry([tmp_path / "rules.toml"]))
    return tmp_path, np.array(uids), b32, l14


def test_within_and_outside_keep_what_matching_uid_strings_kept(pool):
    from datacomp_assets.core.uid_index import write_uid_index
    from datacomp_assets.filtering.selection import select_uids

    tmp_path, uids, b32, l14 = pool
    write_uid_index(tmp_path / "meta")
    top = set(uids[b32 >= np.float32(0.5)])
    derived = tmp_path / "derived"
    derived.mkdir()
    pool_uids = [*uids[:400], None, "z" * 32, "0" * 32, uids[5] + "0", uids[7]]  # NULL, not hex, absent, too long
    own = [f"{i:032x}" for i in range(len(pool_uids))]
    status = ["success"] * (len(pool_uids) - 1) + ["failed_to_download"]
    pq.write_table(pa.table({"uid": own, "pool_uid": pa.array(pool_uids, pa.string()), "status": status}),
                   derived / "0.parquet")

    def run(name):
        return select_uids(tmp_path / "meta", name, external_dirs={"derived": derived})

    assert np.array_equal(run("low_l14_within_top_b32"),
                          sorted_array(u for u, score in zip(uids, l14) if u in top and score < np.float32(0.5)))
    assert np.array_equal(run("outside_top_b32"), sorted_array(u for u in uids if u not in top))
    half = set(array_to_uids(run("a_random_half")))
    assert np.array_equal(run("top_b32_then_outside_a_random_half"), sorted_array(top - half))
    ok = [(u, p) for u, p, s in zip(own, pool_uids, status) if s == "success"]
    assert np.array_equal(run("derived_within"), sorted_array(u for u, p in ok if p in top))
    # as `pool_uid NOT IN (...)`: a NULL pool_uid is never kept, one that names no pool uid always is
    assert np.array_equal(run("derived_outside"), sorted_array(u for u, p in ok if p is not None and p not in top))


def test_an_older_caption_store_without_row_numbers_is_computed_again_to_the_same_subset(tmp_path):
    from test_caption_features import reference_files

    from datacomp_assets.core.caption_features import CaptionFeatureStore
    from datacomp_assets.core.integrity import record_table
    from datacomp_assets.filtering.selection import select_uids

    reference_files(tmp_path / "meta")
    store = CaptionFeatureStore(tmp_path / "store", processes=1, log=lambda _: None)
    kept = select_uids(tmp_path / "meta", "basic", caption_features=store)
    part = next(store.group_dir("counts").glob("*.parquet"))
    table = pq.read_table(part)
    assert table.column("_row_number").to_pylist() == sorted(table.column("_row_number").to_pylist())
    for group in ("counts", "fasttext"):  # as the store wrote them before: uid and the values only, recorded
        for path in store.group_dir(group).glob("*.parquet"):
            pq.write_table(pq.read_table(path).drop_columns(["_file_index", "_row_number"]), path)
        record_table(store.group_dir(group), store.group_dir(group).glob("*.parquet"), {"group": group})
    logged = []
    store = CaptionFeatureStore(tmp_path / "store", processes=1, log=logged.append)
    assert np.array_equal(select_uids(tmp_path / "meta", "basic", caption_features=store), kept)
    assert any("no row numbers" in line for line in logged) and store.computed  # emptied, then computed again
    assert all("_row_number" in pq.read_schema(p).names for p in store.group_dir("counts").glob("*.parquet"))


def test_the_subsets_faces_are_those_of_a_dict_of_the_whole_pool(tmp_path):
    from datacomp_assets.training.faces import FaceBoxes, faces_in_pool

    rng = np.random.default_rng(4)
    uids = [f"{i:030x}{j:02x}" for i, j in zip(rng.permutation(300), rng.integers(0, 255, 300))]
    boxes = [[[float(k), 0.1, 0.5, 0.5 + k / 10]] * int(rng.integers(0, 3)) for k in range(300)]
    (tmp_path / "meta").mkdir()
    for i, (a, b) in enumerate([(0, 120), (120, 300)]):
        pq.write_table(pa.table({"uid": uids[a:b], "face_bboxes": pa.array(boxes[a:b], pa.list_(pa.list_(
            pa.float64())))}), tmp_path / "meta" / f"{i}.parquet")
    (tmp_path / "derived").mkdir()
    own = [f"{i:032x}" for i in range(100)]
    pq.write_table(pa.table({"uid": own, "pool_uid": uids[:100]}), tmp_path / "derived" / "0.parquet")
    everything = {u: b for u, b in zip(uids, boxes) if b} | {o: boxes[i] for i, o in enumerate(own) if boxes[i]}

    assert dict(faces_in_pool(tmp_path / "meta", [tmp_path / "derived"])) == everything
    chosen = [*rng.choice(uids, 80, replace=False), *rng.choice(own, 30, replace=False)]
    faces = faces_in_pool(tmp_path / "meta", [tmp_path / "derived"], subset=uids_to_array(chosen))
    assert isinstance(faces, FaceBoxes) and dict(faces) == {u: everything[u] for u in chosen if u in everything}
    assert faces.get("not a uid") is None and faces.get("f" * 32) is None
    again = faces_in_pool(tmp_path / "meta", [tmp_path / "derived"], subset=uids_to_array(chosen))
    assert again.digest() == faces.digest() != faces_in_pool(tmp_path / "meta").digest()


def test_reshard_blurs_the_same_faces_from_the_streamed_boxes_as_from_a_dict(tmp_path):
    from test_training import write_pool

    from datacomp_assets.core.shards import iter_webdataset
    from datacomp_assets.training.faces import faces_in_pool
    from datacomp_assets.training.reshard import reshard

    samples = write_pool(tmp_path / "pool", n=12)
    box = [[0.2, 0.2, 0.8, 0.8]]
    (tmp_path / "meta").mkdir()
    pq.write_table(pa.table({"uid": [s.uid for s in samples], "face_bboxes": pa.array(
        [box if i % 3 == 0 else [] for i in range(12)], pa.list_(pa.list_(pa.float64())))}),
        tmp_path / "meta" / "0.parquet")
    subset = uids_to_array([s.uid for s in samples[:8]])
    streamed = reshard(tmp_path / "pool", subset, tmp_path / "a", 10,
                       face_bboxes=faces_in_pool(tmp_path / "meta", subset=subset))
    listed = reshard(tmp_path / "pool", subset, tmp_path / "b", 10,
                     face_bboxes={s.uid: box for i, s in enumerate(samples) if i % 3 == 0})

    def images(directory):
        return {json.loads(f["json"])["uid"]: f["jpg"] for tar in sorted(directory.glob("*.tar"))
                for _, f in iter_webdataset(tar)}
    assert streamed.faces_blurred == listed.faces_blurred == 3 and images(tmp_path / "a") == images(tmp_path / "b")
