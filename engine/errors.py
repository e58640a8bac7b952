"""Errors a user can hit, each with a one-line message and a distinct exit code.

Commands catch ``ReplicatorError`` at the top, print ``str(error)`` on one line and
exit with ``error.exit_code``. The codes are part of the CLI contract (scripts rely on
them) and are listed in ``docs/OPERATIONS.md``.
"""

from __future__ import annotations

import asyncio
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    DIFFERENT = 1  # verify: replica differs from source
    USAGE = 2  # bad command line (typer/click uses 2 as well)
    CONFIG = 3  # bad input: missing volume, invalid job name, unwritable dir
    CONNECT = 4  # cannot connect / connection lost
    VERSION = 5  # protocol version mismatch
    REFUSED = 6  # receiver refused (name invalid, disk full, ...)
    PROTOCOL = 7  # peer sent something malformed
    JOURNAL = 8  # journal corrupt or full
    STORAGE = 9  # local disk full or I/O error
    INTERRUPTED = 130  # SIGINT/SIGTERM before the work completed


class ReplicatorError(Exception):
    """Base for errors that end a command with a message and an exit code."""

    exit_code: ExitCode = ExitCode.CONFIG

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


class ConfigError(ReplicatorError):
    exit_code = ExitCode.CONFIG


class ConnectError(ReplicatorError):
    exit_code = ExitCode.CONNECT


class VersionMismatch(ReplicatorError):
    exit_code = ExitCode.VERSION


class RefusedError(ReplicatorError):
    exit_code = ExitCode.REFUSED


class BusyError(RefusedError):
    """The receiver has another session for the job: often the previous run of this very
    sender, killed a moment ago, whose session the receiver has not torn down yet."""


class PeerProtocolError(ReplicatorError):
    exit_code = ExitCode.PROTOCOL


class StorageError(ReplicatorError):
    exit_code = ExitCode.STORAGE


class Interrupted(ReplicatorError):
    exit_code = ExitCode.INTERRUPTED


def first_error(exc: BaseException) -> BaseException:
    """The error that matters inside (nested) exception groups from a TaskGroup.

    A user-facing ReplicatorError wins; otherwise the first error that is not a
    cancellation (the others were cancelled because of it).
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = [first_error(inner) for inner in exc.exceptions]
    for leaf in leaves:
        if isinstance(leaf, ReplicatorError):
            return leaf
    for leaf in leaves:
        if not isinstance(leaf, asyncio.CancelledError):
            return leaf
    return leaves[0]
