"""The pool download stage: synthetic web server, URL index, and img2dataset download into shards."""

from __future__ import annotations

import io
import json
import re
import tarfile
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datacomp_assets.pool.download import check_index, download_shards, list_tars, summarize_shards
from datacomp_assets.pool.index import build_index_rows, write_pool_index
from datacomp_assets.pool.synthetic_web import WebConfig, sample
from datacomp_assets.pool.web_server import SyntheticWebServer, free_port

CONFIG = WebConfig(seed=7)
N_SAMPLES, SHARD_SIZE, IMAGE_SIZE = 300, 100, 64


@pytest.fixture(scope="module")
def server():
    with SyntheticWebServer(CONFIG) as srv:
        yield srv


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory):
    """One end-to-end download shared by the tests that inspect its output."""
    root = tmp_path_factory.mktemp("pool")
    write_pool_index(CONFIG, N_SAMPLES, server.base_url, root / "index")
    shards = root / "shards"
    summary = download_shards(root / "index" / "index.parquet", shards, IMAGE_SIZE, SHARD_SIZE)
    return root, shards, summary


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


# ---------------------------------------------------------------- server

def test_server_serves_jpeg_of_sample_size(server):
    status, content_type, body = _get(f"{server.base_url}/images/pool/5.jpg")
    assert status == 200 and content_type == "image/jpeg"
    img = Image.open(io.BytesIO(body))
    s = sample(5, CONFIG)
    assert img.format == "JPEG" and img.size == (s.width, s.height)


@pytest.mark.parametrize("path", ["/", "/images/pool/abc.jpg", "/images/pool/5.png", "/other/pool/5.jpg"])
def test_server_404s_for_bad_paths(server, path):
    assert _get(server.base_url + path)[0] == 404


def test_server_start_stop_and_free_port():
    port = free_port()
    srv = SyntheticWebServer(CONFIG, port=port).start()
    try:
        assert srv.base_url == f"http://127.0.0.1:{port}"
        assert _get(f"{srv.base_url}/images/eval/0.jpg")[0] == 200
    finally:
        srv.stop()
    with pytest.raises(RuntimeError):
        srv.base_url


# ---------------------------------------------------------------- index

def test_index_has_only_public_columns_and_unique_uids(tmp_path):
    summary = write_pool_index(CONFIG, 500, "http://h:1", tmp_path)
    index = pq.read_table(tmp_path / "index.parquet")
    truth = pq.read_table(tmp_path / "ground_truth.parquet")
    assert index.column_names == ["uid", "url", "text"]
    assert summary["rows"] == 500 and sum(summary["kind_counts"].values()) == 500
    uids = index.column("uid").to_pylist()
    assert len(set(uids)) == 500 and all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uids)
    assert truth.column("uid").to_pylist() == uids
    assert {"kind", "object", "color", "count", "style"} <= set(truth.column_names)
    assert index.column("url")[3].as_py() == "http://h:1/images/pool/3.jpg"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files behind


def test_index_is_deterministic():
    a_index, a_truth = build_index_rows(CONFIG, 200, "http://h:1")
    b_index, b_truth = build_index_rows(CONFIG, 200, "http://h:1")
    assert a_index.equals(b_index) and a_truth.equals(b_truth)
    other, _ = build_index_rows(CONFIG, 200, "http://h:1", namespace="eval")
    assert not set(other.column("uid").to_pylist()) & set(a_index.column("uid").to_pylist())


def test_check_index_names_file_and_missing_column(tmp_path):
    with pytest.raises(ValueError, match="missing.parquet"):
        check_index(tmp_path / "missing.parquet")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"uid": ["a"], "url": ["http://x"]}), bad)
    with pytest.raises(ValueError, match=r"bad\.parquet.*'text'"):
        download_shards(bad, tmp_path / "out", IMAGE_SIZE, SHARD_SIZE)


# ---------------------------------------------------------------- download

def test_download_writes_webdataset_shards(downloaded):
    root, shards, summary = downloaded
    assert summary.shards == 3 and summary.count == N_SAMPLES
    assert summary.successes == N_SAMPLES and summary.success_rate == 1.0 and summary.errors == {}
    tars = list_tars(shards)
    assert [t.name for t in tars] == ["00000000.tar", "00000001.tar", "00000002.tar"]

    index = pq.read_table(root / "index" / "index.parquet").to_pylist()
    text_by_uid = {row["uid"]: row["text"] for row in index}
    seen = set()
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            keys = {name.split(".")[0] for name in members}
            for key in keys:
                assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(members)
                meta = json.loads(tar.extractfile(members[f"{key}.json"]).read())
                caption = tar.extractfile(members[f"{key}.txt"]).read().decode()
                assert caption == text_by_uid[meta["uid"]]
                assert re.fullmatch(r"[0-9a-f]{64}", meta["sha256"])
                img = Image.open(io.BytesIO(tar.extractfile(members[f"{key}.jpg"]).read()))
                assert max(img.size) <= IMAGE_SIZE
                seen.add(meta["uid"])
    assert seen == set(text_by_uid)
    # The per-shard parquet carries the uid too, for joins without opening tars.
    assert "uid" in pq.read_schema(shards / "00000000.parquet").names


def test_second_download_is_incremental(downloaded):
    root, shards, first = downloaded
    mtimes = {t: t.stat().st_mtime_ns for t in list_tars(shards)}
    again = download_shards(root / "index" / "index.parquet", shards, IMAGE_SIZE, SHARD_SIZE)
    assert {t: t.stat().st_mtime_ns for t in list_tars(shards)} == mtimes
    assert again.images_per_second == 0.0
    for name in ("shards", "count", "successes", "failed_to_download", "failed_to_resize", "errors"):
        assert getattr(again, name) == getattr(first, name)
    assert summarize_shards(shards).successes == first.successes


def test_dead_links_count_as_failed_to_download(server, tmp_path):
    index, _ = build_index_rows(CONFIG, 40, server.base_url)
    # Every fourth URL rots: the server answers 404 for it.
    urls = [u if i % 4 else u.replace("/images/", "/gone/")
            for i, u in enumerate(index.column("url").to_pylist())]
    index = index.set_column(1, "url", pa.array(urls, pa.string()))
    pq.write_table(index, tmp_path / "index.parquet")
    summary = download_shards(tmp_path / "index.parquet", tmp_path / "shards", IMAGE_SIZE, SHARD_SIZE,
                              processes=1, retries=0)
    assert summary.count == 40 and summary.failed_to_download == 10 and summary.successes == 30
    assert summary.success_rate == pytest.approx(0.75)
    assert sum(summary.errors.values()) == 10 and all("404" in e for e in summary.errors)
