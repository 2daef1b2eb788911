"""What `python -m datacomp_assets.run` shows in the terminal, and the run's full log.

Dagster's event stream goes where the UI shows it (the instance's event log) and, as text, to a log file. The
terminal gets one line per finished step with its time, a bar with an ETA for the step running (drawn from the
numbers a step logs through core/progress.py), warnings, and on failure the step, its error, the log and the
command that resumes; at the end, the compact leaderboard. Whatever else a step prints (img2dataset, a library's
warning, a child process) goes to the log file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from datacomp_assets.core.progress import RECORD_FIELD

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


@dataclass
class StepTiming:
    step: str
    partition: str
    seconds: float
    ok: bool


class RunConsole(logging.Handler):
    """A logging handler for the records of Dagster's log manager (`dagster_logger` hands them over)."""

    def __init__(self, terminal: Console, log_file: Path, quiet_steps: frozenset[str] = frozenset()):
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.terminal, self.log_file = terminal, log_file
        self.quiet_steps = quiet_steps  # asset checks: a line only when they fail
        self.partition = ""  # the partition being materialized, for the step lines
        self.timings: list[StepTiming] = []
        self.failure: tuple[str, str] | None = None  # (step, error) of the first failed step
        self.log_failed = False  # the log file could not be written (said once)
        self.bars = Progress(TextColumn("  {task.description}"), BarColumn(bar_width=24),
                             TextColumn("{task.fields[count]}"), TimeElapsedColumn(), TextColumn("ETA"),
                             TimeRemainingColumn(), console=terminal, transient=True,
                             redirect_stdout=False, redirect_stderr=False)  # what steps print goes to the log
        self.running: dict[str, tuple[TaskID, float]] = {}  # step key -> (its bar, its start)

    def emit(self, record: logging.LogRecord) -> None:
        self.append_to_log(record)
        try:
            meta = getattr(record, "dagster_meta", None) or {}
            event, step = meta.get("dagster_event"), meta.get("step_key")
            kind = event.event_type_value if event is not None else None
            if kind == "STEP_START":
                self.start(step)
            elif kind in ("STEP_SUCCESS", "STEP_FAILURE"):
                self.finish(step, ok=kind == "STEP_SUCCESS", failure=event.event_specific_data)
            elif kind is None and step in self.running and hasattr(record, RECORD_FIELD):
                self.advance(step, getattr(record, RECORD_FIELD))
            elif kind is None and record.levelno >= logging.WARNING:
                message = meta.get("orig_message") or record.getMessage()
                self.say(f"  [yellow]! {escape(self.label(step or ''))}: {escape(str(message))}[/]")
        except Exception:  # a display problem must never fail the run
            self.handleError(record)

    def append_to_log(self, record: logging.LogRecord) -> None:
        """The record in the log file. A log that cannot be written (a full disk) is said once, and the terminal
        goes on showing the steps: the failed step is still named, and the events stay in the instance (the UI)."""
        try:
            with open(self.log_file, "a") as f:
                f.write(self.format(record) + "\n")
        except OSError as err:
            if not self.log_failed:
                self.log_failed = True
                self.say(f"  [yellow]! the log {escape(str(self.log_file))} cannot be written "
                         f"({escape(err.strerror or str(err))}); the run's events are in the UI (bin/ui)[/]")

    def start(self, step: str) -> None:
        task = self.bars.add_task(escape(self.label(step)), total=None, count="", visible=step not in self.quiet_steps)
        self.running[step] = (task, time.perf_counter())

    def advance(self, step: str, numbers: dict) -> None:
        task, _ = self.running[step]
        unit = f" {numbers['unit']}" if numbers.get("unit") else ""
        self.bars.update(task, description=escape(f"{self.label(step)}: {numbers['task']}"), total=numbers["total"],
                         completed=numbers["done"], count=f"{numbers['done']:,.0f}/{numbers['total']:,.0f}{unit}")

    def finish(self, step: str, ok: bool, failure) -> None:
        task, started = self.running.pop(step, (None, time.perf_counter()))
        if task is not None:
            self.bars.remove_task(task)
        seconds = time.perf_counter() - started
        self.timings.append(StepTiming(step, self.partition, round(seconds, 2), ok))
        if ok and step not in self.quiet_steps:
            self.say(f"  [green]✓[/] {escape(self.label(step)):<46} {clock(seconds):>8}")
        elif not ok:
            self.failure = self.failure or (self.label(step), error_message(failure))
            self.say(f"  [red]✗ {escape(self.label(step))} failed after {clock(seconds)}[/]")

    def label(self, step: str) -> str:
        return f"{step} [{self.partition}]" if self.partition and step else step

    def say(self, markup: str = "") -> None:
        self.terminal.print(markup, highlight=False, soft_wrap=True)

    @contextmanager
    def drawing_bars(self) -> Iterator[None]:
        with self.bars:
            yield


def error_message(failure) -> str:
    """The error of a failed step (Dagster's StepFailureData) as a user reads it: the step's own exception, under
    Dagster's wrappers ("Error occurred while materializing ..."). Not its innermost cause: an error raised `from`
    another is the clearer one (the storage resource's "the disk is full writing <path>" over a bare ENOSPC)."""
    info = getattr(failure, "error", None)
    if info is None:
        return str(failure)
    while (info.cls_name or "").startswith("Dagster") and getattr(info, "cause", None) is not None:
        info = info.cause
    return info.message.strip()  # "RuntimeError: ...", as Python prints an exception


def clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def dagster_logger(console: RunConsole) -> dg.LoggerDefinition:
    """A Dagster logger handing every record of a run to `console`."""

    @dg.logger(description="The terminal view of `python -m datacomp_assets.run`")
    def run_console(_init_context) -> logging.Logger:
        logger = logging.Logger("run_console", level=logging.DEBUG)
        logger.addHandler(console)
        return logger

    return run_console


@contextmanager
def output_to_log(log_file: Path, enabled: bool = True) -> Iterator[Console]:
    """Point this process's stdout and stderr (file descriptors 1 and 2, which child processes and Dagster's
    captured step output inherit) at `log_file`, and yield a console on the original terminal. Restored after."""
    if not enabled:
        yield Console(highlight=False)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield Console(file=terminal, highlight=False)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        terminal.close()


# ---------------------------------------------------------------- the end of a run


def leaderboard_lines(board_json: Path) -> list[str]:
    """The compact leaderboard (rank, strategy, dataset size, average ± std over seeds, the evaluation noise's 95%
    interval, beats the next row beyond the seeds' noise / beyond the evaluation noise) per track, then the paper's
    orderings, from the leaderboard asset's JSON."""
    board = json.loads(board_json.read_text())
    lines = []
    for track in sorted({r["track"] for r in board["rows"]}):
        rows = [r for r in board["rows"] if r["track"] == track]
        seeds = max(r["seeds"] for r in rows)
        lines += [f"[bold]Leaderboard, scale {board['scale']}[/] ({track} track, mean of {seeds} seeds' averages "
                  "over the tasks; beats next: one-sided Welch t-test over seeds, p < 0.05; eval noise: 95% "
                  "bootstrap interval over the test samples, and whether the gap to the next row exceeds it)",
                  f"  {'rank':>4}  {'strategy':<34} {'dataset size':>12}  {'average ± std':<17} "
                  f"{'beats next':<13} {'eval noise 95%':<18} beyond eval noise"]
        for r in rows:
            beats = {True: "yes", False: "within noise", None: ""}[r.get("beats_next")]
            beats_eval = {True: "yes", False: "within eval noise", None: ""}[r.get("beats_next_beyond_eval_noise")]
            interval = r.get("eval_noise_95")
            interval = f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "n/a"
            lines.append(f"  {r['rank']:>4}  {r['strategy']:<34} {r['dataset_size']:>12,}  "
                         f"{r['average']:.4f} ± {r['std']:.4f}   {beats:<13} {interval:<18} {beats_eval}".rstrip())
        lines.append("")
    if board.get("paper_ordering"):
        lines.append("[bold]The paper's orderings[/] (gap in average, one-sided p over seeds)")
        for o in board["paper_ordering"]:
            p = "n/a" if o["p_value"] is None else f"{o['p_value']:.4f}"
            holds = {True: "[green]holds beyond noise[/]", False: "[red]not beyond noise[/]",
                     None: "unknown (one seed)"}[o["holds_beyond_noise"]]
            lines.append(f"  {o['claim']:<40} {o['gap']:+.4f}  p {p:<7} {holds}")
        lines.append("")
    return lines
