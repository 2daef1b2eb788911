"""The baselines' uid lists: a scale's subsets under the reference's file names, as its resharder reads them."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from datacomp_assets.core.layout import Layout
from datacomp_assets.core.lineage import file_sha256, write_lineage
from datacomp_assets.core.uids import UID_DTYPE, save_subset, uids_to_array
from datacomp_assets.leaderboard.export_subsets import export_subsets, main, reference_file_name

SCALE = "tiny"
# Our strategy -> the `--save_path` name DataComp's README gives that baseline.
README_NAMES = {
    "no_filter": "no_filter.npy",
    "basic": "basic_filter.npy",
    "clip_score_l14_30pct": "clip_score_l14_30_percent.npy",
    "clip_score_b32_30pct": "clip_score_b32_30_percent.npy",
    "clip_score_b32_thr0.25": "clip_score_b32_25_threshold.npy",
    "laion2b": "laion.npy",
    "text_based": "text_based.npy",
    "image_based": "image_based.npy",
    "image_based_clip_score_l14_30pct": "image_based_intersect_clip_score_l14_30_percent.npy",
    "dfn_30pct": "dfn_30pct.npy",  # not a reference baseline: its own name
}


def resharder_load_subset(path) -> np.ndarray:
    """What the reference's resharder.py does with `--subset-file` (its load_subset)."""
    u16 = np.dtype("u8,u8")
    with open(path, "rb") as f:
        assert f.read(6) == b"\x93NUMPY"
    subset = np.load(path, mmap_mode="r")
    assert subset.dtype == u16
    return subset


def materialize(layout: Layout, strategy: str, n: int) -> np.ndarray:
    """A subset as the subset asset leaves it: the sorted uid file and its lineage record."""
    uids = [hashlib.md5(f"{strategy}{i}".encode()).hexdigest() for i in range(n)]
    arr = np.sort(uids_to_array(uids))
    path = layout.subset_file(SCALE, strategy)
    path.parent.mkdir(parents=True)
    save_subset(arr, path)
    write_lineage(path.parent, {"subset_sha256": file_sha256(path), "strategy": strategy})
    return arr


@pytest.fixture
def layout(tmp_path):
    return Layout(tmp_path / "data")


def test_every_subset_is_exported_under_the_readmes_name_as_the_resharder_reads_it(layout, tmp_path):
    subsets = {s: materialize(layout, s, 50 + i) for i, s in enumerate(README_NAMES)}
    out = tmp_path / "uid_lists"
    exports = export_subsets(layout, SCALE, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(README_NAMES.values())
    assert {e.strategy: e.target.name for e in exports} == README_NAMES
    for strategy, name in README_NAMES.items():
        loaded = resharder_load_subset(out / name)
        assert loaded.dtype == UID_DTYPE and np.array_equal(loaded, subsets[strategy])
        # what the resharder looks up: each uid is found once (searchsorted needs the sort order)
        hit = subsets[strategy][7]
        assert np.searchsorted(loaded, hit, "right") - np.searchsorted(loaded, hit, "left") == 1
        assert file_sha256(out / name) == file_sha256(layout.subset_file(SCALE, strategy))


def test_named_strategies_only_and_a_missing_one_names_the_command_that_makes_it(layout, tmp_path):
    materialize(layout, "basic", 20)
    assert [e.target.name for e in export_subsets(layout, SCALE, tmp_path / "a", ["basic"])] == ["basic_filter.npy"]

    out = tmp_path / "b"
    with pytest.raises(ValueError) as err:
        export_subsets(layout, SCALE, out, ["basic", "laion2b"])
    assert str(err.value) == ("export_subsets: laion2b: no subset at "
                              f"{layout.subset_file(SCALE, 'laion2b')}; make it with: "
                              f"python -m datacomp_assets.run --scale {SCALE} --strategies laion2b --subsets-only")
    assert not out.exists()  # nothing written when anything is missing


def test_a_different_file_is_replaced_only_with_force_and_nothing_goes_outside_out(layout, tmp_path):
    materialize(layout, "basic", 20)
    materialize(layout, "no_filter", 30)
    out = tmp_path / "uid_lists"
    out.mkdir()
    (out / "basic_filter.npy").write_bytes(b"someone else's file")
    with pytest.raises(ValueError, match="basic_filter.npy exists and holds something else; pass --force"):
        export_subsets(layout, SCALE, out)
    assert not (out / "no_filter.npy").exists()
    export_subsets(layout, SCALE, out, force=True)
    assert file_sha256(out / "basic_filter.npy") == file_sha256(layout.subset_file(SCALE, "basic"))
    export_subsets(layout, SCALE, out)  # the same files again: nothing to refuse

    with pytest.raises(ValueError, match="is not a strategy name"):
        export_subsets(layout, SCALE, out, ["../escape"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "uid_lists"]
    assert sorted(p.name for p in out.iterdir()) == ["basic_filter.npy", "no_filter.npy"]


def test_a_subset_unlike_its_record_is_refused(layout, tmp_path):
    materialize(layout, "basic", 20)
    path = layout.subset_file(SCALE, "basic")
    save_subset(np.sort(uids_to_array(["0" * 32])), path)  # replaced since its lineage was written
    with pytest.raises(ValueError, match="is not the subset its lineage.json records; make it again with"):
        export_subsets(layout, SCALE, tmp_path / "out")


def test_the_command_line(layout, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATACOMP_HOME", str(layout.root))
    assert main(["--scale", SCALE, "--out", str(tmp_path / "out")]) == 1
    assert "no subset is materialized at scale 'tiny'" in capsys.readouterr().err
    materialize(layout, "clip_score_l14_30pct", 12)
    assert main(["--scale", SCALE, "--out", str(tmp_path / "out")]) == 0
    assert "clip_score_l14_30_percent.npy" in capsys.readouterr().out
    assert main(["--scale", "nope", "--out", str(tmp_path / "out")]) == 1
    assert "unknown scale 'nope'" in capsys.readouterr().err


def test_reference_names_of_the_sweeps():
    assert reference_file_name("clip_score_b32_thr0.28") == "clip_score_b32_28_threshold.npy"
    assert reference_file_name("clip_score_l14_40pct") == "clip_score_l14_40_percent.npy"
    assert reference_file_name("random_10pct") == "random_10pct.npy"
