"""The pool download stage: synthetic web server, URL index, and img2dataset download into shards."""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import replace

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datacomp_assets.pool.download import (
    EXPECTED_FAILURE, check_against_ground_truth, check_index, download_shards, list_tars, read_failures,
    summarize_shards,
)
from datacomp_assets.world.eval_suite import build_objects
from datacomp_assets.world.index import build_index_rows, write_pool_index
from datacomp_assets.world import curated, web
from datacomp_assets.world.web import (
    COLORS, DEFAULT_FAULTS, DEFAULT_NOISE, FAULT_KINDS, NOISE_KINDS, OBJECTS, SPAM_PHRASES, SYNONYMS, UNSAFE_WORDS,
    VAGUE_CAPTIONS, WebConfig, caption_words, crawled_sha256, eval_objects_sample, image_bytes, render, sample,
    served_bytes,
)
from datacomp_assets.world.web_server import SyntheticWebServer, free_port

CONFIG = WebConfig(seed=7, faults={})  # a web without faults: every download succeeds
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
    assert index.column_names == ["uid", "url", "text", "sha256"]
    assert summary["rows"] == 500 and sum(summary["kind_counts"].values()) == 500
    uids = index.column("uid").to_pylist()
    assert len(set(uids)) == 500 and all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uids)
    assert truth.column("uid").to_pylist() == uids
    assert {"kind", "object", "color", "count", "style", "fault", "duplicate_of", "eval_task",
            "eval_index"} <= set(truth.column_names)
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in index.column("sha256").to_pylist())
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


# ---------------------------------------------------------------- web noise

N_SHARES = 20_000


@pytest.fixture(scope="module")
def web_samples():
    """sample() only (no rendering) over a tiny-scale pool, with the default shares."""
    return [sample(i, WebConfig(seed=7)) for i in range(N_SHARES)]


def test_every_noise_kind_and_fault_appears_at_about_its_share(web_samples):
    kinds = Counter(s.kind for s in web_samples)
    faults = Counter(s.fault for s in web_samples)
    for kind, share in DEFAULT_NOISE.items():
        # 4 binomial standard deviations: fails by chance about once in 15,000 runs.
        assert abs(kinds[kind] / N_SHARES - share) <= 4 * (share * (1 - share) / N_SHARES) ** 0.5, kind
    assert abs(kinds["clean"] / N_SHARES - (1 - sum(DEFAULT_NOISE.values()))) < 0.02
    assert set(NOISE_KINDS) == {"clean", *DEFAULT_NOISE} and set(kinds) == set(NOISE_KINDS)
    assert sum(DEFAULT_NOISE.values()) == pytest.approx(0.70)  # 30% clean, as docs/synthetic-web.md says
    for fault, share in DEFAULT_FAULTS.items():
        assert abs(faults[fault] / N_SHARES - share) <= 4 * (share * (1 - share) / N_SHARES) ** 0.5, fault
    assert 0.06 <= sum(DEFAULT_FAULTS.values()) <= 0.08


def test_faults_are_independent_of_noise_and_only_in_the_pool():
    without = [sample(i, WebConfig(seed=7, faults={})) for i in range(300)]
    with_faults = [sample(i, WebConfig(seed=7)) for i in range(300)]
    assert [(s.text, s.kind, s.image_seed) for s in without] == [(s.text, s.kind, s.image_seed) for s in with_faults]
    assert all(s.fault is None for s in without)
    assert all(sample(i, WebConfig(seed=7), namespace="eval").fault is None for i in range(300))


def test_spam_unsafe_and_off_topic_look_as_documented(web_samples):
    spam = [s for s in web_samples if s.kind == "spam"][:50]
    assert spam and all(sum(p in s.text for p in SPAM_PHRASES) >= 3 for s in spam)
    assert not any(name in s.text for s in spam for name in OBJECTS)
    unsafe = [s for s in web_samples if s.kind == "unsafe"][:50]
    assert unsafe and all(set(s.text.split()) & set(UNSAFE_WORDS) for s in unsafe)
    assert all(s.text.isascii() and len(s.text.split()) > 3 for s in unsafe)
    clean_words = {w for s in web_samples if s.kind == "clean" for w in s.text.split()}
    assert not clean_words & set(UNSAFE_WORDS)
    off_topic = [s for s in web_samples if s.kind == "off_topic"][:5]
    assert off_topic and all(s.object == "" and s.count == 0 for s in off_topic)
    for s in off_topic:  # a smooth texture: no flat background, no drawn outline
        pixels = np.asarray(render(s), dtype=np.float32)
        most_common = Counter(map(tuple, pixels.reshape(-1, 3))).most_common(1)[0][1]
        assert pixels.std() > 10 and most_common < 0.05 * pixels.size / 3


def test_near_duplicates_copy_an_earlier_sample_with_a_light_edit(web_samples):
    dups = [s for s in web_samples if s.kind == "near_duplicate"][:20]
    assert dups
    for s in dups:
        source = web_samples[s.duplicate_of]
        assert s.duplicate_of < s.index and source.kind != "near_duplicate"
        assert s.text == source.text and (s.width, s.height) == (source.width, source.height)
        edited = s.jpeg_quality != 90 or s.shift_x or s.shift_y
        assert edited and max(abs(s.shift_x), abs(s.shift_y)) <= 3
        a = np.asarray(render(s), dtype=np.float32)
        b = np.asarray(render(source), dtype=np.float32)
        b = np.roll(b, (s.shift_y, s.shift_x), axis=(0, 1))  # the shift edit is exactly this roll
        assert np.abs(a - b).mean() < 1.0
        assert served_bytes(s) != served_bytes(source)  # not a byte-exact copy


def test_eval_copies_are_the_objects_task_images(web_samples):
    copies = [s for s in web_samples if s.kind == "eval_copy"][:5]
    assert copies and all(s.eval_task == "objects" and 0 <= s.eval_index < 800 for s in copies)
    drawn = ("object", "color", "count", "style", "width", "height", "image_seed")
    for s in copies:  # the copy draws exactly the evaluation sample's scene
        original = eval_objects_sample(s.eval_index)
        assert [getattr(s, k) for k in drawn] == [getattr(original, k) for k in drawn]
        assert s.jpeg_quality != 90 or s.shift_x or s.shift_y
    # ... and that is the picture the suite's own builder stores (resized to its 64 px).
    stored = list(itertools.islice(build_objects(1.0), 20))
    for eval_index in (0, 5, 17):
        image, label = stored[eval_index]
        original = eval_objects_sample(eval_index)
        assert label == OBJECTS.index(original.object)
        ours = render(original).resize(image.size, Image.LANCZOS)
        assert np.array_equal(np.asarray(ours), np.asarray(image))


def _downloaded(img: Image.Image) -> np.ndarray:
    """The image as the pool downloads it: its longer side resized to 64 px."""
    w, h = img.size
    r = IMAGE_SIZE / max(w, h)
    return np.asarray(img.resize((max(1, round(w * r)), max(1, round(h * r))), Image.BOX), dtype=np.float32)


def _near(pixels: np.ndarray, rgb) -> np.ndarray:
    return np.abs(pixels - np.asarray(rgb, dtype=np.float32)).sum(-1) < 90


def _runs(flags: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a 1-d array."""
    runs, length = [], 0
    for f in [*flags, False]:
        if f:
            length += 1
        elif length:
            runs, length = [*runs, length], 0
    return runs


def test_text_only_images_show_the_caption_words_and_no_object(web_samples):
    texts = [s for s in web_samples if s.kind == "text_only"][:8]
    assert texts
    for s in texts:
        # The ground truth keeps the caption's object and colour; the caption names both.
        assert s.text_in_image == "only" and s.object and s.color in s.text.lower()
        words = caption_words(s)  # the colour, then the object's name as the caption spells it
        name = " ".join(words[1:]).lower()
        assert words[0] == s.color.upper() and name in s.text.lower()
        assert any(name in (n.lower(), n.lower() + "s", n.lower() + "es") for n in SYNONYMS.get(s.object, [s.object]))
        image = np.asarray(render(s), dtype=np.float32)
        # No object: the image is exactly the style's background (the scene with nothing drawn) with the
        # words written on it, while the clean sample draws its object on that background.
        empty = render(replace(s, count=0, text_in_image=None))
        background = np.asarray(empty, dtype=np.float32)
        web._write_caption_words(empty, s)
        assert np.array_equal(image, np.asarray(empty, dtype=np.float32))
        clean = np.asarray(render(replace(s, kind="clean", text_in_image=None)), dtype=np.float32)
        assert (np.abs(clean - background).sum(-1) > 0).mean() > 0.005
        # The text: a good part of the image, much of it in the sample's colour (the rest outline).
        text = np.abs(image - background).sum(-1) > 0
        assert 0.15 < text.mean() < 0.7 and _near(image, COLORS[s.color])[text].mean() > 0.3
        # Legible at 64 px: the text stands out from the background in one band of rows per word, the
        # colour's word >= 11 px tall (cap height 12 px, less anti-aliasing), across half the width.
        small = np.abs(_downloaded(render(s)) - _downloaded(render(replace(s, count=0, text_in_image=None))))
        small = small.sum(-1) > 60
        bands = _runs(small.sum(axis=1) >= 3)
        assert len(bands) == len(words) and bands[0] >= 11, (s.index, words, bands)
        columns = np.flatnonzero(small.any(axis=0))
        assert columns[-1] - columns[0] + 1 >= 0.45 * small.shape[1]


def test_text_overlays_write_the_words_over_the_drawn_object(web_samples):
    overlays = [s for s in web_samples if s.kind == "text_overlay"][:8]
    assert overlays
    for s in overlays:
        assert s.text_in_image == "overlay" and s.object and s.color in s.text.lower()
        image = np.asarray(render(s), dtype=np.float32)
        clean = np.asarray(render(replace(s, kind="clean", text_in_image=None)), dtype=np.float32)
        background = np.asarray(render(replace(s, count=0, text_in_image=None)), dtype=np.float32)
        rows = np.flatnonzero((np.abs(image - clean).sum(-1) > 0).any(axis=1))
        # One band at the top or the bottom, under half the height; elsewhere the clean scene.
        assert rows[0] == 0 or rows[-1] == image.shape[0] - 1
        assert rows[-1] - rows[0] + 1 == len(rows) <= 0.45 * image.shape[0]
        band = np.zeros(image.shape[0], bool)
        band[rows] = True
        drawn = np.abs(clean - background).sum(-1) > 0
        # The objects are drawn; a single one, in the middle, mostly outside the band (which is translucent).
        assert drawn.mean() > 0.005 and (s.count > 1 or drawn[~band].sum() > 0.3 * drawn.sum())
        # The band holds the words in the sample's colour, legible at 64 px.
        small = _downloaded(render(s))
        r = IMAGE_SIZE / max(image.shape[:2])
        words = _near(small[int(np.ceil(rows[0] * r)):int(rows[-1] * r)], COLORS[s.color])
        columns = np.flatnonzero(words.sum(axis=0) >= 2)
        assert columns.size and columns[-1] - columns[0] + 1 >= 0.4 * small.shape[1]
        assert max(_runs(words.sum(axis=1) >= 3)) >= 7


def test_vague_captions_name_nothing_and_pass_the_basic_rule(web_samples):
    assert 10 <= len(VAGUE_CAPTIONS) <= 15
    vocabulary = {w for name in OBJECTS for n in SYNONYMS.get(name, [name]) for w in n.lower().split()}
    vocabulary |= set(OBJECTS) | set(COLORS)
    for text in VAGUE_CAPTIONS:
        words = text.lower().split()
        assert len(words) > 2 and len(text) > 5 and text.isascii(), text
        assert not {w.strip(",.") for w in words} & vocabulary, text
        assert not set(words) & set(UNSAFE_WORDS) and not any(p in text for p in SPAM_PHRASES)
    vague = [s for s in web_samples if s.kind == "vague"]
    assert vague and all(s.text in VAGUE_CAPTIONS and s.object and s.text_in_image is None for s in vague)
    assert len({s.text for s in vague}) == len(VAGUE_CAPTIONS)
    for s in vague[:3]:  # the object drawn as a clean sample's is
        clean = np.asarray(render(replace(s, kind="clean")), dtype=np.float32)
        assert np.array_equal(np.asarray(render(s), dtype=np.float32), clean)


def test_text_images_are_deterministic_and_copied_by_near_duplicates(web_samples):
    for kind in ("text_only", "text_overlay"):
        for s in [s for s in web_samples if s.kind == kind][:3]:
            again = sample(s.index, WebConfig(seed=7))
            assert again == s and image_bytes(again) == image_bytes(s)
            assert crawled_sha256(again) == crawled_sha256(s)
    copies = [s for s in web_samples if s.kind == "near_duplicate"
              and web_samples[s.duplicate_of].text_in_image is not None][:3]
    assert copies
    for s in copies:  # a near-duplicate of a text image carries the same text
        source = web_samples[s.duplicate_of]
        assert s.text_in_image == source.text_in_image
        b = np.roll(np.asarray(render(source), dtype=np.float32), (s.shift_y, s.shift_x), axis=(0, 1))
        assert np.abs(np.asarray(render(s), dtype=np.float32) - b).mean() < 1.0


def test_curated_source_has_text_overlays_and_vague_captions(monkeypatch):
    captured = {}
    monkeypatch.setattr(curated, "write_synthetic_source", lambda config, *args, **kw: captured.update(
        config=config, **kw))
    curated.write_curated_source(WebConfig(seed=7), 10, "unused", IMAGE_SIZE, 10)
    config, namespace, noise = captured["config"], captured["namespace"], captured["noise"]
    assert namespace == curated.NAMESPACE and noise == curated.CURATED_NOISE
    assert curated.CURATED_NOISE == {"text_overlay": 0.10, "vague": 0.05}
    kinds = Counter(sample(i, config, namespace=namespace, noise=noise).kind for i in range(N_SHARES))
    assert set(kinds) == {"clean", "text_overlay", "vague"}  # no text-only image, no other noise
    for kind, share in [*curated.CURATED_NOISE.items(), ("clean", 0.85)]:
        assert abs(kinds[kind] / N_SHARES - share) <= 4 * (share * (1 - share) / N_SHARES) ** 0.5, kind


def test_rendering_and_sha256_are_byte_deterministic():
    config = WebConfig(seed=7, faults={k: 1 / 7 for k in FAULT_KINDS})
    for i in range(30):
        assert served_bytes(sample(i, config)) == served_bytes(sample(i, config))
        assert crawled_sha256(sample(i, config)) == crawled_sha256(sample(i, config))


# ---------------------------------------------------------------- web faults

FAULTY = WebConfig(seed=7, faults={k: 0.05 for k in FAULT_KINDS}, slow_seconds=3.0)


def test_download_failures_match_the_injected_faults(tmp_path):
    """Each fault ends as its failure kind: redirects succeed, poisoned images fail verification."""
    with SyntheticWebServer(FAULTY) as srv:
        write_pool_index(FAULTY, 400, srv.base_url, tmp_path / "index")
        summary = download_shards(tmp_path / "index" / "index.parquet", tmp_path / "shards", IMAGE_SIZE,
                                  SHARD_SIZE, timeout=2, retries=0)
    truth = pq.read_table(tmp_path / "index" / "ground_truth.parquet")
    injected = Counter(f for f in truth.column("fault").to_pylist() if f is not None)
    assert set(injected) == set(FAULT_KINDS)
    expected = Counter()
    for fault, n in injected.items():
        if EXPECTED_FAILURE[fault] is not None:
            expected[EXPECTED_FAILURE[fault]] += n
    assert summary.failures_by_kind == dict(expected)
    assert summary.successes == 400 - sum(expected.values())

    report = check_against_ground_truth(tmp_path / "shards", tmp_path / "index" / "ground_truth.parquet")
    assert report["no_fault"] == {"samples": 400 - sum(injected.values()), "failed": 0}
    for fault in FAULT_KINDS:
        assert report[fault]["observed"] == report[fault]["injected"] == injected[fault], fault

    failures = read_failures(tmp_path / "shards")
    assert failures.column_names == ["uid", "status", "error_message", "failure_kind"]
    fault_by_uid = dict(zip(truth.column("uid").to_pylist(), truth.column("fault").to_pylist()))
    for row in failures.to_pylist():
        assert row["failure_kind"] == EXPECTED_FAILURE[fault_by_uid[row["uid"]]]
