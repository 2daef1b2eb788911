"""The recaptioned source: the pool's images with generated captions, uids of their own, resumable shard by shard."""

import io
import json

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datacomp_assets.core.shards import iter_webdataset, write_webdataset
from datacomp_assets.filtering.recaption import recaptioned_uid, write_recaptioned_source
from datacomp_assets.training.faces import faces_in_pool


def _parquets(directory) -> "pa.Table":
    return pa.concat_tables([pq.read_table(path) for path in sorted(directory.glob("*.parquet"))])


def _jpeg(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(out, format="JPEG")
    return out.getvalue()


def _pool_shards(directory, uids_per_shard):
    """img2dataset-like shards: each sample a jpg, its alt-text and a json with its uid; one failed sample each."""
    directory.mkdir()
    for k, uids in enumerate(uids_per_shard):
        samples = [(f"{k}{i:04d}", {"jpg": _jpeg(10 * i), "txt": f"alt {uid}".encode(),
                                    "json": json.dumps({"uid": uid}).encode()}) for i, uid in enumerate(uids)]
        samples.append((f"{k}9999", {"json": json.dumps({"uid": "f" * 32}).encode()}))  # no image: not downloaded
        write_webdataset(directory / f"{k:08d}.tar", samples)


def test_recaptioned_source_holds_the_pool_images_with_generated_captions(tmp_path):
    uids = [f"{i:032x}" for i in range(7)]
    _pool_shards(tmp_path / "pool", [uids[:4], uids[4:]])
    removed = {uids[2]}  # e.g. an eval near-duplicate: it stays out of the source too
    calls = []

    def caption(shard):
        calls.append(shard)
        return lambda images: [f"{shard} red {image.getpixel((0, 0))[0] // 10}" if i else " " for i, image in
                               enumerate(images)]

    def score(images, captions):
        return np.array([len(c) / 100 for c in captions], np.float32)

    def in_pool(batch):
        return np.array([u not in removed for u in batch])

    out = tmp_path / "recaptioned"
    summary = write_recaptioned_source(tmp_path / "pool", out, in_pool, caption, score, log=lambda _: None)
    assert summary["images_recaptioned"] == 6 and calls == ["00000000", "00000001"]

    table = _parquets(out).to_pandas()
    kept = [u for u in uids if u not in removed]
    assert sorted(table.pool_uid) == kept
    assert list(table.uid) == [recaptioned_uid(u) for u in table.pool_uid] and not set(table.uid) & set(uids)
    assert list(table.alt_text) == [f"alt {u}" for u in table.pool_uid]
    # A caption that decodes to nothing is kept out of every rule by its status.
    assert list(table.status) == ["success" if c.strip() else "empty_caption" for c in table.caption]
    assert summary["empty_captions"] == 2
    np.testing.assert_allclose(table.clip_l14_similarity_score, [len(c) / 100 for c in table.caption], rtol=1e-6)

    # The tars hold the same image bytes under the new uid, with the generated caption as the text.
    pool_jpgs = {json.loads(f["json"])["uid"]: f["jpg"] for tar in sorted((tmp_path / "pool").glob("*.tar"))
                 for _, f in iter_webdataset(tar) if "jpg" in f}
    by_uid = dict(zip(table.uid, zip(table.pool_uid, table.caption)))
    written = [f for tar in sorted(out.glob("*.tar")) for _, f in iter_webdataset(tar)]
    assert len(written) == 6
    for files in written:
        meta = json.loads(files["json"])
        pool_uid, text = by_uid[meta["uid"]]
        assert meta["pool_uid"] == pool_uid and files["txt"].decode() == text
        assert files["jpg"] == pool_jpgs[pool_uid]
    assert table.caption[table.pool_uid == uids[1]].item() == "00000000 red 1"  # its own image was captioned

    # A finished shard is kept: a second run (or a resumed one) captions only what is missing.
    (out / "00000001.parquet").unlink()
    again = write_recaptioned_source(tmp_path / "pool", out, in_pool, caption, score, log=lambda _: None)
    assert again["shards_skipped"] == 1 and calls[2:] == ["00000001"]
    assert _parquets(out).to_pandas().equals(table)


def test_faces_of_a_pool_image_are_blurred_in_its_recaptioned_sample_too(tmp_path):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "source").mkdir()
    box = [[0.1, 0.1, 0.5, 0.5]]
    pq.write_table(pa.table({"uid": ["a" * 32, "b" * 32],
                             "face_bboxes": pa.array([box, []], pa.list_(pa.list_(pa.float64())))}),
                   tmp_path / "metadata" / "0.parquet")
    pq.write_table(pa.table({"uid": [recaptioned_uid("a" * 32), recaptioned_uid("b" * 32)],
                             "pool_uid": ["a" * 32, "b" * 32]}), tmp_path / "source" / "0.parquet")
    (tmp_path / "tars_only").mkdir()  # a source of tars alone, as the tiny scale's noisy one
    faces = faces_in_pool(tmp_path / "metadata", [tmp_path / "source", tmp_path / "tars_only"])
    assert faces == {"a" * 32: box, recaptioned_uid("a" * 32): box}


def test_a_paper_scale_recaptions_only_with_the_users_captioner_and_l14():
    from datacomp_assets.core.scales import SCALES
    from datacomp_assets.definitions import RESOURCES
    from datacomp_assets.run import assets_needed, check_inputs

    small, strategy = SCALES["small"], ["clip_score_l14_30pct_plus_recaptioned"]
    names = [a.key.path[-1] for a in assets_needed(small, strategy, train=False)[0]]
    assert {"pool_shards", "captioner_model", "recaptioned_source"} <= set(names)
    assert names.index("recaptioned_source") > names.index("captioner_model")
    with pytest.raises(FileNotFoundError, match="nothing was started") as failure:
        check_inputs(small, strategy, RESOURCES, train=False)
    assert "captioner_checkpoint" in str(failure.value) and "clip_l14_checkpoint" in str(failure.value)
