"""The leaderboard ranks by the mean over seeds, shows their spread, and says which gaps exceed it."""

from datacomp_assets.leaderboard.table import Entry, beyond_noise, ordering_report, p_greater, rank, to_markdown


def entry(name, seed_averages, size=100):
    # Two tasks per seed whose mean is the seed's average.
    return Entry(name, size, 1000, {seed: {"a": avg - 0.01, "b": avg + 0.01} for seed, avg in enumerate(seed_averages)},
                 groups={"VTAB": sum(seed_averages) / len(seed_averages)})


def test_average_and_spread_are_over_seeds():
    e = entry("basic", [0.30, 0.32, 0.34])
    assert abs(e.average - 0.32) < 1e-12 and abs(e.std - 0.02) < 1e-12
    assert abs(e.tasks["a"] - 0.31) < 1e-12
    assert entry("one_seed", [0.5]).std == 0.0


def test_a_clear_gap_is_beyond_noise_and_an_overlap_is_not():
    clip, basic, close = entry("clip", [0.44, 0.45, 0.445]), entry("basic", [0.39, 0.40, 0.395]), \
        entry("close", [0.43, 0.46, 0.44])
    assert beyond_noise(clip, basic) is True
    assert beyond_noise(basic, clip) is False
    assert beyond_noise(clip, close) is False
    assert p_greater(clip, basic) < 0.01
    # With one seed the noise is unknown, and the board says so instead of guessing.
    assert beyond_noise(entry("x", [0.5]), basic) is None


def test_markdown_ranks_by_mean_and_marks_significance():
    entries = [entry("no_filter", [0.33, 0.335, 0.334]), entry("clip_score_l14_30pct", [0.44, 0.45, 0.445]),
               entry("basic", [0.39, 0.40, 0.395])]
    table = to_markdown(entries)
    rows = [line for line in table.splitlines()[2:]]
    assert [r.split(" | ")[1] for r in rows] == ["clip_score_l14_30pct", "basic", "no_filter"]
    header = table.splitlines()[0]
    assert "std" in header and "beats_next" in header and "VTAB" in header
    assert "| yes |" in rows[0] and "| yes |" in rows[1]
    assert [e.strategy for e in rank(entries)][0] == "clip_score_l14_30pct"


def test_paper_ordering_report():
    entries = [entry("no_filter", [0.33, 0.335, 0.334]), entry("clip_score_l14_30pct", [0.44, 0.45, 0.445]),
               entry("basic", [0.33, 0.336, 0.333])]
    report = {r["claim"]: r for r in ordering_report(entries)}
    assert report["clip_score_l14_30pct > basic"]["holds_beyond_noise"] is True
    assert report["basic > no_filter"]["holds_beyond_noise"] is False  # basic is no better here
    assert "clip_score_b32_30pct > basic" not in report  # not on the board


def test_each_track_is_ranked_apart_and_every_row_shows_its_lineage():
    from datacomp_assets.leaderboard.table import board_markdown, board_rows

    mine = entry("my_web_crawl", [0.50, 0.51, 0.52])
    mine.track = "byod"
    basic = entry("basic", [0.39, 0.40, 0.395])
    basic.lineage = {"subset_sha256": "a" * 64, "pool_version": "b" * 64, "strategy_version": "c" * 16,
                     "scale_version": "e" * 16,
                     "checkpoints": {"seed_0": {"path": "/x/epoch_2.pt", "sha256": "d" * 64}},
                     "code_revision": "0123abcd", "consistent": False}
    entries = [entry("no_filter", [0.33, 0.335, 0.334]), basic, mine]
    text = board_markdown(entries)
    filtering, byod = text.split("### Bring-your-own-data track")
    assert "| 1 | basic |" in filtering and "| 2 | no_filter |" in filtering and "my_web_crawl" not in filtering
    assert "| 1 | my_web_crawl |" in byod  # first in its own track, not above the filtering rows
    lineage_row = ("| basic | aaaaaaaaaaaa | dddddddddddd | bbbbbbbbbbbb | cccccccccccccccc | eeeeeeeeeeeeeeee | "
                   "0123abcd | "
                   "**no: re-materialize** |")
    assert lineage_row in filtering
    rows = board_rows(entries)
    assert [(r["track"], r["rank"], r["strategy"]) for r in rows] == [
        ("byod", 1, "my_web_crawl"), ("filtering", 1, "basic"), ("filtering", 2, "no_filter")]
    assert rows[1]["lineage"]["checkpoints"]["seed_0"]["path"] == "/x/epoch_2.pt"


def test_a_truncated_checkpoint_is_not_consistent(tmp_path):
    """The chain holds by the records and by the files: a checkpoint cut short after it was scored breaks it."""
    from pathlib import Path

    import numpy as np

    from datacomp_assets.core.layout import Layout, seed_name
    from datacomp_assets.core.lineage import file_sha256, files_sha256, write_lineage
    from datacomp_assets.core.scales import SCALES, scale_version
    from datacomp_assets.core.strategies import strategy_version
    from datacomp_assets.core.uids import save_subset, uids_to_array
    from datacomp_assets.leaderboard.assets import lineage_of

    layout, scale = Layout(tmp_path), SCALES["tiny"]
    subset = layout.subset_file("tiny", "basic")
    subset.parent.mkdir(parents=True)
    save_subset(np.sort(uids_to_array([f"{i:032x}" for i in range(5)])), subset)
    write_lineage(subset.parent, {"subset_sha256": file_sha256(subset), "strategy_version": strategy_version("basic")})
    checkpoints = {}
    for seed in scale.seeds:
        path = layout.seed_checkpoint("tiny", "basic", seed, scale.epochs)
        path.parent.mkdir(parents=True)
        path.write_bytes(bytes(range(256)) * 100 + bytes([seed]))
        checkpoints[seed_name(seed)] = {"path": str(path), "sha256": file_sha256(path)}
        results = layout.results_file("tiny", "basic", seed)
        results.parent.mkdir(parents=True)
        results.write_text('{"key": "objects", "metrics": {"main_metric": 0.5}}\n')
    write_lineage(layout.checkpoint_dir("tiny", "basic"), {"subset_sha256": file_sha256(subset),
                                                         "checkpoints": checkpoints,
                                                         "scale_version": scale_version(scale)})
    write_lineage(layout.eval_results_dir("tiny", "basic"), {
        "checkpoints": {name: c["sha256"] for name, c in checkpoints.items()},
        "results_sha256": files_sha256(layout.results_file("tiny", "basic", s) for s in scale.seeds)})
    assert lineage_of(layout, "tiny", "basic")["consistent"] is True

    last = Path(checkpoints[seed_name(scale.seeds[-1])]["path"])
    last.write_bytes(last.read_bytes()[:1000])  # cut short, its record untouched
    assert lineage_of(layout, "tiny", "basic")["consistent"] is False
