"""A time limit for a strategy's rule.

A rule is a DuckDB query that may come from someone else's file, and one such as
`(SELECT count(*) FROM range(1e13)) > 0` would run for days, holding the subset's lock. A timer thread
interrupts the rule's DuckDB connections once its limit has passed (DuckDB's own `interrupt()`, which stops a
query between chunks), and the rule fails with one line: the strategy, how long it ran, its limit, and the
setting to raise.

The default grows with the pool, since a rule's cost does: 60 s per million rows, at least 600 s. The slowest
rule measured, `basic` computing its caption features from nothing, took 59 s at 12.8M rows (4.6 s per million,
docs/measurements.md), so the default leaves it about 13x; a rule over computed features takes 0.5-5 s there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from datacomp_assets.core import settings

SECONDS_PER_MILLION_ROWS = 60.0
MINIMUM_SECONDS = 600.0


class RuleTimeLimitExceeded(ValueError):
    """A rule ran past its time limit and was stopped."""


def rule_time_limit(pool_rows: int) -> tuple[float | None, str]:
    """(seconds a rule over `pool_rows` rows may run, or None for no limit; where that limit comes from)."""
    configured = settings.rule_time_limit_s()
    variable = settings.DATACOMP_RULE_TIME_LIMIT_S.name
    if configured is not None:
        return (configured or None), f"{variable}={configured:g}"
    seconds = max(MINIMUM_SECONDS, SECONDS_PER_MILLION_ROWS * pool_rows / 1e6)
    return seconds, (f"the default for {pool_rows:,} pool rows: {SECONDS_PER_MILLION_ROWS:g} s per million, "
                     f"at least {MINIMUM_SECONDS:g} s")


class RuleClock:
    """Interrupts the DuckDB connections it watches once `limit_s` seconds have passed since it started, and
    keeps interrupting until it stops (a query started after the first interrupt is stopped too)."""

    def __init__(self, limit_s: float | None, origin: str = ""):
        self.limit_s, self.origin = limit_s, origin
        self._connections: set = set()
        self._guard = threading.Lock()  # a connection is never interrupted while it is being closed
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None
        self.expired = False

    def __enter__(self) -> RuleClock:
        self._started = time.monotonic()
        if self.limit_s is not None:
            self._thread = threading.Thread(target=self._interrupt_when_due, name="rule time limit", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @contextmanager
    def watch(self, con) -> Iterator[None]:
        """Interrupt `con` when the time is up, for the duration of a `with` block (close it after the block)."""
        with self._guard:
            self._connections.add(con)
        try:
            yield
        finally:
            with self._guard:
                self._connections.discard(con)

    def _interrupt_when_due(self) -> None:
        if self._stop.wait(self.limit_s):
            return
        self.expired = True
        while True:
            with self._guard:
                for con in self._connections:
                    con.interrupt()
            if self._stop.wait(0.1):
                return

    def overran(self, what: str) -> RuleTimeLimitExceeded:
        """The error for `what` (e.g. "strategy 'x'") once the clock has expired."""
        ran = time.monotonic() - self._started
        return RuleTimeLimitExceeded(
            f"{what} ran {ran:.1f} s and was stopped at its time limit of {self.limit_s:g} s ({self.origin}). "
            f"If the rule is meant to take longer, set "
            f"{settings.DATACOMP_RULE_TIME_LIMIT_S.name} to more seconds (0: no limit); otherwise make it cheaper")
