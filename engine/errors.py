"""Errors a user can hit: the classes live in ``replicator.journal.errors`` (the bottom of
the import graph, so the journal and the transport can raise them too) and are re-exported
here for the engine and the command line. ``first_error`` picks the one that matters out of
a TaskGroup's exception group, ``as_user_error`` maps transport failures to what they mean
to a user, and ``unwrap`` turns whatever ended a command into the error it reports.
"""

from __future__ import annotations

import asyncio

from replicator.journal.errors import (
    BusyError,
    ConfigError,
    ConnectError,
    ExitCode,
    Interrupted,
    PeerProtocolError,
    RefusedError,
    ReplicatorError,
    StorageError,
    VersionMismatch,
)
from replicator.transport import (
    ConnectionClosedError,
    RemoteProtocolError,
    VersionMismatchError,
)

__all__ = [
    "BusyError",
    "ConfigError",
    "ConnectError",
    "ExitCode",
    "Interrupted",
    "PeerProtocolError",
    "RefusedError",
    "ReplicatorError",
    "StorageError",
    "VersionMismatch",
    "as_user_error",
    "first_error",
    "unwrap",
]


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


def as_user_error(exc: BaseException) -> BaseException:
    """Map transport-level failures to the user-facing error (and exit code) they mean."""
    if isinstance(exc, ReplicatorError):
        return exc
    if isinstance(exc, ConnectionClosedError | ConnectionError | EOFError):
        return ConnectError(
            f"connection to the receiver was lost ({exc or type(exc).__name__}); "
            "run the same command again to resume: nothing acknowledged is lost"
        )
    if isinstance(exc, TimeoutError):
        return ConnectError("the receiver stopped answering (timeout); check it and run again")
    if isinstance(exc, VersionMismatchError):
        return VersionMismatch(f"protocol version mismatch with the receiver: {exc}")
    if isinstance(exc, RemoteProtocolError):
        return PeerProtocolError(f"the receiver sent something malformed: {exc}")
    return exc


def unwrap(exc: BaseException) -> BaseException:
    """The user-facing error for whatever ended a command."""
    exc = first_error(exc)
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        return Interrupted("interrupted before the work completed; run again to resume")
    mapped = as_user_error(exc)
    if isinstance(mapped, OSError):  # local I/O: the connection errors were mapped above
        return StorageError(
            f"local storage error: {mapped}",
            hint="check the disk (free space, permissions) and run the same command again",
        )
    return mapped
