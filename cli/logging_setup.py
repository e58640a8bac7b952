"""structlog configured once, from the root callback: console on a TTY, JSON otherwise.

Routine events (a sender started, a cycle's summary, a connection made) are logged at
info, which is the default level: a new admin sees what a continuous sender does without
asking. ``-q`` keeps warnings and errors only (and no progress bars); ``-v`` adds debug.
"""

from __future__ import annotations

import logging
import sys
from enum import StrEnum


class LogFormat(StrEnum):
    auto = "auto"
    json = "json"
    console = "console"


class _StderrLogger:
    """Writes each line to the *current* ``sys.stderr``.

    structlog's PrintLogger keeps the stream it was given; when a test harness swaps and
    closes stderr, later log calls would fail. Looking it up per line avoids that.
    """

    def msg(self, message: str) -> None:
        stream = sys.stderr
        if stream is not None and not stream.closed:
            print(message, file=stream, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _stderr_logger(*_args: object) -> _StderrLogger:
    return _StderrLogger()


class _Settings:
    """What the root callback chose, for commands that render more than log lines."""

    quiet = False
    json = False


def quiet() -> bool:
    """``-q``: no progress bars or progress lines, warnings and errors only."""
    return _Settings.quiet


def json_logs() -> bool:
    """True when log lines are JSON (chosen, or stderr is not a terminal)."""
    return _Settings.json


def configure_logging(
    fmt: LogFormat = LogFormat.auto, verbosity: int = 0, *, quiet: bool = False
) -> None:
    """Configure structlog for the process; logs go to stderr so stdout stays for results."""
    import structlog  # here: `replicator --version` and -h never log (~0.1 s of imports)

    # -v wins over -q (REPLICATOR_QUIET in a service's environment, -v to look closer)
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if quiet else logging.INFO
    use_console = fmt is LogFormat.console or (fmt is LogFormat.auto and sys.stderr.isatty())
    _Settings.quiet, _Settings.json = quiet, not use_console
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
