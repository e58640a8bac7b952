"""serve(): a bounded number of connections before the handshake, a handshake deadline,
and nothing left behind when connections end (docs/PROTOCOL.md, "Memory bounds")."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import struct
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from structlog.testing import capture_logs

from replicator.transport import (
    ConnectionClosedError,
    Error,
    FramedConnection,
    Goodbye,
    Hello,
    Ping,
    Pong,
    RemoteProtocolError,
    connect,
    connection_pair,
    serve,
)
from replicator.transport import connection as connection_module

from .helpers import HELLO, random_records, welcome

Handler = Callable[[FramedConnection], Awaitable[None]]


def big_prefix(mtype: int = 1) -> bytes:
    body = 64 * 1024 * 1024
    return struct.pack("<4sBBBBIII16s", b"RPLW", 1, mtype, 0, 0, 0, body, body, bytes(16))


async def answer_hello(conn: FramedConnection) -> None:
    """A receiver's handler in short: Hello -> Welcome, then answer pings until Goodbye."""
    with contextlib.suppress(ConnectionClosedError):  # cut off as a stranger
        msg = await conn.recv(10)
        assert isinstance(msg, Hello)
        await conn.send(welcome())
        while not isinstance(msg := await conn.recv(10), Goodbye):
            if isinstance(msg, Ping):
                await conn.send(Pong(msg.nonce, msg.ts_ns))


@contextlib.asynccontextmanager
async def server(handler: Handler, **kw: Any) -> AsyncIterator[int]:
    srv = await serve("127.0.0.1", 0, handler, **kw)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


async def legit_session(port: int) -> None:
    conn = await connect("127.0.0.1", port)
    try:
        await conn.send(HELLO)
        assert (await conn.recv(10)).window == welcome().window  # type: ignore[union-attr]
        await conn.send(Ping(1, 2))
        assert await conn.recv(10) == Pong(1, 2)
        await conn.send(Goodbye("done"))
    finally:
        await conn.aclose()


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """True once the server closed (EOF or reset); False if still open after timeout."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def test_the_oldest_pending_connection_makes_room_for_a_new_one() -> None:
    refused: list[str] = []
    async with server(
        answer_hello, max_pending=4, handshake_timeout=None, on_refused=refused.append
    ) as port:
        clients = []
        with capture_logs() as logs:
            for _ in range(6):  # one at a time, so the server sees them in this order
                clients.append(await asyncio.open_connection("127.0.0.1", port))
                await asyncio.sleep(0.02)
            assert await closed_by_peer(clients[0][0])
            assert await closed_by_peer(clients[1][0])
            for reader, _ in clients[2:]:
                assert not await closed_by_peer(reader, 0.2)
            await legit_session(port)  # served at once, though 4 strangers were waiting
            assert await closed_by_peer(clients[2][0])
        warnings = [e for e in logs if e["event"] == "transport.too_many_pending"]
        assert len(warnings) == 1  # once per burst
        first_port = clients[0][1].get_extra_info("sockname")[1]
        assert warnings[0]["peer"] == f"127.0.0.1:{first_port}"
        assert warnings[0]["max_pending"] == 4
        assert refused == ["too_many_pending"] * 3  # each counted (monitoring)
        for _, writer in clients:
            writer.close()


async def test_a_flooding_address_evicts_its_own_pending_connections() -> None:
    """A slow sender from 127.0.0.2 (a long round trip: still in its handshake) and a
    flood from 127.0.0.1: the flood's own oldest make room, the slow one stays (it was
    the oldest, and went first)."""
    async with server(answer_hello, max_pending=4, handshake_timeout=None) as port:
        slow = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        await asyncio.sleep(0.02)
        flood = []
        for _ in range(8):  # one at a time, so the server sees them in this order
            flood.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.02)
        for reader, _ in flood[:5]:
            assert await closed_by_peer(reader)
        assert not await closed_by_peer(slow[0], 0.3)
        for reader, _ in flood[5:]:
            assert not await closed_by_peer(reader, 0.1)
        # one more from the slow one's address: the flood still holds the most
        more = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        assert await closed_by_peer(flood[5][0])
        assert not await closed_by_peer(slow[0], 0.1)
        for _, writer in [slow, more, *flood]:
            writer.close()


async def test_a_silent_peer_is_cut_off_at_the_handshake_deadline() -> None:
    errors: list[BaseException] = []

    async def handler(conn: FramedConnection) -> None:
        try:
            await conn.recv(30)  # the engine waits longer than the transport's deadline
        except ConnectionClosedError as exc:
            errors.append(exc)

    async with server(handler, handshake_timeout=0.3) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(big_prefix()[:10])  # a trickle that never becomes a frame
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await closed_by_peer(reader)
        assert 0.25 < loop.time() - start < 3
        writer.close()
    assert len(errors) == 1
    assert "did not complete the handshake within 0.3 s" in str(errors[0])


async def test_the_deadline_does_not_cover_our_own_answer() -> None:
    async def slow_to_welcome(conn: FramedConnection) -> None:
        assert isinstance(await conn.recv(10), Hello)
        await asyncio.sleep(0.6)  # opening the job takes a while: not the peer's fault
        await conn.send(welcome())
        assert await conn.recv(10) == Ping(1, 2)
        await conn.send(Pong(1, 2))
        await conn.recv(10)

    async with server(slow_to_welcome, handshake_timeout=0.3) as port:
        await legit_session(port)


async def test_legit_sessions_are_not_limited_once_past_the_handshake() -> None:
    async with server(answer_hello, max_pending=2) as port:
        conns = []
        for _ in range(6):  # more sessions than max_pending, all established at once
            conn = await connect("127.0.0.1", port)
            await conn.send(HELLO)
            assert (await conn.recv(10)).window == welcome().window  # type: ignore[union-attr]
            conns.append(conn)
        for conn in conns:
            await conn.send(Ping(3, 4))
            assert await conn.recv(10) == Pong(3, 4)
        for conn in conns:
            await conn.send(Goodbye("done"))
            await conn.aclose()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_ended_connections_go_without_the_cyclic_gc(loop: str) -> None:
    """A refused announcement, a timed-out stranger, an evicted one and a normal session:
    none of their FramedConnections survives its end by a reference cycle."""
    refs: list[weakref.ref[FramedConnection]] = []

    async def run() -> None:
        done: asyncio.Queue[None] = asyncio.Queue()

        async def handler(conn: FramedConnection) -> None:
            refs.append(weakref.ref(conn))
            try:
                await answer_hello(conn)
            except RemoteProtocolError as exc:
                await conn.send(Error("protocol", str(exc)))
            finally:
                done.put_nowait(None)

        async with server(handler, max_pending=2, handshake_timeout=0.5) as port:
            refused = await asyncio.open_connection("127.0.0.1", port)
            refused[1].write(big_prefix())
            assert await closed_by_peer(refused[0])  # the Error, then our lingering close
            silent = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.05)
            evicted = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.05)
            crowd = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await legit_session(port)
            for reader, _ in [silent, evicted, *crowd]:
                assert await closed_by_peer(reader)
            for _, writer in [refused, silent, evicted, *crowd]:
                writer.close()
            async with asyncio.timeout(5):
                for _ in range(6):
                    await done.get()
            await asyncio.sleep(0.1)  # connection_lost callbacks

    gc.collect()
    gc.disable()
    try:
        (uvloop.run if loop == "uvloop" else asyncio.run)(run())
        alive = [ref() for ref in refs if ref() is not None]
        assert not alive, f"{len(alive)} of {len(refs)} connections are still alive"
    finally:
        gc.enable()


async def test_memory_is_trimmed_after_a_connection_with_large_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(connection_module, "_malloc_trim", calls.append)
    monkeypatch.setattr(connection_module, "_TRIM_AFTER", 0.05)
    sender, receiver = await connection_pair(window=4 * 1024 * 1024)
    await sender.send(HELLO)
    await receiver.recv(5)
    await receiver.send(welcome(4 * 1024 * 1024))
    await sender.recv(5)
    await sender.send(Ping(1, 1))  # small frames only: no trim for these
    await receiver.recv(5)
    await sender.send(random_records(1, n=1, size=2 * 1024 * 1024))
    await receiver.recv(5)
    await asyncio.gather(sender.aclose(), receiver.aclose())
    await asyncio.sleep(0.2)
    assert calls == [0]  # once, for the receiver's side (the sender read small frames)
