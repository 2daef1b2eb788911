"""The paper scales' code path, rehearsed end to end on a CPU: a scale declared in a user's file, over a mirror in
the published layout whose urls point at the loopback synthetic web, from pool_index to the leaderboard.

What differs from `small` is only data: the mirror's size, its urls, and small stand-ins for the files a user
supplies (ImageNet's L/14 embeddings, MetaCLIP's entries, a DFN checkpoint). Everything runs through Dagster, as
`python -m datacomp_assets.run` runs it for a user.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.layout import Layout
from datacomp_assets.core.uids import load_subset, uids_to_array
from datacomp_assets.core.language import caption_stats, identify_languages, identify_languages_cld3
from datacomp_assets.world.index import write_pool_index
from datacomp_assets.world.published_mirror import write_mirror_from_index
from datacomp_assets.world.web_server import free_port
from resources import SyntheticWebResource
from tests.miniature import REHEARSAL_SCALE

ROOT = Path(__file__).resolve().parents[1]
POOL = 400
TRAINED = ["no_filter", "image_based", "dfn_30pct"]  # one metadata rule, one with user inputs, one on pixels
METADATA_ONLY = ["no_filter", "basic", "clip_score_b32_30pct", "clip_score_l14_30pct", "laion2b", "text_based",
                 "image_based_clip_score_l14_30pct", "metaclip", "semdedup_clip_score_l14_30pct",
                 "vas_clip_score_b32_45pct"]

SCALE_FILE = REHEARSAL_SCALE + """eval_suite_scale = 0.04
metaclip_t_override = 20
kmeans_clusters = 16
imagenet_embeddings = "inputs/imagenet_l14.npy"
metaclip_entries = "inputs/metaclip_entries.txt"
dfn_checkpoint = "inputs/dfn.pt"
dfn_architecture = "datacomp-tiny"
"""


def write_inputs(root: Path, mirror: Path) -> None:
    """Stand-ins for the user's files, in the public ones' formats."""
    import torch

    from datacomp_assets.core.models import load_model

    inputs = root / "inputs"
    inputs.mkdir()
    with np.load(sorted(mirror.glob("*.npz"))[0]) as npz:  # "ImageNet" images: a few pool images, perturbed
        images = npz["l14_img"][:24].astype(np.float32)
    images += np.random.default_rng(0).normal(0, 0.01, images.shape).astype(np.float32)
    np.save(inputs / "imagenet_l14.npy", images / np.linalg.norm(images, axis=1, keepdims=True))
    entries = ["photo", "red", "blue", "circle", "a photo", *map(str, range(100))]
    (inputs / "metaclip_entries.txt").write_text("\n".join(entries))
    model, _, _ = load_model("datacomp-tiny")  # an untrained network: its scores are noise, its format is real
    torch.save({"state_dict": model.state_dict()}, inputs / "dfn.pt")


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datacomp_assets.run", "--scale", "rehearsal", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    web = SyntheticWebResource(port=free_port())
    index = write_pool_index(web.web_config(), POOL, web.base_url, root / "web_index", processes=1)
    mirror = root / "mirror"
    write_mirror_from_index(Path(index["path"]), Path(index["ground_truth_path"]), mirror, files=2)
    write_inputs(root, mirror)
    (root / "scales.toml").write_text(SCALE_FILE)
    env = {**os.environ, "DATACOMP_SCALES": str(root / "scales.toml"), "DATACOMP_HOME": str(root / "data"),
           "DAGSTER_HOME": str(root / "dagster"), "DATACOMP_MIRROR": ""}
    # Filtering first, with the web not served: were a metadata-only rule to need images, this would fail.
    filtered = run(["--subsets-only", "--strategies", *METADATA_ONLY], env)
    downloaded_before_training = Layout(root / "data").pool_shards("rehearsal").exists()
    with web.serve():
        trained = run(["--strategies", *TRAINED], env)
    return root, mirror, trained, filtered, downloaded_before_training


def test_a_declared_scale_runs_the_published_path_from_pool_index_to_the_leaderboard(rehearsal):
    root, _, trained, _, _ = rehearsal
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-5000:]
    data = root / "data" / "rehearsal"
    board = (data / "leaderboard" / "leaderboard.md").read_text()
    for strategy in TRAINED:
        assert re.search(rf"\| {strategy} \|", board), board
        assert (data / "eval_results" / strategy).exists()
    # The metadata is the published files, linked, not copied, with the pool's uid index.
    metadata = pq.read_table(sorted((data / "pool_metadata").glob("*.parquet")))
    assert metadata.num_rows == POOL and "language" not in metadata.column_names
    assert all(p.is_symlink() for p in (data / "pool_metadata").glob("*.npz"))
    assert all(p.is_symlink() for p in (data / "pool_metadata").glob("*.parquet"))
    assert (data / "pool_metadata" / "uid_index" / "uids.npy").exists()
    # image_based's caption terms needed counts and fastText (pool_features): computed on demand, each row once
    fasttext = pq.read_table(sorted((data / "caption_features" / "fasttext").glob("*.parquet")))
    assert 0 < fasttext.num_rows < POOL and len(set(fasttext["uid"].to_pylist())) == fasttext.num_rows
    # laion2b (one of the subsets) computed CLD3 on its candidates only: the rows whose B/32 score passes
    cld3 = pq.read_table(sorted((data / "caption_features" / "cld3").glob("*.parquet")))
    candidates = metadata.filter(pc.greater_equal(metadata["clip_b32_similarity_score"], 0.28))
    assert 0 < cld3.num_rows < POOL and sorted(cld3["uid"].to_pylist()) == sorted(candidates["uid"].to_pylist())
    # No scorer CLIP was trained and no curated source built: the published scores were used as they are.
    for miniature_only in ("scorer_models", "curated_source"):
        assert not (data / miniature_only).exists()
    # pool_shards really downloaded from the loopback web; the DFN scored those images.
    successes = sum(json.loads(p.read_text())["successes"] for p in (data / "pool_shards").glob("*_stats.json"))
    assert POOL // 2 < successes < POOL  # the web injects dead links, timeouts and corrupt images
    assert pq.read_table(sorted((data / "image_scores" / "dfn").glob("*.parquet"))).num_rows == successes
    # no_filter's training shards hold exactly the downloaded samples; the rest are counted as missing, as the
    # reference resharder reports them.
    manifest = json.loads((Layout(root / "data").train_shards("rehearsal", "no_filter") / "manifest.json").read_text())
    assert manifest["summary"]["samples_written"] == successes
    assert manifest["summary"]["missing_uids"] == POOL - successes


def test_the_main_command_prints_a_line_per_step_and_the_compact_board_not_dagsters_events(rehearsal):
    root, _, trained, _, _ = rehearsal
    lines = trained.stdout.splitlines()
    assert len(lines) <= 100 and "DEBUG" not in trained.stdout and "STEP_START" not in trained.stdout
    for step in ("pool_shards [rehearsal]", "checkpoint [no_filter]", "eval_results [dfn_30pct]", "leaderboard"):
        assert any("✓" in line and step in line for line in lines), trained.stdout
    assert "Leaderboard, scale rehearsal" in trained.stdout and "average ± std" in trained.stdout
    log = sorted((root / "data" / "rehearsal" / "logs").glob("run-*.log"))[-1].read_text()  # the trained run's
    assert "STEP_START" in log and "Starting the downloading" in log  # the event stream, and what img2dataset printed


def test_filtering_at_a_published_pool_runs_without_images(rehearsal):
    root, _, _, filtered, downloaded_before_training = rehearsal
    assert filtered.returncode == 0, filtered.stdout[-3000:] + filtered.stderr[-5000:]
    assert not downloaded_before_training
    for strategy in METADATA_ONLY:
        assert Layout(root / "data").subset_file("rehearsal", strategy).exists()


def reference(mirror: Path) -> pd.DataFrame:
    """The published columns, with the caption features computed here, independently of the pipeline's files."""
    pool = pq.read_table(sorted(mirror.glob("*.parquet"))).to_pandas()
    pool["language"], _ = identify_languages(pool.text.tolist())
    pool["cld3_language"] = identify_languages_cld3(pool.text.tolist())
    for name, values in caption_stats(pool.text.tolist()).items():
        pool[name] = np.asarray(values)
    return pool


def top(scores: pd.Series, fraction: float) -> pd.Series:
    threshold = np.quantile(scores.dropna(), 1 - fraction, method="inverted_cdf")
    return scores >= threshold


def test_each_metadata_only_rule_keeps_what_the_published_columns_say(rehearsal):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    root, mirror, _, filtered, _ = rehearsal
    assert filtered.returncode == 0, filtered.stderr[-3000:]
    layout = Layout(root / "data")
    pool = reference(mirror)
    side_min = np.minimum(pool.original_width, pool.original_height)
    side_max = np.maximum(pool.original_width, pool.original_height)
    classes = {n.lower() for n in IMAGENET_CLASSNAMES if re.fullmatch(r"[a-z]+", n.lower())}
    words = pool.text.str.lower().str.findall(r"[a-z]+")
    names_class = words.map(lambda ws: any(w in classes or w.removesuffix("s") in classes
                                           or w.removesuffix("es") in classes for w in ws))
    expected = {
        "no_filter": pd.Series(True, index=pool.index),
        "basic": (pool.language == "en") & (pool.num_words > 2) & (pool.num_chars > 5) & (side_min >= 200)
                 & (side_max / side_min <= 3),
        "clip_score_b32_30pct": top(pool.clip_b32_similarity_score, 0.30),
        "clip_score_l14_30pct": top(pool.clip_l14_similarity_score, 0.30),
        "laion2b": (pool.cld3_language == "en") & (pool.clip_b32_similarity_score >= 0.28),
        "text_based": (pool.language == "en") & names_class,
    }
    for strategy, keep in expected.items():
        kept = np.sort(load_subset(layout.subset_file("rehearsal", strategy)))
        want = np.sort(uids_to_array(pool.uid[keep].tolist()))
        assert np.array_equal(kept, want), f"{strategy}: {len(kept)} kept, {len(want)} expected"
        assert len(kept) > 0 or strategy == "laion2b"

    def uids(strategy: str) -> set:
        return set(load_subset(layout.subset_file("rehearsal", strategy)).tolist())

    # The intersection is exactly the intersection of its parts (image_based's part is checked by the features
    # tests against the reference's k-means rule).
    assert uids("image_based_clip_score_l14_30pct") == uids("image_based") & uids("clip_score_l14_30pct")


def test_a_paper_scale_with_no_files_fails_at_once_naming_what_to_supply(tmp_path):
    env = {**os.environ, "DATACOMP_HOME": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "dagster"),
           "DATACOMP_MIRROR": "", "DATACOMP_SCALES": ""}
    result = subprocess.run([sys.executable, "-m", "datacomp_assets.run", "--scale", "small", "--strategies",
                             "image_based", "metaclip", "vas_clip_score_b32_45pct", "dfn_30pct"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    for setting in ("imagenet_embeddings", "metaclip_entries", "vas_target_embeddings", "dfn_checkpoint"):
        assert f"`{setting}`" in result.stderr, result.stderr
    assert "metadata.json in github.com/facebookresearch/MetaCLIP" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing ran
