"""Scaling analysis (the paper's Figures 2 and 3) and the submission export, on boards made by hand."""

import json

import numpy as np
import pytest

from datacomp_assets.core.scales import SCALES
from datacomp_assets.leaderboard.scaling import (
    PAPER_IMAGENET, correlation_png, family, imagenet_scores, rank_correlations, size_vs_average_png)
from datacomp_assets.leaderboard.submission import USER_FIELDS, export_submission


def row(strategy, size, average, imagenet, track="filtering"):
    return {"strategy": strategy, "dataset_size": size, "average": average, "std": 0.01, "track": track,
            "groups": {"ImageNet": imagenet}}


def test_families_group_sizes_of_one_rule():
    assert family("no_filter") == family("random_10pct") == "random subset"
    assert family("clip_score_l14_30pct") == family("clip_score_b32_30pct") == "CLIP score"
    assert family("image_based_clip_score_l14_30pct") == "image-based"
    assert family("basic") == "basic"
    assert family("clip_score_l14_30pct_plus_recaptioned") == "recaptioning"


def test_rank_correlation_of_the_papers_small_and_medium_baselines():
    # By hand: the ranks differ for image ∩ CLIP (4 vs 7), text (6 vs 4) and CLIP L/14 (7 vs 6):
    # sum d^2 = 9 + 4 + 1 = 14, rho = 1 - 6 * 14 / (7 * 48) = 0.75.
    correlations = {(c["a"], c["b"]): c for c in rank_correlations(PAPER_IMAGENET)}
    assert correlations[("small", "medium")]["spearman"] == pytest.approx(0.75)
    assert correlations[("medium", "large")]["spearman"] == pytest.approx(1.0)
    assert correlations[("small", "xlarge")]["strategies"] == 4  # xlarge lacks three baselines


def test_measured_board_against_the_paper_and_too_few_in_common():
    board = [row("no_filter", 1000, 0.2, 0.10), row("basic", 400, 0.25, 0.12), row("laion2b", 200, 0.24, 0.13),
             row("mine", 300, 0.3, 0.2, track="byod")]
    scores = imagenet_scores(board)
    assert scores == {"no_filter": 0.10, "basic": 0.12, "laion2b": 0.13}  # the byod row ranks apart
    correlations = rank_correlations({"tiny": scores, "medium": PAPER_IMAGENET["medium"], "two": {"basic": 1, "x": 2}})
    assert [(c["a"], c["b"]) for c in correlations] == [("tiny", "medium")]
    assert correlations[0]["spearman"] == pytest.approx(1.0)  # medium: no_filter 17.6 < basic 22.6 < laion 23.0
    rankings = {"tiny": scores, "medium": PAPER_IMAGENET["medium"]}
    for png in (size_vs_average_png({"tiny": board}), correlation_png(rankings, correlations)):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_submission_export_reads_back_in_the_public_layout(tmp_path):
    uids = np.array([(1, 2), (3, 4)], dtype="u8,u8")
    np.save(tmp_path / "subset.npy", uids)
    results = tmp_path / "eval_results.jsonl"
    lines = [{"key": "imagenet1k", "dataset": "ImageNet 1k", "metrics": {"acc1": 0.4, "main_metric": 0.4}},
             {"key": "fairface", "dataset": "FairFace", "metrics": {"main_metric": None}},
             {"key": "mnist", "dataset": "MNIST", "metrics": {"main_metric": 0.2}}]
    results.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "export"
    (out / "stale_file").parent.mkdir()
    (out / "stale_file").write_text("from an earlier export")
    export_submission(out, SCALES["small"], "basic", "English, long captions", "filtering", tmp_path / "subset.npy",
                      results, {"seed_0": 0.3}, {"subset_sha256": "ab" * 32})

    assert not (out / "stale_file").exists()  # an export replaces the earlier one whole
    assert (out / "small_scale" / "results.jsonl").read_text() == results.read_text()
    assert np.array_equal(np.load(out / "small_scale" / "samples" / "basic.npy"), uids)
    record = json.loads((out / "submission.json").read_text())["record"]
    assert record["scale"] == "small" and record["model"] == "ViT-B-32" and record["dataset_size"] == 2
    assert record["batch_size"] == 4096 and record["learning_rate"] == 5e-4 and record["track"] == "filtering"
    assert record["ImageNet 1k"] == 0.4 and record["MNIST"] == 0.2 and "FairFace" not in record
    assert all(record[f] == "" for f in USER_FIELDS)  # who submits is the user's to fill; no credentials here
    readme = (out / "README.md").read_text()
    assert "hf upload" in readme and "not a valid entry" not in readme


def test_submission_export_refuses_empty_results(tmp_path):
    np.save(tmp_path / "subset.npy", np.array([(1, 2)], dtype="u8,u8"))
    (tmp_path / "r.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no results"):
        export_submission(tmp_path / "out", SCALES["tiny"], "basic", "", "filtering", tmp_path / "subset.npy",
                          tmp_path / "r.jsonl", {}, {})
    assert not (tmp_path / "out").exists()
