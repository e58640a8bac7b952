"""The transport's error classes and the words for certificate problems, apart from the
wire code: the engine's error handling and the commands that never open a connection
(``status``, ``failover``) import these without loading frames, protocol and sockets.
"""

from __future__ import annotations

from typing import Any


class ProtocolError(Exception):
    """Base of the two protocol error classes."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of turn."""


class ConnectionFailedError(LocalProtocolError):
    """A send on a connection that has already failed (state ERROR).

    Not a bug of the sending task: another task's receive or send failed the connection
    first (often the peer's malformed frame), and ``cause`` (a copy of that error) is the
    error that matters; ``engine.errors.first_error`` reports it instead of this one.
    """

    def __init__(self, message: str, cause: ProtocolError | None = None) -> None:
        super().__init__(message)
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.cause))


class VersionMismatchError(RemoteProtocolError):
    """The peer speaks another frame format or protocol version.

    The receiver answers with ``Refuse(code="version")``; the sender reports
    "protocol version mismatch". ``what`` is "frame format" or "protocol".
    """

    def __init__(self, peer_version: int, our_version: int, what: str = "frame format") -> None:
        self.peer_version = peer_version
        self.our_version = our_version
        self.what = what
        super().__init__(
            f"protocol version mismatch: peer speaks {what} version {peer_version}, "
            f"we speak {our_version}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # copy and pickle rebuild an exception from args; ours are not the message
        return (type(self), (self.peer_version, self.our_version, self.what))


class ConnectionClosedError(ConnectionError):
    """The connection ended: EOF from the peer, reset, or closed locally.

    ``clean`` is True when the peer ended the session properly (Goodbye/Error/Refuse).
    """

    def __init__(self, message: str, *, clean: bool = False) -> None:
        super().__init__(message)
        self.clean = clean


class DialError(ConnectionError):
    """A connection could not be established; ``str()`` is a one-line explanation.

    ``errno``/``strerror`` are set like any OSError's (``strerror`` is the short reason,
    e.g. "connection refused"); ``target`` is "host:port" or the socket path.
    """

    def __init__(self, target: str, reason: str, err: int | None = None) -> None:
        super().__init__(err, reason)
        self.target = target
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot connect to {self.target}: {self.reason}"


# OpenSSL's verify codes (X509_V_ERR_*) that a misconfiguration causes, in plain words
CERT_PROBLEMS = {
    9: " (not valid yet: check the clocks)",
    10: " (expired: make a new one with `replicator keygen --name NAME --force`)",
    18: " (not signed by our CA: keys from another `replicator keygen` folder?)",
    19: " (not signed by our CA: keys from another `replicator keygen` folder?)",
    20: " (not signed by our CA: keys from another `replicator keygen` folder?)",
    21: " (not signed by our CA: keys from another `replicator keygen` folder?)",
}
