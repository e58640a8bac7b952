"""Errors raised by the journal.

They derive from ``ReplicatorError`` so a command that lets one escape prints the message
on one line and exits with ``ExitCode.JOURNAL`` (8).
"""

from __future__ import annotations

import os

from replicator.engine.errors import ExitCode, ReplicatorError


class JournalError(ReplicatorError):
    """The journal cannot do what was asked (closed, bad LSN, failed I/O, trimmed range)."""

    exit_code = ExitCode.JOURNAL


class JournalIOError(JournalError):
    """A write, fsync, roll or trim of the journal failed (disk full, I/O error): a local
    storage problem (exit code 9), not damage; reopening recovers what was synced."""

    exit_code = ExitCode.STORAGE


class JournalFull(JournalError):
    """Appending would take the journal past its ``max_bytes`` cap.

    Nothing was written; the journal stays usable. Trimming acknowledged records frees
    space, after which the same append succeeds.
    """

    def __init__(self, used: int, cap: int, needed: int) -> None:
        self.used = used
        self.cap = cap
        self.needed = needed
        super().__init__(
            f"journal full: {used} of {cap} bytes used, append needs {needed} more",
            hint="records are freed once the receiver acknowledges them (trim)",
        )


class JournalCorrupt(JournalError):
    """Bytes on disk that must have been written intact are not; never skipped over."""

    def __init__(self, path: str | os.PathLike[str], offset: int, reason: str) -> None:
        self.path = os.fspath(path)
        self.offset = offset
        self.reason = reason
        directory = os.path.dirname(self.path) or "."
        super().__init__(
            f"journal corrupt: {self.path} at offset {offset}: {reason}",
            hint=(
                f"run `replicator journal inspect {directory}` for details; records are never "
                "skipped, so restore the journal directory from a copy, or move it aside and "
                "resynchronise the replica"
            ),
        )
