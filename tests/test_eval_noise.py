"""Evaluation noise: the bootstrap over test samples (evaluation/noise.py), against independent computations, and
the leaderboard showing each row's interval beside the seeds' spread."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
from sklearn.metrics import f1_score

from datacomp_assets.evaluation import noise
from datacomp_assets.leaderboard.table import Entry, beyond_eval_noise, board_rows, to_markdown

R = 200  # resamples in the tests: enough for the checks below, fast


def drawn_indices(task_key: str, n: int, n_resamples: int = R, seed: int = noise.SEED) -> np.ndarray:
    """The resamples as noise.replicates draws them, drawn here in one go."""
    return np.random.default_rng([seed, zlib.crc32(task_key.encode())]).integers(0, n, size=(n_resamples, n))


def coin_outcome(n: int, p: float = 0.7) -> dict:
    correct = np.zeros(n, dtype=bool)
    correct[: round(p * n)] = True
    return {"kind": np.array("mean"), "values": correct}


def test_interval_contains_the_metric_has_the_binomial_width_and_narrows_with_more_samples():
    widths = {}
    for n in (100, 1600):
        reps = noise.replicates("cifar10", coin_outcome(n), n_resamples=1000)
        low, high = noise.interval(reps)
        assert low < 0.7 < high
        widths[n] = high - low
        # The normal approximation of a proportion's 95% interval: 2 * 1.96 * sqrt(p (1 - p) / n).
        assert widths[n] == pytest.approx(2 * 1.96 * np.sqrt(0.7 * 0.3 / n), rel=0.15)
    assert widths[1600] == pytest.approx(widths[100] / 4, rel=0.25)


def test_same_seed_same_interval_and_chunking_does_not_change_the_draws(monkeypatch):
    outcome = coin_outcome(300)
    first = noise.replicates("imagenet1k", outcome, n_resamples=R)
    assert np.array_equal(first, noise.replicates("imagenet1k", outcome, n_resamples=R))
    assert not np.array_equal(first, noise.replicates("imagenet1k", outcome, n_resamples=R, seed=1))
    monkeypatch.setattr(noise, "MAX_DRAWN", 300 * 7)  # 7 resamples at a time
    assert np.array_equal(first, noise.replicates("imagenet1k", outcome, n_resamples=R))


def test_worst_group_and_per_class_recall_match_a_loop_over_resamples():
    rng = np.random.default_rng(5)
    n = 60
    values, groups = rng.random(n) < 0.6, rng.integers(0, 4, n)
    groups[:4] = 9  # a small group (FMoW has a region of 4 images), often missing from a resample
    for reduce in ("min", "mean"):
        outcome = {"kind": np.array("group"), "values": values, "groups": groups, "reduce": np.array(reduce)}
        got = noise.replicates("wilds/fmow", outcome, n_resamples=R)
        want = []
        for idx in drawn_indices("wilds/fmow", n):
            means = [values[idx][groups[idx] == g].mean() for g in np.unique(groups[idx])]
            want.append(min(means) if reduce == "min" else np.mean(means))
        assert got == pytest.approx(np.array(want), rel=1e-12)


def test_macro_f1_matches_scikit_learn_on_each_resample():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 6, 80)
    pred = np.where(rng.random(80) < 0.5, labels, rng.integers(0, 7, 80))  # class 6 only ever predicted
    got = noise.replicates("wilds/iwildcam", {"kind": np.array("macro_f1"), "pred": pred, "labels": labels},
                           n_resamples=R)
    want = [f1_score(labels[idx], pred[idx], average="macro", labels=np.unique(labels[idx]), zero_division=0)
            for idx in drawn_indices("wilds/iwildcam", 80)]
    assert got == pytest.approx(np.array(want), rel=1e-12)


def test_retrieval_resamples_images_with_their_captions():
    rng = np.random.default_rng(7)
    n_images = 30
    text_image = np.repeat(np.arange(n_images), rng.integers(1, 6, n_images))  # 1 to 5 captions each
    image_hits, text_hits = rng.random(len(text_image)) < 0.4, rng.random(n_images) < 0.5
    outcome = {"kind": np.array("retrieval"), "image_hits": image_hits, "text_image": text_image,
               "text_hits": text_hits}
    assert noise.metric_on(outcome, np.arange(n_images)[None])[0] == pytest.approx(
        0.5 * (image_hits.mean() + text_hits.mean()))
    got = noise.replicates("retrieval/flickr_1k_test_image_text_retrieval", outcome, n_resamples=R)
    want = []
    for idx in drawn_indices("retrieval/flickr_1k_test_image_text_retrieval", n_images):
        captions = [image_hits[text_image == i] for i in idx]  # each drawn image brings all its captions
        want.append(0.5 * (np.concatenate(captions).mean() + text_hits[idx].mean()))
    assert got == pytest.approx(np.array(want), rel=1e-12)


def test_outcomes_file_round_trip_and_summary(tmp_path):
    path = tmp_path / "seed_0" / "eval_samples.npz"
    noise.add_outcomes(path, {"wilds/fmow": coin_outcome(50, 0.5)})
    noise.add_outcomes(path, {"cifar10": coin_outcome(40)})
    outcomes = noise.read_outcomes(path)
    assert set(outcomes) == {"wilds/fmow", "cifar10"} and str(outcomes["cifar10"]["kind"]) == "mean"
    assert noise.read_outcomes(tmp_path / "none.npz") == {}
    summary = noise.write_noise(path, tmp_path / "eval_noise.json", ["cifar10", "wilds/fmow"])
    assert json.loads((tmp_path / "eval_noise.json").read_text()) == summary
    assert summary["tasks"]["cifar10"]["samples"] == 40 and summary["n_resamples"] == noise.N_RESAMPLES
    average = np.mean([noise.replicates(k, outcomes[k]) for k in ("cifar10", "wilds/fmow")], axis=0)
    assert summary["average_replicates"] == pytest.approx(average.tolist())
    assert summary["average"]["low"] < 0.6 < summary["average"]["high"]
    # A task scored before outcomes were kept: its own interval is missing, and so is the average's.
    partial = noise.noise_summary(outcomes, ["cifar10", "wilds/fmow", "imagenet1k"])
    assert partial["average"] is None and partial["average_replicates"] is None and "cifar10" in partial["tasks"]


# ---------------------------------------------------------------- the board


def entry(name, seed_averages, replicates=None):
    e = Entry(name, 100, 1000, {seed: {"a": avg} for seed, avg in enumerate(seed_averages)})
    if replicates is not None:
        e.noise_replicates = {seed: list(avg + replicates) for seed, avg in enumerate(seed_averages)}
    return e


def test_board_shows_the_interval_and_whether_a_gap_is_within_it():
    wobble = np.random.default_rng(0).normal(0, 0.01, 1000)  # the same resamples for every row: paired
    far, near, old = (entry("clip_score_l14_30pct", [0.45, 0.46], wobble), entry("basic", [0.40, 0.41], wobble),
                      entry("no_filter", [0.39, 0.395]))
    low, high = far.eval_noise
    assert low < far.average < high and high - low == pytest.approx(2 * 1.96 * 0.01, rel=0.15)
    assert beyond_eval_noise(far, near) is True  # paired: the gap is the same on every resample
    shifted = entry("close", [0.455, 0.465], np.random.default_rng(1).normal(0, 0.01, 1000))
    assert beyond_eval_noise(far, shifted) is False  # 0.005 apart, unpaired noise of 0.01 each
    assert beyond_eval_noise(near, old) is None and old.eval_noise is None  # results without outcomes

    table = to_markdown([far, near, old])
    header, _, first, second, third = table.splitlines()
    assert "eval_noise_95" in header and "beats_next_eval" in header
    assert f"[{low:.4f}, {high:.4f}]" in first and "| yes |" in first
    assert "| 0.3925 | 0.0035 |  |" in third  # no interval, no error
    rows = {r["strategy"]: r for r in board_rows([far, near, old])}
    assert rows["clip_score_l14_30pct"]["eval_noise_95"] == pytest.approx([low, high])
    assert rows["basic"]["beats_next_beyond_eval_noise"] is None and rows["no_filter"]["eval_noise_95"] is None
    assert rows["clip_score_l14_30pct"]["beats_next_beyond_eval_noise"] is True
    assert "within eval noise" in to_markdown([far, shifted])


def test_collect_entries_reads_the_noise_files_and_tolerates_old_results(tmp_path):
    from datacomp_assets.core.layout import Layout
    from datacomp_assets.core.scales import SCALES
    from datacomp_assets.core.uids import save_subset, uids_to_array
    from datacomp_assets.leaderboard.assets import collect_entries

    layout, seeds = Layout(tmp_path), SCALES["tiny"].seeds
    for strategy, with_noise in (("basic", True), ("no_filter", False)):
        subset = layout.subset_file("tiny", strategy)
        subset.parent.mkdir(parents=True)
        save_subset(np.sort(uids_to_array([f"{i:032x}" for i in range(5)])), subset)
        for seed in seeds:
            results = layout.results_file("tiny", strategy, seed)
            results.parent.mkdir(parents=True)
            results.write_text('{"key": "objects", "group": "ImageNet", "metrics": {"main_metric": 0.5}}\n'
                               '{"key": "fairness/fairface", "dataset": "FairFace", "metrics": {"main_metric": null}}\n')
            if with_noise:
                layout.eval_noise_file("tiny", strategy, seed).write_text(json.dumps(
                    {"average": {"low": 0.4, "high": 0.6}, "average_replicates": [0.4, 0.5, 0.6]}))
    entries = {e.strategy: e for e in collect_entries(layout, "tiny")}
    assert entries["basic"].eval_noise == pytest.approx((0.405, 0.595))
    assert entries["no_filter"].eval_noise is None and entries["no_filter"].average == 0.5  # FairFace left out
