"""What ended a command, as the user-facing error and exit code the CLI reports."""

from __future__ import annotations

import asyncio
import errno

from replicator.engine.errors import ConnectError, ExitCode, Interrupted, StorageError, unwrap


def test_local_io_errors_are_storage_errors_with_what_to_do() -> None:
    error = unwrap(OSError(errno.ENOSPC, "No space left on device", "/var/lib/x/manifests.state"))
    assert isinstance(error, StorageError) and error.exit_code == ExitCode.STORAGE
    assert "manifests.state" in str(error) and "free space" in str(error)


def test_connection_errors_and_cancellation_keep_their_own_codes() -> None:
    assert isinstance(unwrap(ConnectionResetError(errno.ECONNRESET, "reset")), ConnectError)
    assert isinstance(unwrap(ExceptionGroup("g", [BrokenPipeError()])), ConnectError)
    assert isinstance(unwrap(asyncio.CancelledError()), Interrupted)
