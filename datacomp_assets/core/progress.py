"""Progress of a long task (a download, a training, an evaluation), told through a log call.

A stage's loop calls its `Progress` at its natural steps (a shard written, a training log line, a task scored).
Each call is a log line a person reads in the run's log ("training seed 0: 5,120/20,480 samples") and carries
the numbers on the log record (`extra={"progress": {...}}`), from which the console of
`python -m datacomp_assets.run` draws a bar with an ETA. In an asset, `log` is Dagster's `context.log.info`;
any callable taking a message and `extra=` will do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

RECORD_FIELD = "progress"  # the log record's attribute that carries the numbers


@dataclass(frozen=True)
class Progress:
    log: Callable[..., None]
    task: str        # what is being counted, e.g. "training seed 0"
    total: float
    unit: str = ""   # e.g. "samples"

    def __call__(self, done: float, note: str = "") -> None:
        message = f"{self.task}: {done:,.0f}/{self.total:,.0f} {self.unit}".rstrip() + (f" ({note})" if note else "")
        self.log(message, extra={RECORD_FIELD: {"task": self.task, "done": done, "total": self.total,
                                                "unit": self.unit}})
