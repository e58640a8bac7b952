"""A sender that completes a real handshake, then says whatever a test tells it to.

It speaks the wire protocol through the project's own ``FramedConnection`` (so every frame
is well formed), over TCP (``--insecure`` receivers) or mutual TLS (a keygen folder), and
lets a test send records with hostile *meaning*: names reaching for other jobs, absurd
offsets, LSNs out of turn, one job name per connection. Used by
tests/cli/test_hostile_sender.py against a real ``replicator receive`` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from replicator.engine.tls import SENDER, TlsIdentity
from replicator.journal import Record
from replicator.journal.records import encode_record
from replicator.transport import (
    PROTOCOL_VERSION,
    ConnectionClosedError,
    Error,
    FramedConnection,
    Hello,
    Ping,
    Pong,
    Records,
    Refuse,
    Welcome,
)
from replicator.transport.connection import connect
from tests.tools import answer_to_hello


@dataclass
class Outcome:
    """How a hostile session ended: the receiver's Refuse or Error (code, message), or
    None when it ended some other way (``closed``: the connection was gone)."""

    welcome: Welcome | None
    code: str | None = None
    message: str = ""
    closed: bool = False


def tls_context(keys: Path) -> ssl.SSLContext:
    """A sender's TLS context from a ``replicator keygen`` folder (a valid certificate)."""
    return TlsIdentity(keys, SENDER, server=False).load()


async def hello(
    port: int,
    job: str,
    *,
    tls: ssl.SSLContext | None = None,
    capabilities: tuple[str, ...] = (),
    generation: int = 0,
) -> tuple[FramedConnection, Welcome | Refuse | Error]:
    """Connect to the receiver on 127.0.0.1:``port`` and say Hello for ``job``; the
    connection and the receiver's answer (past the Pings it sends while it opens the job)."""
    conn = await connect("127.0.0.1", port, ssl=tls, timeout=10)
    await conn.send(
        Hello(PROTOCOL_VERSION, job, (), capabilities, generation, f"hostile-{uuid.uuid4()}")
    )
    msg = await answer_to_hello(conn)
    assert isinstance(msg, Welcome | Refuse | Error), msg
    return conn, msg


def frame(records: Sequence[Record], first_lsn: int, ts_ns: int = 1) -> Records:
    """``records`` numbered from ``first_lsn`` as one Records frame."""
    numbered = [r.with_lsn(first_lsn + i, ts_ns) for i, r in enumerate(records)]
    payload = b"".join(encode_record(r) for r in numbered)
    return Records(first_lsn, numbered[-1].lsn, len(numbered), ts_ns, payload)


async def until_end(conn: FramedConnection, timeout: float = 30) -> Outcome:
    """Read until the receiver ends the session: its Error (or Refuse), or the close."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                msg = await conn.recv()
                if isinstance(msg, Ping):
                    await conn.send(Pong(msg.nonce, msg.ts_ns))
                elif isinstance(msg, Error | Refuse):
                    return Outcome(None, msg.code, msg.message)
    except TimeoutError:  # an OSError too: the receiver took everything and went on
        return Outcome(None)
    except (ConnectionClosedError, ConnectionError, OSError):
        return Outcome(None, closed=True)
    finally:
        with contextlib.suppress(Exception):
            await conn.aclose()


async def send_records(
    port: int,
    job: str,
    batches: Sequence[Sequence[Record]],
    *,
    tls: ssl.SSLContext | None = None,
    first_lsn: int | None = None,
    timeout: float = 30,
    unchecked: bool = False,
) -> Outcome:
    """One session of ``job``: each of ``batches`` as a Records frame (numbered on from
    the Welcome's received LSN, or from ``first_lsn``), then wait for the receiver to end
    the session (a receiver that takes everything is left by the timeout: ``code`` None).
    ``unchecked``: send even what our own protocol checks refuse to send (LSNs out of
    order, frames past the credit granted), to see the receiver refuse it."""
    conn, answer = await hello(port, job, tls=tls)
    if unchecked:
        conn.protocol._check_send = lambda msg: None  # type: ignore[method-assign]
    if isinstance(answer, Refuse | Error):
        with contextlib.suppress(Exception):
            await conn.aclose()
        return Outcome(None, answer.code, answer.message)
    lsn = answer.received_lsn + 1 if first_lsn is None else first_lsn
    try:
        for batch in batches:
            await conn.send(frame(batch, lsn))
            lsn += len(batch)
    except (ConnectionClosedError, ConnectionError, OSError):
        pass
    outcome = await until_end(conn, timeout)
    outcome.welcome = answer
    return outcome
