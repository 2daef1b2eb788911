"""Built-ins protected, strategy files validated (issue 26, rows 7, 8 and 15): a user's file never silently replaces
a built-in strategy or scale; an explicit override changes the version and the board shows it; a bad strategy file
is one line naming the file, the strategy, the key and what to do."""

from dataclasses import replace

import numpy as np
import pytest

from datacomp_assets.core import scales, strategies
from datacomp_assets.core.layout import Layout, seed_name
from datacomp_assets.core.lineage import file_sha256, files_sha256, write_lineage
from datacomp_assets.core.uids import save_subset, uids_to_array


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- row 7: a built-in strategy is not replaced


def test_a_user_file_redefining_a_builtin_strategy_is_refused_with_a_new_name_to_use(tmp_path):
    path = write(tmp_path, "mine.toml", "[basic]\nwhere = \"language = 'en'\"\n")
    with pytest.raises(ValueError) as error:
        strategies.load_registry([path])
    message = str(error.value)
    assert str(path) in message and "[basic]" in message and "built-in" in message
    assert "[my_basic]" in message and "override = true" in message and "\n" not in message
    # Following the advice: a new name is a new strategy beside the built-in.
    write(tmp_path, "mine.toml", "[my_basic]\nwhere = \"language = 'en'\"\n")
    registry = strategies.load_registry([path])
    assert registry["basic"] == strategies.load_registry()["basic"] and registry["my_basic"].where == "language = 'en'"


def test_a_sweep_and_a_strategy_of_an_earlier_user_file_are_not_replaced_either(tmp_path):
    with pytest.raises(ValueError, match=r"\[random_25pct\] redefines one of the paper's sweeps"):
        strategies.load_registry([write(tmp_path, "sweep.toml", "[random_25pct]\nfraction = 0.3\nrandom = true\n")])
    first = write(tmp_path, "first.toml", "[cats]\nwhere = \"text_concept = 'cat'\"\n")
    second = write(tmp_path, "second.toml", "[cats]\nwhere = \"text_concept = 'dog'\"\n")
    with pytest.raises(ValueError, match=rf"{second}: \[cats\] redefines the strategy 'cats' of {first}"):
        strategies.load_registry([first, second])


def test_an_explicit_override_replaces_the_builtin_and_changes_its_version(tmp_path, monkeypatch):
    path = write(tmp_path, "mine.toml", "[basic]\noverride = true\nwhere = \"language = 'en'\"\n")
    registry = strategies.load_registry([path])
    assert registry["basic"].where == "language = 'en'" and registry["basic"].override
    # The version of the overridden strategy, and of every strategy built from it, differs from the built-in's.
    before = {name: strategies.strategy_version(name) for name in ("basic", "image_based_clip_score_l14_30pct")}
    monkeypatch.setitem(strategies.STRATEGIES, "basic", registry["basic"])
    assert strategies.strategy_version("basic") != before["basic"]
    assert strategies.overrides("basic") == ["basic"] and strategies.overrides("no_filter") == []
    # Even an override that repeats the built-in's settings is marked: the version says a user chose it.
    same = replace(strategies.load_registry()["basic"], override=True)
    monkeypatch.setitem(strategies.STRATEGIES, "basic", same)
    assert strategies.strategy_version("basic") != before["basic"]


def test_an_override_of_nothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\[cats\] sets `override = true`, but there is no strategy 'cats'"):
        strategies.load_registry([write(tmp_path, "mine.toml", "[cats]\noverride = true\n")])


# ---------------------------------------------------------------- row 8: tiny's recipe is not changed


def test_a_user_file_changing_tinys_recipe_is_refused_with_a_new_name_to_use(tmp_path):
    path = write(tmp_path, "scales.toml", "[tiny]\nsamples_seen = 1000\n")
    with pytest.raises(ValueError) as error:
        scales.load_registry([path])
    message = str(error.value)
    assert str(path.resolve()) in message and "[tiny]" in message and "['samples_seen']" in message
    assert "[my_tiny]" in message and 'inherit = "tiny"' in message and "override = true" in message
    # Following the advice: a scale of one's own, the built-in untouched.
    write(tmp_path, "scales.toml", '[my_tiny]\ninherit = "tiny"\nsamples_seen = 1000\n')
    registry = scales.load_registry([path])
    assert registry["my_tiny"].samples_seen == 1000 and registry["tiny"] == scales.SCALES["tiny"]
    # Where tiny's files are and its seeds are still the user's to set.
    seeds = scales.load_registry([write(tmp_path, "seeds.toml", "[tiny]\nseeds = [0]\n")])["tiny"]
    assert seeds.seeds == (0,) and not seeds.override


def test_an_explicit_tiny_override_changes_its_version_and_a_paper_scale_takes_none(tmp_path):
    tiny = scales.load_registry([write(tmp_path, "a.toml", "[tiny]\noverride = true\nsamples_seen = 1000\n")])["tiny"]
    assert tiny.samples_seen == 1000 and tiny.override
    assert scales.scale_version(tiny) != scales.scale_version(scales.SCALES["tiny"])
    same = scales.load_registry([write(tmp_path, "b.toml", "[tiny]\noverride = true\n")])["tiny"]
    assert scales.scale_version(same) != scales.scale_version(scales.SCALES["tiny"])
    # A second file amending the overridden scale keeps it marked; a scale inheriting it is the user's own.
    amended = scales.load_registry([tmp_path / "a.toml", write(tmp_path, "c.toml",
                                                               '[tiny]\nseeds = [0]\n[mine]\ninherit = "tiny"\n')])
    assert amended["tiny"].override and not amended["mine"].override
    with pytest.raises(ValueError, match=r"\[small\] may not change \['override'\]"):
        scales.load_registry([write(tmp_path, "d.toml", "[small]\noverride = true\n")])
    with pytest.raises(ValueError, match=r"\[mine\] sets `override = true`, but 'mine' is not a built-in scale"):
        scales.load_registry([write(tmp_path, "e.toml", '[mine]\ninherit = "tiny"\noverride = true\n')])
    with pytest.raises(ValueError, match=r"\[tiny\] override must be true or false, not 'yes'"):
        scales.load_registry([write(tmp_path, "f.toml", '[tiny]\noverride = "yes"\nsamples_seen = 1000\n')])


def finished_row(layout: Layout, scale: scales.ScaleConfig, strategy: str, samples_seen: int) -> None:
    """A strategy's subset, checkpoints and scores at `scale`, with the records the stages write."""
    subset = layout.subset_file(scale.name, strategy)
    subset.parent.mkdir(parents=True)
    save_subset(np.sort(uids_to_array([f"{i:032x}" for i in range(5)])), subset)
    write_lineage(subset.parent, {"subset_sha256": file_sha256(subset), "pool_version": "p" * 64,
                                  "strategy_version": strategies.strategy_version(strategy)})
    checkpoints = {}
    for seed in scale.seeds:
        path = layout.seed_checkpoint(scale.name, strategy, seed, scale.epochs)
        path.parent.mkdir(parents=True)
        path.write_bytes(bytes([seed]) * 100)
        checkpoints[seed_name(seed)] = {"path": str(path), "sha256": file_sha256(path)}
        results = layout.results_file(scale.name, strategy, seed)
        results.parent.mkdir(parents=True)
        results.write_text('{"key": "objects", "dataset": "objects", "group": "objects", '
                           '"metrics": {"main_metric": 0.5}}\n')
    write_lineage(layout.checkpoint_dir(scale.name, strategy), {
        "subset_sha256": file_sha256(subset), "checkpoints": checkpoints, "samples_seen": samples_seen,
        "scale_version": scales.scale_version(scale)})
    write_lineage(layout.eval_results_dir(scale.name, strategy), {
        "checkpoints": {name: c["sha256"] for name, c in checkpoints.items()},
        "results_sha256": files_sha256(layout.results_file(scale.name, strategy, s) for s in scale.seeds)})


def test_the_board_reports_what_the_checkpoints_were_trained_on_and_a_changed_recipe_is_not_consistent(
        tmp_path, monkeypatch):
    from datacomp_assets.leaderboard.assets import collect_entries
    from datacomp_assets.leaderboard.table import board_markdown

    layout, tiny = Layout(tmp_path / "data"), scales.SCALES["tiny"]
    finished_row(layout, tiny, "basic", samples_seen=20_480)  # what open_clip trained on: whole batches
    [entry] = collect_entries(layout, "tiny")
    assert entry.samples_seen == 20_480 and entry.lineage["consistent"] is True
    assert "(override)" not in board_markdown([entry])

    # The recipe overridden after training: the row keeps the trained figure, no longer reads consistent, and the
    # board marks the override.
    overridden = scales.load_registry([write(tmp_path, "scales.toml",
                                             "[tiny]\noverride = true\nsamples_seen = 1000\n")])["tiny"]
    monkeypatch.setitem(scales.SCALES, "tiny", overridden)
    [entry] = collect_entries(layout, "tiny")
    assert entry.samples_seen == 20_480 and entry.lineage["consistent"] is False
    text = board_markdown([entry])
    assert "| 20480 |" in text and "| 1000 |" not in text and "**no: re-materialize**" in text
    assert "| basic (override) |" in text
    # Trained again under the override (here: its records written so), the row holds, with the override's version.
    again = Layout(tmp_path / "again")
    finished_row(again, overridden, "basic", samples_seen=1024)
    [entry] = collect_entries(again, "tiny")
    assert entry.samples_seen == 1024 and entry.lineage["consistent"] is True
    assert f"| {scales.scale_version(overridden)} (override) |" in board_markdown([entry])


def test_the_board_marks_an_overridden_strategy_and_its_version(tmp_path, monkeypatch):
    from datacomp_assets.leaderboard.assets import collect_entries
    from datacomp_assets.leaderboard.table import board_markdown, board_rows

    layout, tiny = Layout(tmp_path / "data"), scales.SCALES["tiny"]
    finished_row(layout, tiny, "basic", samples_seen=20_480)
    monkeypatch.setitem(strategies.STRATEGIES, "basic", replace(strategies.STRATEGIES["basic"], override=True))
    [entry] = collect_entries(layout, "tiny")
    # The subset was cut by the built-in rule: under the override it is stale, and says so.
    assert entry.lineage["consistent"] is False and entry.lineage["overrides"] == ["basic"]
    finished_row(Layout(tmp_path / "again"), tiny, "basic", samples_seen=20_480)  # cut under the override
    [entry] = collect_entries(Layout(tmp_path / "again"), "tiny")
    assert entry.lineage["consistent"] is True
    text = board_markdown([entry])
    assert "| basic (override) |" in text
    assert f"{strategies.strategy_version('basic')} (override: basic)" in text
    assert board_rows([entry])[0]["strategy"] == "basic"  # the data keeps the plain name


# ---------------------------------------------------------------- row 15: one line per mistake in a strategy file


@pytest.mark.parametrize("text, message", [
    # a cycle through `within` and `intersect`, and a self-union
    ("[a]\nwithin = \"b\"\n[b]\nintersect = [\"a\", \"no_filter\"]\n",
     r"\[a\] is built from itself: \[a\] `within` -> \[b\] `intersect` -> \[a\]; remove one of these references"),
    ("[a]\nunion = [\"a\", \"basic\"]\n", r"\[a\] is built from itself: \[a\] `union` -> \[a\]"),
    # values of the wrong type
    ("[a]\nfraction = \"0.5\"\nrandom = true\n",
     r"\[a\] `fraction` must be a number in \(0, 1\] \(e\.g\. fraction = 0\.5, no quotes\), not '0\.5'"),
    ("[a]\nwhere = 5\n", r"\[a\] `where` must be text \(a quoted TOML string\), not 5"),
    ("[a]\nrandom = \"yes\"\nfraction = 0.5\n", r"\[a\] `random` must be true or false, not 'yes'"),
    ("[a]\nintersect = \"basic\"\n", r"\[a\] `intersect` must be a list of strategy names"),
    ("[a]\nmixture = [{ from = \"basic\", upsample = -3 }]\n",
     r"\[a\] `mixture` entry 1: upsample must be a whole number >= 1 \(times each uid is repeated\), not -3"),
    ("[a]\nmixture = [{ upsample = 2 }]\n", r"\[a\] `mixture` entry 1 needs `from`"),
    ("[a]\nmixture = [{ from = \"basic\", upsampel = 2 }]\n",
     r"\[a\] `mixture` entry 1 has unknown keys \['upsampel'\]"),
    # a reference to a strategy that does not exist
    ("[a]\nintersect = [\"basic\", \"basci\"]\n",
     r"\[a\] `intersect` names unknown strategies \['basci'\] \(did you mean 'basic'\?\)"),
    ("[a]\nwithin = \"nope\"\n", r"\[a\] `within` names unknown strategies \['nope'\]"),
])
def test_a_bad_strategy_file_is_one_line_naming_the_file_the_strategy_and_the_key(tmp_path, text, message):
    path = write(tmp_path, "mine.toml", text)
    with pytest.raises(ValueError, match=message) as error:
        strategies.load_registry([path])
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_a_cycle_in_the_main_command_is_one_line(tmp_path):
    from tests.test_user_errors import run_main

    path = write(tmp_path, "mine.toml", "[a]\nunion = [\"a\"]\n")
    result = run_main(env={"DAGSTER_HOME": str(tmp_path), "DATACOMP_STRATEGIES": str(path)})
    assert result.returncode != 0 and "Traceback" not in result.stderr and "RecursionError" not in result.stderr
    assert f"error: {path}: [a] is built from itself" in result.stderr
