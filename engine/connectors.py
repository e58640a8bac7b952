"""Where a sender's byte streams come from: injected, so the engine never dials by itself.

A ``Connector`` opens a new ``FramedConnection`` each time the engine needs one (the first
connection, every reconnection, ``verify``). The command line decides which one a job uses;
tests and embedders pass their own. What must outlive a single connection (a rate limiter
with its bucket, TLS settings and certificates) belongs to the connector, so it survives
reconnects:

* ``TcpConnector``: TCP to HOST:PORT (the default), with an optional shaper, and TLS
  around it when given ``tls`` (a ``TlsIdentity``, asked for its context at every connect
  so replaced certificates are used from the next connection on, or a fixed
  ``ssl.SSLContext``); with a ``TlsIdentity`` the receiver's certificate must carry the
  identity's ``peer`` name (``receiver`` by default), checked before anything is sent;
* ``UnixConnector``: a unix socket (a receiver served with ``serve_unix``);
* ``MemoryConnector``: a socket pair whose far end a handler in the same process serves (an
  in-process ``Receiver``): a whole sender/receiver pair in one test process, no ports.

Connection failures raise ``ConnectError`` with a one-line reason (exit code 4), which the
continuous modes retry with their backoff; a TLS handshake that fails on a certificate
raises ``AuthError`` (exit code 10), which they do not retry; so does a receiver whose
certificate has another name than the one expected.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol

from replicator.engine.errors import AuthError, ConnectError, tls_refusal
from replicator.engine.tls import TlsIdentity, check_peer
from replicator.transport import (
    DialError,
    FramedConnection,
    Shaper,
    connect,
    connect_unix,
    connection_pair,
)
from replicator.transport.connection import CANNOT_RESOLVE, NO_TLS_ANSWER

DEFAULT_CONNECT_TIMEOUT = 10.0


class Connector(Protocol):
    """Opens connections to one receiver."""

    @property
    def target(self) -> str:
        """Where it connects, for messages and the status ("host:port", "unix:PATH")."""
        ...

    async def connect(self) -> FramedConnection: ...

    async def aclose(self) -> None:
        """Release what the connector owns (tasks it serves, not connections it made)."""
        ...


class TlsSource(Protocol):
    """Gives the SSL context for the next connection (e.g. ``engine.tls.TlsIdentity``)."""

    def context(self) -> ssl.SSLContext: ...


def _context(tls: TlsSource | ssl.SSLContext | None) -> ssl.SSLContext | None:
    return tls if tls is None or isinstance(tls, ssl.SSLContext) else tls.context()


def _checked(conn: FramedConnection, tls: TlsSource | ssl.SSLContext | None, target: str) -> None:
    """Abort ``conn`` and raise when its receiver's certificate is not the expected one."""
    if not isinstance(tls, TlsIdentity):
        return
    try:
        check_peer(conn, tls.peer, role="receiver", where=target, option="--tls-peer")
    except AuthError:
        conn.abort()
        raise


class TcpConnector:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        shaper: Shaper | None = None,
        tls: TlsSource | ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.shaper = shaper
        self.tls = tls

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def connect(self) -> FramedConnection:
        try:
            conn = await connect(
                self.host,
                self.port,
                timeout=self.timeout,
                shaper=self.shaper,
                ssl=_context(self.tls),
            )
        except OSError as exc:
            raise _connect_error(self.target, exc) from exc
        _checked(conn, self.tls, self.target)
        return conn

    async def aclose(self) -> None:
        pass


class UnixConnector:
    def __init__(
        self,
        path: str,
        *,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        shaper: Shaper | None = None,
        tls: TlsSource | ssl.SSLContext | None = None,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.shaper = shaper
        self.tls = tls

    @property
    def target(self) -> str:
        return f"unix:{self.path}"

    async def connect(self) -> FramedConnection:
        try:
            conn = await connect_unix(
                self.path, timeout=self.timeout, shaper=self.shaper, ssl=_context(self.tls)
            )
        except OSError as exc:
            raise _connect_error(self.target, exc) from exc
        _checked(conn, self.tls, self.target)
        return conn

    async def aclose(self) -> None:
        pass


Handler = Callable[[FramedConnection], Awaitable[None]]


class MemoryConnector:
    """Each connect() makes a socket pair and hands the far end to ``handler`` (e.g. an
    in-process ``Receiver.handle``), which runs as a task this connector owns.

    ``refuse`` makes the next connects fail as if nobody listened (a receiver that is
    down), for tests of the reconnect paths.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.refuse = False
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._ends: list[FramedConnection] = []

    @property
    def target(self) -> str:
        return "memory"

    async def connect(self) -> FramedConnection:
        if self.refuse:
            raise ConnectError(
                "cannot connect to receiver memory: connection refused",
                hint="is `replicator receive` running there and reachable?",
            )
        near, far = await connection_pair()
        task = asyncio.get_running_loop().create_task(self._serve(far), name="memory-receiver")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._ends.append(near)
        self.connections += 1
        return near

    async def _serve(self, conn: FramedConnection) -> None:
        try:
            await self.handler(conn)
        finally:
            await conn.aclose()

    def cut(self) -> None:
        """Break every connection made so far (a lost network), at once."""
        for end in self._ends:
            end.abort()
        self._ends.clear()

    async def aclose(self) -> None:
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


def _connect_error(target: str, exc: OSError) -> ConnectError | AuthError:
    refused = tls_refusal(exc)
    if refused is not None:
        return refused
    if isinstance(exc, DialError) and exc.reason.startswith(CANNOT_RESOLVE):
        hint = "check the host name in the address (DNS, /etc/hosts), or give its IP address"
    elif isinstance(exc, DialError) and exc.reason.startswith(NO_TLS_ANSWER):
        hint = (
            "check that this is the receiver's --listen address, and that the receiver "
            "there is not stopped or stuck (`replicator status --dir DIR` on its host)"
        )
    else:
        hint = "is `replicator receive` running there and reachable?"
    return ConnectError(f"cannot connect to receiver {target}: {exc.strerror or exc}", hint=hint)
