"""Errors and exit codes: the bottom of the import graph.

``journal``, ``transport`` and ``engine`` all import this module and it imports none of
them, so every layer can raise an error that ends a command with a one-line message and a
distinct exit code. Commands catch ``ReplicatorError`` at the top, print ``str(error)`` and
exit with ``error.exit_code``; the codes are part of the CLI contract (scripts rely on
them) and are listed in ``docs/OPERATIONS.md``. The journal's own errors follow the
general ones.
"""

from __future__ import annotations

import os
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
    AUTH = 10  # TLS: a certificate was refused (missing, expired, another CA) or TLS on one side
    SPLIT_BRAIN = 11  # the replica was promoted (failover) or has another history
    HANDED_OVER = 12  # send: a planned failover handed the job to the target; do not restart
    BUG = 70  # sysexits' EX_SOFTWARE: an error none of ours names, i.e. a bug in replicator
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


class TargetStorageError(RefusedError):
    """The receiver could not write or sync the job (disk full, I/O error, read-only file
    system). Fixed on the target, not here: a continuous sender keeps capturing and
    retries, as it does while the receiver is away; ``send --once`` exits with it."""


# what to do about a file system found read-only (EROFS), said wherever it is met: as
# root it is never permissions, but a disk the kernel remounted after errors
READ_ONLY_HINT = (
    "a disk that had errors is often remounted read-only: check it (dmesg), repair it and "
    "remount it read-write"
)


# both sides of a protocol version mismatch say it, when neither's version is known
VERSION_HINT = (
    "run the same replicator release on both sides: compare `replicator --version` on each "
    "(it names the protocol) and upgrade the older one"
)


def upgrade_hint(older: str, newer: str) -> str:
    """What to do about a version mismatch whose sides are known: the side that speaks the
    lower version (``older``: "the receiver", "this sender", ...) runs the older release
    (docs/OPERATIONS.md, "Upgrading")."""
    return (
        f"{older} runs an older release: upgrade replicator on its host to the release "
        f"{newer} runs; both sides must run the same one"
    )


class PeerProtocolError(ReplicatorError):
    exit_code = ExitCode.PROTOCOL


class AuthError(ReplicatorError):
    """The TLS handshake failed on a certificate: ours or the peer's was refused (none,
    expired, signed by another CA), or only one side speaks TLS. Retrying cannot help."""

    exit_code = ExitCode.AUTH


class SplitBrainError(ReplicatorError):
    """The receiver's replica was promoted by failover, or follows another history
    (generation): writing it would overwrite data nobody chose to lose."""

    exit_code = ExitCode.SPLIT_BRAIN


class ReplicaInconsistent(ReplicatorError):
    """Failover refused: the replica is not at a consistency point."""

    exit_code = ExitCode.REFUSED


class StorageError(ReplicatorError):
    exit_code = ExitCode.STORAGE


class Interrupted(ReplicatorError):
    exit_code = ExitCode.INTERRUPTED


# -- the journal's errors --------------------------------------------------------------


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

    def __init__(
        self, path: str | os.PathLike[str], offset: int, reason: str, *, cut_at_open: bool = False
    ) -> None:
        """``cut_at_open``: found while reading a journal opened with ``on_damage="cut"``
        (every sender's, every receiver's), which its next open cuts at the damage."""
        self.path = os.fspath(path)
        self.offset = offset
        self.reason = reason
        directory = os.path.dirname(self.path) or "."
        inspect = f"`replicator journal inspect {directory}` shows the damage"
        super().__init__(
            f"journal corrupt: {self.path} at offset {offset}: {reason}",
            hint=(
                f"start it again: the journal is cut at the damage when it is opened, and what "
                f"the lost records changed is found again (a sender compares its volumes with "
                f"the replica, a receiver asks its sender); {inspect}"
                if cut_at_open
                else f"{inspect}; records are never skipped, so restore the journal directory "
                "from a copy, or move it aside and resynchronise the replica"
            ),
        )


class JournalNewer(JournalError):
    """A journal holding a segment or record of a format newer than this build reads: a
    newer replicator wrote it and this one was started on it again (a downgrade). Its
    bytes cannot be checked here, so they are neither taken for a torn tail and cut nor
    read: the open refuses, whichever side's journal it is."""

    def __init__(self, path: str | os.PathLike[str], offset: int, reason: str) -> None:
        self.path = os.fspath(path)
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"journal written by a newer replicator: {self.path} at offset {offset}: {reason}",
            hint=(
                "run the release that wrote it again (going back to an older release is not "
                "supported: docs/OPERATIONS.md, Upgrading); to go on with this one instead, "
                "move the journal folder aside and resynchronise (send --resync)"
            ),
        )
