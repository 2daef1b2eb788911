"""Mirrors in DataComp's published layout (world/published_mirror.py): what the paper scales' tests and
benchmarks stand on when mlfoundations/datacomp_* cannot be fetched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.published import PublishedSource, fetch_published_metadata
from datacomp_assets.core.schema import NPZ_KEYS, POOL_METADATA_SCHEMA
from datacomp_assets.core.language import identify_languages
from datacomp_assets.world import published_mirror
from datacomp_assets.world.index import write_pool_index
from datacomp_assets.world.published_mirror import write_mirror_from_index, write_synthetic_mirror
from datacomp_assets.world.web import DEFAULT_NOISE, NOISE_KINDS, WebConfig

# Some evaluation copies, so their code path runs in a pool of a few hundred samples.
CONFIG = WebConfig(seed=5, noise={**DEFAULT_NOISE, "eval_copy": 0.03})
N_SAMPLES = 300
DIMS = {"b32_img": 512, "b32_txt": 512, "l14_img": 768, "l14_txt": 768}


@pytest.fixture(scope="module")
def web_index(tmp_path_factory):
    out = tmp_path_factory.mktemp("index")
    write_pool_index(CONFIG, N_SAMPLES, "http://127.0.0.1:9", out, processes=1)
    return out / "index.parquet", out / "ground_truth.parquet"


@pytest.fixture(scope="module")
def index_mirror(web_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("index_mirror")
    return out, write_mirror_from_index(*web_index, out, files=2)


@pytest.fixture(scope="module")
def synthetic_mirror(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_mirror")
    return out, write_synthetic_mirror(out, rows=20_000, files=3, progress=None)


def _embeddings(parquets: list[Path]) -> dict[str, np.ndarray]:
    arrays: dict[str, list[np.ndarray]] = {key: [] for key in NPZ_KEYS}
    for parquet in parquets:
        with np.load(parquet.with_suffix(".npz")) as npz:
            for key in NPZ_KEYS:
                arrays[key].append(npz[key])
    return {key: np.concatenate(parts) for key, parts in arrays.items()}


def _check_published_layout(mirror: Path, parquets: list[Path], tmp_path: Path) -> None:
    """The project's own fetch accepts it; every npz matches its parquet, row for row."""
    fetched = fetch_published_metadata(PublishedSource("small", mirror_dir=str(mirror), include_npz=True),
                                       tmp_path / "fetched")
    assert [f.name for f in fetched] == [f"{i:010d}.parquet" for i in range(len(parquets))]
    assert [p.name for p in parquets] == [f.name for f in fetched]
    for parquet in parquets:
        table = pq.read_table(parquet)
        assert table.schema.equals(POOL_METADATA_SCHEMA)
        assert all(len(uid) == 32 for uid in table.column("uid").to_pylist())
        with np.load(parquet.with_suffix(".npz")) as npz:
            assert sorted(npz.files) == sorted(NPZ_KEYS)
            arrays = {key: npz[key] for key in NPZ_KEYS}
        for key, arr in arrays.items():
            assert arr.shape == (table.num_rows, DIMS[key]) and arr.dtype == np.float16
            norms = np.linalg.norm(arr.astype(np.float32), axis=1)
            assert np.abs(norms - 1).max() < 1e-2
        # Same row order: each row's score is the cosine of that row's image and text embeddings.
        for model in ("b32", "l14"):
            cosine = np.einsum("ij,ij->i", arrays[f"{model}_img"].astype(np.float32),
                               arrays[f"{model}_txt"].astype(np.float32))
            score = table.column(f"clip_{model}_similarity_score").to_numpy()
            assert np.abs(cosine - score).max() < 5e-3


# ---------------------------------------------------------------- from the synthetic web's index


def test_index_mirror_has_the_published_layout_and_the_index_rows(web_index, index_mirror, tmp_path):
    mirror, parquets = index_mirror
    _check_published_layout(mirror, parquets, tmp_path)
    table = pq.read_table(parquets)
    index = pq.read_table(web_index[0])
    for column in ("uid", "url", "text", "sha256"):  # sha256: the crawled bytes' hash, which the download checks
        assert table.column(column).to_pylist() == index.column(column).to_pylist()
    truth = pq.read_table(web_index[1])
    assert table.column("original_width").to_pylist() == truth.column("width").to_pylist()
    assert table.column("original_height").to_pylist() == truth.column("height").to_pylist()
    faces = pc.list_value_length(table.column("face_bboxes")).to_numpy()
    assert faces.max() <= 1 and faces.sum() < 0.1 * N_SAMPLES


def test_index_mirror_scores_and_embeddings_carry_the_ground_truth(web_index, index_mirror):
    table = pq.read_table(index_mirror[1])
    truth = pq.read_table(web_index[1])
    kinds = np.array(truth.column("kind").to_pylist())
    gaps = {}
    for model in ("b32", "l14"):
        score = table.column(f"clip_{model}_similarity_score").to_numpy()
        clean, mismatched = score[kinds == "clean"].mean(), score[kinds == "mismatched"].mean()
        assert 0.28 < clean < 0.40 and 0.10 < mismatched < 0.22
        assert score[kinds == "non_english"].mean() < clean
        # CLIP reads: an image of its caption's words scores as a described one; a vague caption lower.
        if (kinds == "text_only").any():
            assert score[kinds == "text_only"].mean() > clean - 0.03
        if (kinds == "vague").any():
            assert mismatched < score[kinds == "vague"].mean() < clean
        gaps[model] = (clean - mismatched) / score[kinds == "clean"].std()
    assert gaps["l14"] > gaps["b32"]  # L/14 is the more discriminative scorer
    images = _embeddings(index_mirror[1])["l14_img"].astype(np.float32)
    # Near-duplicates sit on their source; images of one object are closer than images of different ones.
    row_of_index = {i: row for row, i in enumerate(truth.column("index").to_pylist())}
    dups = [(row, row_of_index[d]) for row, d in enumerate(truth.column("duplicate_of").to_pylist()) if d is not None]
    assert dups and all(images[a] @ images[b] > 0.95 for a, b in dups)
    objects = np.array(truth.column("object").to_pylist())
    similarity = images @ images.T
    off_diagonal = ~np.eye(len(objects), dtype=bool)
    same = (objects[:, None] == objects[None, :]) & off_diagonal
    assert similarity[same].mean() > similarity[~same & off_diagonal].mean() + 0.2


def test_every_noise_kind_has_a_score_level():
    assert set(published_mirror.KIND_LEVEL) == set(NOISE_KINDS)


def test_index_mirror_is_deterministic_for_a_seed(web_index, index_mirror, tmp_path):
    again = write_mirror_from_index(*web_index, tmp_path / "again", files=2)
    for a, b in zip(index_mirror[1], again):
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".npz").read_bytes() == b.with_suffix(".npz").read_bytes()
    other = write_mirror_from_index(*web_index, tmp_path / "other", files=2, seed=1)
    assert pq.read_table(other).column("clip_b32_similarity_score") != \
        pq.read_table(index_mirror[1]).column("clip_b32_similarity_score")


def test_index_without_sha256_gives_null_hashes(web_index, tmp_path):
    """No hash to verify (an index that lacks one): null, never a made-up hash that a download would fail."""
    bare = tmp_path / "index.parquet"
    pq.write_table(pq.read_table(web_index[0]).drop(["sha256"]), bare)
    table = pq.read_table(write_mirror_from_index(bare, web_index[1], tmp_path / "mirror", files=1))
    assert table.column("sha256").null_count == N_SAMPLES


def test_index_mirror_rewritten_with_fewer_files_leaves_no_stale_files(web_index, tmp_path):
    write_mirror_from_index(*web_index, tmp_path, files=3)
    write_mirror_from_index(*web_index, tmp_path, files=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000000000.npz", "0000000000.parquet"]


# ---------------------------------------------------------------- synthetic, at any size


def test_synthetic_mirror_has_the_published_layout(synthetic_mirror, tmp_path):
    mirror, parquets = synthetic_mirror
    assert len(parquets) == 3
    assert sum(pq.read_metadata(p).num_rows for p in parquets) == 20_000
    _check_published_layout(mirror, parquets, tmp_path)
    table = pq.read_table(parquets)
    assert len(set(table.column("uid").to_pylist())) == 20_000
    assert table.column("url").to_pylist()[:2] == ["https://example.invalid/0.jpg", "https://example.invalid/1.jpg"]
    assert table.column("url").to_pylist()[-1] == "https://example.invalid/19999.jpg"


def test_synthetic_captions_and_sizes_are_realistic(synthetic_mirror):
    table = pq.read_table(synthetic_mirror[1])
    texts = table.column("text")
    languages, _ = identify_languages(texts)
    english = np.array(languages) == "en"
    assert 0.60 < english.mean() < 0.85
    words = np.array([len(t.split()) for t in texts.to_pylist()])
    assert words.max() <= 15 and (words <= 1).mean() < 0.06
    assert {"dog", "cat", "car", "goldfish"} <= {w.lower() for t in texts.to_pylist() for w in t.split()}
    width, height = table.column("original_width").to_numpy(), table.column("original_height").to_numpy()
    small, large = np.minimum(width, height), np.maximum(width, height)
    assert 0.05 < (small < 200).mean() < 0.25 and 0.02 < (large > 3 * small).mean() < 0.12
    # The basic rule (English, > 2 words, > 5 chars, min side >= 200, aspect <= 3) keeps a part, not all.
    chars = pc.utf8_length(texts).to_numpy()
    basic = english & (words > 2) & (chars > 5) & (small >= 200) & (large <= 3 * small)
    assert 0.35 < basic.mean() < 0.75
    b32, l14 = (table.column(f"clip_{m}_similarity_score").to_numpy() for m in ("b32", "l14"))
    assert b32.dtype == np.float32 and -0.06 < b32.min() and b32.max() < 0.56 and 0.2 < b32.mean() < 0.32
    assert np.corrcoef(b32, l14)[0, 1] > 0.5


def test_synthetic_embeddings_have_structure_to_find(synthetic_mirror):
    """Captions that describe their image score higher; the image embeddings hold near-duplicates (SemDeDup)."""
    parquet = synthetic_mirror[1][0]
    table = pq.read_table(parquet)
    languages = np.array(identify_languages(table.column("text"))[0])
    words = pc.list_value_length(pc.utf8_split_whitespace(table.column("text"))).to_numpy()
    for model in ("b32", "l14"):
        score = table.column(f"clip_{model}_similarity_score").to_numpy()
        assert score[(languages == "en") & (words > 2)].mean() > score[words <= 1].mean() + 0.05
    images = _embeddings([parquet])["l14_img"][:4000].astype(np.float32)
    similarity = images @ images.T
    np.fill_diagonal(similarity, -1)
    nearest = similarity.max(axis=1)
    assert 0.01 < (nearest > 0.95).mean() < 0.2  # near-duplicates and their sources
    assert np.median(nearest) < 0.95


def test_synthetic_mirror_is_deterministic_across_chunks_and_without_embeddings(tmp_path, monkeypatch):
    monkeypatch.setattr(published_mirror, "CHUNK_ROWS", 700)  # several chunks per file
    first = write_synthetic_mirror(tmp_path / "a", rows=3000, files=2, seed=3, progress=None)
    second = write_synthetic_mirror(tmp_path / "b", rows=3000, files=2, seed=3, progress=None)
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".npz").read_bytes() == b.with_suffix(".npz").read_bytes()
    _check_published_layout(tmp_path / "a", first, tmp_path)
    # Metadata only: the same parquets, no npz (an earlier run's npz in the folder is removed too).
    bare = write_synthetic_mirror(tmp_path / "a", rows=3000, files=2, seed=3, embeddings=False, progress=None)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["0000000000.parquet", "0000000001.parquet"]
    assert [p.read_bytes() for p in bare] == [p.read_bytes() for p in second]
    # Trimmed to L/14's images: the same parquets and the same l14_img, nothing else in the npz.
    trimmed = write_synthetic_mirror(tmp_path / "d", rows=3000, files=2, seed=3, npz_keys=("l14_img",), progress=None)
    assert [p.read_bytes() for p in trimmed] == [p.read_bytes() for p in second]
    for a, b in zip(trimmed, second):
        with np.load(a.with_suffix(".npz")) as small, np.load(b.with_suffix(".npz")) as whole:
            assert small.files == ["l14_img"]
            assert np.array_equal(small["l14_img"], whole["l14_img"])
    other = write_synthetic_mirror(tmp_path / "c", rows=3000, files=2, seed=4, embeddings=False, progress=None)
    assert pq.read_table(other).column("uid") != pq.read_table(second).column("uid")


def test_bad_file_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="files"):
        write_synthetic_mirror(tmp_path, rows=10, files=0, progress=None)
    with pytest.raises(ValueError, match="cannot fill"):
        write_synthetic_mirror(tmp_path, rows=2, files=3, progress=None)
