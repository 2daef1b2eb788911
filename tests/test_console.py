"""The terminal view of `python -m datacomp_assets.run`: a line per step, bars from the progress a step logs,
warnings and failures in a sentence, Dagster's event stream in the log file instead of the terminal."""

import io
import json
import os
import subprocess

import dagster as dg
import pytest
from rich.console import Console

from datacomp_assets.console import RunConsole, dagster_logger, leaderboard_lines, output_to_log
from datacomp_assets.core.progress import Progress
from datacomp_assets.core.strategies import STRATEGIES
from datacomp_assets.run import HEADLINE_STRATEGIES, chosen_strategies


def run_toy_job(console: RunConsole, fail: bool) -> dg.ExecuteInProcessResult:
    @dg.asset
    def download(context: dg.AssetExecutionContext) -> None:
        counted = Progress(context.log.info, "download", 4, "shards")
        for done in range(1, 5):
            counted(done, f"{done * 100} images")
        context.log.warning("3 urls timed out")

    @dg.asset(deps=[download])
    def training(context: dg.AssetExecutionContext) -> None:
        if fail:
            raise RuntimeError("open_clip training of seed_0 failed (exit code 1)")

    @dg.asset_check(asset=training)
    def training_loads() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=True)

    defs = dg.Definitions(assets=[download, training], asset_checks=[training_loads],
                          loggers={"run_console": dagster_logger(console)},
                          jobs=[dg.define_asset_job("toy", selection=[download, training])])
    with dg.instance_for_test() as instance:
        return defs.resolve_job_def("toy").execute_in_process(
            run_config={"loggers": {"run_console": {}}}, instance=instance, raise_on_error=False)


def test_a_run_shows_one_line_per_step_and_logs_every_event_to_the_file(tmp_path):
    screen = io.StringIO()
    console = RunConsole(Console(file=screen, width=120), tmp_path / "run.log",
                         quiet_steps=frozenset({"training_training_loads"}))  # the check's step
    with console.drawing_bars():
        assert run_toy_job(console, fail=False).success
    lines = screen.getvalue().splitlines()
    assert [line.split()[1] for line in lines if "✓" in line] == ["download", "training"]
    assert any("! download: 3 urls timed out" in line for line in lines)
    assert not any("DEBUG" in line or "STEP_START" in line for line in lines)  # the event stream is not here
    log = (tmp_path / "run.log").read_text()
    assert "STEP_START" in log and "download: 4/4 shards (400 images)" in log and "training_loads" in log
    assert [t.step for t in console.timings] == ["download", "training", "training_training_loads"]
    assert console.failure is None


def test_a_failed_step_is_named_with_its_error(tmp_path):
    screen = io.StringIO()
    console = RunConsole(Console(file=screen, width=120), tmp_path / "run.log")
    with console.drawing_bars():
        assert not run_toy_job(console, fail=True).success
    step, error = console.failure
    assert step == "training" and error == "RuntimeError: open_clip training of seed_0 failed (exit code 1)"
    assert "✗ training failed after" in screen.getvalue()


def test_what_a_step_or_its_child_processes_print_goes_to_the_log_file(tmp_path, capfd):
    with output_to_log(tmp_path / "run.log") as terminal:
        os.write(1, b"img2dataset: Starting the downloading of this file\n")
        subprocess.run(["sh", "-c", "echo a warning from a child >&2"], check=True)
        terminal.print("on the terminal")
    log = (tmp_path / "run.log").read_text()
    assert "img2dataset" in log and "a warning from a child" in log
    shown = capfd.readouterr()
    assert "on the terminal" in shown.out and "img2dataset" not in shown.out + shown.err


def test_the_default_is_the_headline_set_and_all_is_every_strategy():
    assert chosen_strategies(None) == list(HEADLINE_STRATEGIES)
    assert set(HEADLINE_STRATEGIES) <= set(STRATEGIES)
    assert chosen_strategies(["all"]) == list(STRATEGIES)
    assert chosen_strategies(["basic"]) == ["basic"]
    with pytest.raises(ValueError, match="unknown strategies bsic; known: all, no_filter"):
        chosen_strategies(["bsic"])


def test_the_compact_leaderboard_has_rank_size_mean_spread_and_the_orderings(tmp_path):
    rows = [{"track": "filtering", "rank": 1, "strategy": "clip_score_l14_30pct", "dataset_size": 5445, "seeds": 3,
             "average": 0.3605, "std": 0.0131, "beats_next": True},
            {"track": "filtering", "rank": 2, "strategy": "no_filter", "dataset_size": 18148, "seeds": 3,
             "average": 0.2603, "std": 0.0108, "beats_next": None}]
    ordering = [{"claim": "clip_score_l14_30pct > no_filter", "gap": 0.1002, "p_value": 0.0012,
                 "holds_beyond_noise": True}]
    board = tmp_path / "leaderboard.json"
    board.write_text(json.dumps({"scale": "tiny", "rows": rows, "paper_ordering": ordering}))
    text = "\n".join(leaderboard_lines(board))
    assert "clip_score_l14_30pct" in text and "18,148" in text and "0.3605 ± 0.0131   yes" in text
    assert "+0.1002  p 0.0012  [green]holds beyond noise" in text


def test_a_failed_run_says_which_step_why_where_the_log_is_and_how_to_resume(tmp_path, monkeypatch, capfd):
    from datacomp_assets import run as main_command

    def failing_run_scale(scale, strategies, subsets_only, console, dagster_logs):
        run_toy_job(console, fail=True)
        raise main_command.RunFailed("materializing tiny|basic failed")

    from datacomp_assets.definitions import RESOURCES
    from resources import StorageResource

    monkeypatch.setitem(RESOURCES, "storage", StorageResource(root=str(tmp_path / "data")))
    monkeypatch.setattr(main_command, "run_scale", failing_run_scale)
    with pytest.raises(SystemExit) as stopped:
        main_command.run_with_console("tiny", ["basic"], "python -m datacomp_assets.run --strategies basic")
    assert stopped.value.code == 1
    out = capfd.readouterr().out
    assert "Stopped after" in out and "training failed with" in out
    assert "RuntimeError: open_clip training of seed_0 failed (exit code 1)" in out
    log = next((tmp_path / "data" / "tiny" / "logs").glob("run-*.log"))
    assert f"Full log: {log}" in out and "STEP_FAILURE" in log.read_text()
    assert "To resume (what finished is kept): python -m datacomp_assets.run --strategies basic" in out
    assert len(out.splitlines()) < 20


def test_a_bar_names_its_step_and_partition_as_written(tmp_path):
    from rich.text import Text

    console = RunConsole(Console(file=io.StringIO(), force_terminal=True), tmp_path / "run.log")
    console.partition = "basic"
    console.start("checkpoint")
    console.advance("checkpoint", {"task": "training 3 seeds", "done": 12288, "total": 61440, "unit": "samples"})
    bar = console.bars.tasks[0]
    assert Text.from_markup(bar.description).plain == "checkpoint [basic]: training 3 seeds"  # not read as markup
    assert (bar.completed, bar.total, bar.fields["count"]) == (12288, 61440, "12,288/61,440 samples")
