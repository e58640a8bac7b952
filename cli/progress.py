"""Progress of long work (a sync's scan, verify): a bar on a terminal, log lines elsewhere.

On a terminal (and without ``-q``) a rich bar shows bytes done of the total, the rate and
the time left; it appears when work starts and goes away when it ends, so a continuous
sender shows one per cycle. When stderr is not a terminal (a service, a pipe) a
``progress`` log line is written every ``REPLICATOR_PROGRESS_PERIOD`` seconds (10 by
default; documented in docs/OPERATIONS.md) while work lasts longer than that. ``-q``
turns both off.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from typing import TYPE_CHECKING

import structlog

from replicator.cli.logging_setup import quiet
from replicator.engine.units import human_size

if TYPE_CHECKING:  # rich is loaded only to draw a bar (a terminal): ~40 ms of every start
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

log = structlog.get_logger()

PERIOD_ENV = "REPLICATOR_PROGRESS_PERIOD"
DEFAULT_PERIOD = 10.0


def log_period() -> float:
    """Seconds between progress lines when stderr is not a terminal."""
    text = os.environ.get(PERIOD_ENV)
    if text is None:
        return DEFAULT_PERIOD
    try:
        period = float(text)
    except ValueError:
        period = 0.0
    if not period > 0:  # a typo must not stop replication: say so, use the default
        log.warning("progress.bad_period", variable=PERIOD_ENV, value=text, used=DEFAULT_PERIOD)
        return DEFAULT_PERIOD
    return period


class ProgressReport:
    """A ``(done, total)`` callback (``engine.scan.Progress``) showing one piece of work
    at a time; ``done >= total`` ends the piece (the bar goes away), and the next call
    with less done starts another."""

    def __init__(self, what: str, *, bar: bool, period: float) -> None:
        self.what = what
        self._use_bar = bar
        self._period = period
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        self._started = 0.0
        self._last_line = 0.0
        if bar:
            atexit.register(self.close)  # work that failed half way: give the cursor back

    def __call__(self, done: int, total: int) -> None:
        finished = total > 0 and done >= total
        now = time.monotonic()
        if self._started == 0.0:
            if finished:
                return
            self._started = self._last_line = now
            self._open()
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, total=total or None)
        elif now - self._last_line >= self._period and not finished:
            self._last_line = now
            self._line(done, total, now)
        if finished:
            self.close()

    def _open(self) -> None:
        if not self._use_bar:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        columns = (
            TextColumn(self.what),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        self._bar = RichProgress(*columns, console=Console(stderr=True), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.what, total=None)

    def _line(self, done: int, total: int, now: float) -> None:
        rate = done / max(now - self._started, 1e-6)
        left = (total - done) / rate if rate > 0 and total > done else None
        log.info(
            "progress",
            what=self.what,
            done=done,
            total=total,
            percent=round(100 * done / total, 1) if total else None,
            rate=f"{human_size(rate)}/s",
            eta_s=round(left) if left is not None else None,
            text=f"{self.what}: {human_size(done)} of {human_size(total)}, {human_size(rate)}/s"
            + (f", about {round(left)} s left" if left is not None else ""),
        )

    def close(self) -> None:
        """End the piece of work (the bar goes away); safe to call more than once."""
        if self._bar is not None:
            self._bar.stop()
        self._bar, self._task, self._started = None, None, 0.0


def progress_report(what: str, *, enabled: bool = True) -> ProgressReport | None:
    """The report for ``what`` (e.g. "initial sync"), or None with ``-q`` or not ``enabled``."""
    if not enabled or quiet():
        return None
    return ProgressReport(what, bar=sys.stderr.isatty(), period=log_period())
