"""What ended a command, as the user-facing error and exit code the CLI reports."""

from __future__ import annotations

import asyncio
import copy
import errno
import os
from pathlib import Path

import pytest

from replicator.engine.errors import (
    ConnectError,
    ExitCode,
    Interrupted,
    PeerProtocolError,
    StorageError,
    first_error,
    unwrap,
)
from replicator.engine.receiver_session import storage_reason
from replicator.journal.journal import _io_hint
from replicator.transport.errors import ConnectionFailedError, RemoteProtocolError


def test_local_io_errors_are_storage_errors_with_what_to_do() -> None:
    error = unwrap(OSError(errno.ENOSPC, "No space left on device", "/var/lib/x/manifests.state"))
    assert isinstance(error, StorageError) and error.exit_code == ExitCode.STORAGE
    assert "manifests.state" in str(error) and "free space" in str(error)


def test_a_read_only_file_system_is_named_on_each_side(tmp_path: Path) -> None:
    """A disk remounted read-only after errors: "check permissions" is the wrong way."""
    erofs = OSError(errno.EROFS, os.strerror(errno.EROFS), "/var/lib/x/manifests.state")
    error = unwrap(erofs)
    assert isinstance(error, StorageError) and "remount it read-write" in str(error)
    assert "permissions" not in str(error)
    assert "remount it read-write" in storage_reason(erofs)  # told to the sender
    assert "remount it read-write" in _io_hint(erofs, tmp_path)  # a journal's write


def test_a_disk_quota_is_named_on_each_side(tmp_path: Path) -> None:
    """EDQUOT is no full disk: statvfs shows room, and the way out is the quota."""
    edquot = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/var/lib/x/manifests.state")
    error = unwrap(edquot)
    assert isinstance(error, StorageError) and "raise the disk quota" in str(error)
    told = storage_reason(edquot, (tmp_path / "replicas" / "vm1", tmp_path / "state" / "vm1"))
    assert "quota exceeded" in told and str(tmp_path / "replicas" / "vm1") in told


def test_connection_errors_and_cancellation_keep_their_own_codes() -> None:
    assert isinstance(unwrap(ConnectionResetError(errno.ECONNRESET, "reset")), ConnectError)
    assert isinstance(unwrap(ExceptionGroup("g", [BrokenPipeError()])), ConnectError)
    assert isinstance(unwrap(asyncio.CancelledError()), Interrupted)


def test_a_send_refused_after_a_failure_reports_the_failure() -> None:
    """The receiver's syncer sent an Ack after its reader had failed the connection on a
    corrupted frame; the session was reported as an internal error and the sender, told
    so, gave up (exit 6) instead of reconnecting. Whichever task the group lists first,
    the error that matters is the corrupted frame."""
    bad_frame = RemoteProtocolError(
        "frame payload decompressed to 1439404 bytes, announced 1442056"
    )
    refused = ConnectionFailedError("a receiver cannot send Ack", copy.copy(bad_frame))
    for tasks in ([refused, bad_frame], [bad_frame, refused], [refused]):
        error = first_error(ExceptionGroup("session", list(tasks)))
        assert type(error) is RemoteProtocolError and str(error) == str(bad_frame)
    nested = BaseExceptionGroup(
        "outer", [ExceptionGroup("inner", [refused]), asyncio.CancelledError()]
    )
    assert type(first_error(nested)) is RemoteProtocolError
    assert isinstance(unwrap(refused), PeerProtocolError)  # the sender's side: "malformed"
    assert first_error(ConnectionFailedError("no cause known")).__class__ is ConnectionFailedError


def test_cannot_listen_says_what_to_do_for_each_reason() -> None:
    """One error for every server that cannot bind (receiver, witness, metrics, the
    embedding API): its hint follows the reason the kernel gave."""
    from replicator.engine.errors import ConfigError, cannot_listen

    def hint(code: int) -> str:
        error = cannot_listen("192.0.2.1:80", OSError(code, os.strerror(code)), who="receiver",
                              option="--listen")  # fmt: skip
        assert isinstance(error, ConfigError) and str(error).startswith("cannot listen on")
        assert error.hint is not None
        return error.hint

    assert "another receiver" in hint(errno.EADDRINUSE)
    assert "address of this host" in hint(errno.EADDRNOTAVAIL)
    assert "need root" in hint(errno.EACCES)
    assert "--listen" in hint(errno.EINVAL)


def test_a_folder_that_cannot_be_made_names_the_file_in_its_way(tmp_path: Path) -> None:
    """The receiver's folders, a state folder and a sender's claim: each says which part
    of the path is a file, from the one place that words it."""
    from replicator.engine.control import SenderClaim
    from replicator.engine.errors import ConfigError, cannot_use_folder
    from replicator.engine.statedir import StateDirLock

    blocker = tmp_path / "afile"
    blocker.write_bytes(b"")
    below = blocker / "state"
    for enter in (
        lambda: StateDirLock(below, "sender").__enter__(),
        lambda: SenderClaim(below, {}).__enter__(),
    ):
        with pytest.raises(ConfigError) as err:
            enter()
        assert f"{blocker} is a file, not a folder" in str(err.value)
        assert err.value.hint is not None and "remove the file" in err.value.hint
    other = cannot_use_folder("x", PermissionError(errno.EACCES, "Permission denied"), hint="h")
    assert str(other).startswith("cannot use x: Permission denied") and other.hint == "h"
