"""Errors a user can hit: the classes live in ``replicator.journal.errors`` (the bottom of
the import graph, so the journal and the transport can raise them too) and are re-exported
here for the engine and the command line. ``first_error`` picks the one that matters out of
a TaskGroup's exception group, ``as_user_error`` maps transport failures to what they mean
to a user, and ``unwrap`` turns whatever ended a command into the error it reports.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import ssl
from pathlib import Path

from replicator.journal.errors import (
    READ_ONLY_HINT,
    VERSION_HINT,
    AuthError,
    BusyError,
    ConfigError,
    ConnectError,
    ExitCode,
    Interrupted,
    PeerProtocolError,
    RefusedError,
    ReplicaInconsistent,
    ReplicatorError,
    SplitBrainError,
    StorageError,
    TargetStorageError,
    VersionMismatch,
    upgrade_hint,
)
from replicator.transport.errors import (
    CERT_PROBLEMS,
    ConnectionClosedError,
    ConnectionFailedError,
    RemoteProtocolError,
    VersionMismatchError,
)

__all__ = [
    "AuthError",
    "BusyError",
    "ConfigError",
    "ConnectError",
    "ExitCode",
    "Interrupted",
    "PeerProtocolError",
    "RefusedError",
    "ReplicaInconsistent",
    "ReplicatorError",
    "SplitBrainError",
    "StorageError",
    "TargetStorageError",
    "VersionMismatch",
    "as_user_error",
    "cannot_listen",
    "cannot_use_folder",
    "first_error",
    "tls_refusal",
    "unwrap",
    "version_refusal",
]

# TLS errors that say the stream was damaged or cut, not that a certificate was refused:
# they end a session like any lost connection (and a continuous sender reconnects)
# a handshake damaged on the path (a flipped bit: the peer cannot parse what we sent), not
# a certificate refused: a connection error, retried, never exit 10 (which a continuous
# sender does not retry)
_TLS_DAMAGE = (
    "BAD_RECORD_MAC",
    "DECRYPTION_FAILED",
    "UNEXPECTED_EOF",
    "BAD_LENGTH",
    "DECODE_ERROR",
    "ILLEGAL_PARAMETER",
    "BAD_EXTENSION",
)
_TLS_KEYS_HINT = (
    "both sides need keys from the same `replicator keygen --out DIR` folder (the same ca.crt), "
    "valid now; see docs/OPERATIONS.md, 'Security: TLS and keys'"
)


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The ssl.SSLError behind ``exc`` (itself, or its cause or context), if any."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def tls_refusal(exc: BaseException) -> AuthError | None:
    """The user error for a TLS handshake that failed on a certificate (or on one side not
    speaking TLS), when that is what ended a connection; None for anything else."""
    error = _ssl_error(exc)
    if error is None or isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return None
    reason = str(error.reason or "")
    if any(mark in reason for mark in _TLS_DAMAGE):
        return None
    if isinstance(error, ssl.SSLCertVerificationError):
        why = CERT_PROBLEMS.get(error.verify_code, "")
        return AuthError(
            f"the receiver's certificate was refused: {error.verify_message or reason}{why}",
            hint=_TLS_KEYS_HINT,
        )
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        why = "it wants a certificate and got none"
    elif reason == "TLSV1_ALERT_UNKNOWN_CA":
        why = "our certificate is signed by a CA it does not trust (keys from another folder?)"
    elif reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
        why = "our certificate has expired or is not valid yet"
    elif "ALERT" in reason:
        why = f"TLS alert {reason.lower()}"
    elif reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return AuthError(
            f"the receiver does not speak TLS ({reason.lower()})",
            hint="is it running with --insecure? Give both sides --tls-dir, or neither; "
            "or is that address another service's (an SSH or HTTP port, the receiver's "
            "--metrics-listen)? Check that it is the receiver's --listen",
        )
    else:
        return AuthError(f"TLS handshake with the receiver failed: {error}", hint=_TLS_KEYS_HINT)
    return AuthError(f"the receiver refused our certificate: {why}", hint=_TLS_KEYS_HINT)


def cannot_listen(
    address: str, exc: OSError, *, who: str, option: str, doing: str = "listen on"
) -> ConfigError:
    """The error for a server that could not bind ``address`` (``--listen`` and the like):
    what to do next depends on why (``who`` names the server, ``option`` the setting)."""
    if exc.errno == errno.EADDRINUSE:
        hint = f"is another {who} listening there? Stop it, or give {option} a free port"
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = f"give {option} an address of this host (or 0.0.0.0 for all of them)"
    elif exc.errno == errno.EACCES:
        hint = f"ports below 1024 need root: give {option} a port from 1024 up"
    else:
        hint = f"give {option} a free port and an address of this host"
    return ConfigError(f"cannot {doing} {address}: {exc.strerror or exc}", hint=hint)


def cannot_use_folder(
    path: object, exc: OSError, *, doing: str = "use", hint: str | None = None
) -> ConfigError:
    """The error for a folder ``makedirs_durable`` (or what follows it) could not give us.

    A file where the folder or one of its parents should be is named (``makedirs_durable``
    raises NotADirectoryError with the culprit as ``filename``): "not a directory" alone
    does not say which part of the path is wrong.
    """
    if isinstance(exc, NotADirectoryError) and exc.filename:
        why = f"{exc.filename} is a file, not a folder"
        hint = "give a folder (created when missing) or remove the file"
    elif exc.errno == errno.EROFS:
        why = "it is on a read-only file system"
        hint = f"{READ_ONLY_HINT}, or pick a folder on another disk"
    else:
        why = str(exc.strerror or exc)
    return ConfigError(f"cannot {doing} {path}: {why}", hint=hint)


def unwritable_folder(path: Path, label: str) -> ConfigError | None:
    """The error for an existing folder this process cannot write into; None when it can.

    A read-only file system is told apart from permissions: as root, only the first
    happens, and "fix its permissions" would send the operator the wrong way.
    """
    if os.access(path, os.W_OK | os.X_OK):
        return None
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return cannot_use_folder(
            label, OSError(errno.EROFS, os.strerror(errno.EROFS)), doing="write to"
        )
    return ConfigError(f"{label} is not writable", hint="fix its permissions or pick another")


def first_error(exc: BaseException) -> BaseException:
    """The error that matters inside (nested) exception groups from a TaskGroup.

    A user-facing ReplicatorError wins; otherwise the first error that is not a
    cancellation (the others were cancelled because of it). A send refused because the
    connection had already failed (``ConnectionFailedError``) counts as what failed it:
    the task that saw the failure may be listed after the one that tried to send.
    """
    if not isinstance(exc, BaseExceptionGroup):
        if isinstance(exc, ConnectionFailedError) and exc.cause is not None:
            return exc.cause
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
    refused = tls_refusal(exc)
    if refused is not None:
        return refused
    if isinstance(exc, ConnectionClosedError | ConnectionError | EOFError):
        return ConnectError(
            f"connection to the receiver was lost ({exc or type(exc).__name__}); "
            "run the same command again to resume: nothing acknowledged is lost"
        )
    if isinstance(exc, TimeoutError):
        return ConnectError("the receiver stopped answering (timeout); check it and run again")
    if isinstance(exc, VersionMismatchError):
        return _receiver_mismatch(exc.what, exc.our_version, exc.peer_version)
    if isinstance(exc, RemoteProtocolError):
        return PeerProtocolError(f"the receiver sent something malformed: {exc}")
    return exc


def _receiver_mismatch(what: str, ours: int, theirs: int) -> VersionMismatch:
    older, newer = (
        ("the receiver", "this sender") if theirs < ours else ("this sender", "the receiver")
    )
    return VersionMismatch(
        f"{what} version mismatch: this sender speaks {what} version {ours}, the receiver {theirs}",
        hint=upgrade_hint(older, newer),
    )


# How receivers word Refuse("version"): since 2026-12-07 "the sender speaks protocol
# version 5, this receiver 6[: ...]" (engine/receiver.py, frame versions alike); every
# release before "receiver speaks protocol 5: protocol version mismatch: peer speaks
# protocol version 6, we speak 5", in the receiver's words (the releases a sender of today
# meets when only it was upgraded)
_REFUSAL_NOW = re.compile(
    r"the sender speaks (protocol|frame format) version (\d+), this receiver (\d+)"
)
_REFUSAL_BEFORE = re.compile(r"receiver speaks protocol (\d+):")


def version_refusal(message: str) -> VersionMismatch:
    """The receiver's Refuse("version") (``message``: its text) in this sender's words:
    both versions and which side to upgrade, whichever release wrote it; the text as it
    came when it names no version."""
    from replicator.transport.version import PROTOCOL_VERSION

    now = _REFUSAL_NOW.search(message)
    if now is not None:
        return _receiver_mismatch(now[1], int(now[2]), int(now[3]))
    before = _REFUSAL_BEFORE.match(message)
    if before is not None and int(before[1]) != PROTOCOL_VERSION:
        return _receiver_mismatch("protocol", PROTOCOL_VERSION, int(before[1]))
    return VersionMismatch(
        f"protocol version mismatch: the receiver refused this sender's protocol version "
        f"{PROTOCOL_VERSION}: {message}",
        hint=VERSION_HINT,
    )


def unwrap(exc: BaseException) -> BaseException:
    """The user-facing error for whatever ended a command."""
    exc = first_error(exc)
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        return Interrupted("interrupted before the work completed; run again to resume")
    mapped = as_user_error(exc)
    if isinstance(mapped, OSError):  # local I/O: the connection errors were mapped above
        if mapped.errno == errno.EROFS:
            hint = f"{READ_ONLY_HINT}; then run the same command again"
        elif mapped.errno == errno.EDQUOT:
            hint = (
                "raise the disk quota of the user this runs as there (or free space), and "
                "run the same command again"
            )
        else:
            hint = "check the disk (free space, permissions) and run the same command again"
        return StorageError(f"local storage error: {mapped}", hint=hint)
    return mapped
