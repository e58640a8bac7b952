"""The asyncio adapter over socketpair, TCP, unix sockets and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from replicator.transport import (
    Ack,
    ConnectionClosedError,
    Credit,
    DialError,
    Error,
    FramedConnection,
    Goodbye,
    LocalProtocolError,
    Manifest,
    ManifestRequest,
    Message,
    MessageType,
    Ping,
    Pong,
    Records,
    Refuse,
    RemoteProtocolError,
    State,
    VersionMismatchError,
    connect,
    connect_unix,
    connection_pair,
    serve,
    serve_unix,
)
from replicator.transport.connection import _connect_reason
from replicator.transport.frames import FrameDecoder, encode_frame

from .helpers import HELLO, pack_records, random_records, raw_frame, welcome, zero_records

MIB = 1 << 20
KINDS = ["pair", "tcp", "unix"]
HELLO_FRAME = b"".join(encode_frame(HELLO).buffers)


@contextlib.asynccontextmanager
async def open_pair(
    kind: str, where: Path, **kw: Any
) -> AsyncIterator[tuple[FramedConnection, FramedConnection]]:
    """A connected (sender, receiver) over the given kind of byte stream."""
    if kind == "pair":
        sender, receiver = await connection_pair(**kw)
        try:
            yield sender, receiver
        finally:  # together: each end's lingering close waits for the other's FIN
            await asyncio.gather(sender.aclose(), receiver.aclose())
        return
    accepted: asyncio.Queue[FramedConnection] = asyncio.Queue()
    finished = asyncio.Event()

    async def handler(conn: FramedConnection) -> None:
        await accepted.put(conn)
        await finished.wait()

    if kind == "tcp":
        server = await serve("127.0.0.1", 0, handler, **kw)
        port = server.sockets[0].getsockname()[1]
        sender = await connect("127.0.0.1", port, **kw)
    else:
        path = str(where / "r.sock")
        server = await serve_unix(path, handler, **kw)
        sender = await connect_unix(path, **kw)
    try:
        receiver = await asyncio.wait_for(accepted.get(), 5)
        yield sender, receiver
    finally:
        finished.set()
        await sender.aclose()
        server.close()
        await server.wait_closed()


async def _handshake(sender: FramedConnection, receiver: FramedConnection, window: int) -> None:
    await sender.send(HELLO)
    assert await receiver.recv(5) == HELLO
    await receiver.send(welcome(window))
    assert await sender.recv(5) == welcome(window)
    assert sender.state is receiver.state is State.ESTABLISHED


async def _conformance(sender: FramedConnection, receiver: FramedConnection) -> None:
    """One scripted session: every message type, both directions, clean close."""
    await _handshake(sender, receiver, window=4 * MIB)
    assert sender.credit == 4 * MIB
    batches = [random_records(1, n=4, size=64 * 1024), zero_records(5, n=16, size=64 * 1024)]
    batches.append(pack_records(21, [os.urandom(100), bytes(5000)]))
    for msg in batches:
        await sender.send(msg)
    for msg in batches:
        assert await receiver.recv(5) == msg
    await receiver.send(Ack(22, 4))
    await receiver.send(Credit(sum(len(m.payload) for m in batches)))
    assert await sender.recv(5) == Ack(22, 4)
    assert await sender.recv(5) == Credit(sum(len(m.payload) for m in batches))
    assert sender.credit == 4 * MIB
    await sender.send(ManifestRequest(1, "disk.img", 4096, True))
    assert await receiver.recv(5) == ManifestRequest(1, "disk.img", 4096, True)
    part = Manifest(1, "disk.img", True, 8192, 4096, 0, os.urandom(32), True)
    await receiver.send(part)
    assert await sender.recv(5) == part
    for a, b in ((sender, receiver), (receiver, sender)):
        await a.send(Ping(7, 8))
        assert await b.recv(5) == Ping(7, 8)
        await b.send(Pong(7, 8))
        assert await a.recv(5) == Pong(7, 8)
    await sender.send(Goodbye("done"))
    assert await receiver.recv(5) == Goodbye("done")
    await receiver.send(Ack(22, 22))  # half-close: the receiver finishes its acks
    await receiver.send(Goodbye("bye"))
    assert await sender.recv(5) == Ack(22, 22)
    assert await sender.recv(5) == Goodbye("bye")
    assert sender.state is receiver.state is State.CLOSED

    async def sees_a_clean_close() -> None:
        with pytest.raises(ConnectionClosedError) as info:
            await sender.recv(5)
        assert info.value.clean

    # as real peers do: one closes while the other reads (a TLS close waits for the reply)
    await asyncio.gather(receiver.aclose(), sees_a_clean_close())
    assert sender.bytes_sent == receiver.bytes_received
    assert receiver.bytes_sent == sender.bytes_received
    assert sender.stats.payload_sent_wire < sender.stats.payload_sent  # lz4 was used
    assert sender.peer and receiver.peer


@pytest.mark.parametrize("kind", KINDS)
async def test_conformance(kind: str, tmp_path: Path) -> None:
    async with open_pair(kind, tmp_path) as (sender, receiver):
        await _conformance(sender, receiver)


@pytest.mark.parametrize("kind", KINDS)
def test_conformance_under_uvloop(kind: str, tmp_path: Path) -> None:
    async def run() -> None:
        async with open_pair(kind, tmp_path) as (sender, receiver):
            await _conformance(sender, receiver)

    uvloop.run(run())


async def test_conformance_with_encoding_in_a_worker_thread() -> None:
    sender, receiver = await connection_pair(offload=0)
    await _conformance(sender, receiver)
    await sender.aclose()


async def test_offloaded_frames_keep_their_order() -> None:
    sender, receiver = await connection_pair(offload=64 * 1024)
    await _handshake(sender, receiver, window=8 * MIB)
    bulk = [zero_records(1, n=16, size=64 * 1024), random_records(17, n=1, size=100)]
    sends = [sender.send(m) for m in bulk]
    sends += [sender.send(Ping(1, 1)), sender.send(Goodbye("done"))]
    await asyncio.gather(*sends)
    received = [await receiver.recv(5) for _ in range(4)]
    # the Ping overtakes the bulk frames (the first is being encoded); the Goodbye waits
    assert received == [Ping(1, 1), *bulk, Goodbye("done")]
    await asyncio.gather(sender.aclose(), receiver.aclose())


async def test_offloaded_frame_too_big_is_a_local_error() -> None:
    sender, receiver = await connection_pair(offload=0, max_frame=64 * 1024)
    await _handshake(sender, receiver, window=8 * MIB)
    with pytest.raises(LocalProtocolError, match="frame limit"):
        await sender.send(random_records(1, n=1, size=100_000))
    assert sender.state is State.ERROR
    await asyncio.gather(sender.aclose(), receiver.aclose())


@pytest.mark.parametrize("kind", KINDS)
async def test_peer_names(kind: str, tmp_path: Path) -> None:
    async with open_pair(kind, tmp_path) as (sender, receiver):
        if kind == "tcp":
            port = sender.get_extra_info("peername")[1]
            assert sender.peer == f"127.0.0.1:{port}"
            assert receiver.peer.startswith("127.0.0.1:")
        elif kind == "unix":
            assert sender.peer == receiver.peer == f"unix:{tmp_path / 'r.sock'}"
        else:
            assert (sender.peer, receiver.peer) == ("socketpair:receiver", "socketpair:sender")


async def test_recv_timeout_leaves_the_connection_usable() -> None:
    sender, receiver = await connection_pair()
    with pytest.raises(TimeoutError):
        await receiver.recv(timeout=0.05)
    await sender.send(HELLO)
    assert await receiver.recv(timeout=5) == HELLO
    await asyncio.gather(sender.aclose(), receiver.aclose())


async def test_aclose_is_idempotent_and_final() -> None:
    sender, receiver = await connection_pair()
    await asyncio.gather(sender.aclose(), sender.aclose())
    await sender.aclose()
    assert sender.closed
    with pytest.raises(ConnectionClosedError):
        await sender.send(HELLO)
    with pytest.raises(ConnectionClosedError):
        await sender.recv(1)
    with pytest.raises(ConnectionClosedError) as info:
        await receiver.recv(5)
    assert not info.value.clean  # the sender vanished without a Goodbye
    await receiver.aclose()


async def test_only_one_reader_at_a_time() -> None:
    sender, receiver = await connection_pair()
    reader = asyncio.create_task(receiver.recv(5))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already running"):
        await receiver.recv(1)
    await sender.send(HELLO)
    assert await reader == HELLO
    await asyncio.gather(sender.aclose(), receiver.aclose())


# --- a raw client against a served FramedConnection ---------------------------------------------


@contextlib.asynccontextmanager
async def raw_client(
    handler: Callable[[FramedConnection], Awaitable[None]],
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    server = await serve("127.0.0.1", 0, handler)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


async def _serve_one_recv(data: bytes, *, eof: bool = True) -> BaseException | Message:
    """Send raw bytes to a receiver; what did its recv() make of them?"""
    outcome: asyncio.Future[BaseException | Message] = asyncio.get_running_loop().create_future()

    async def handler(conn: FramedConnection) -> None:
        try:
            outcome.set_result(await conn.recv(5))
        except Exception as exc:
            outcome.set_result(exc)

    async with raw_client(handler) as (_, writer):
        writer.write(data)
        if eof:
            writer.write_eof()
        return await asyncio.wait_for(outcome, 5)


async def test_eof_mid_frame_is_a_protocol_error() -> None:
    result = await _serve_one_recv(HELLO_FRAME[:-5])
    assert isinstance(result, RemoteProtocolError)
    assert "in the middle of a frame" in str(result)


async def test_http_client_is_not_a_replicator_peer() -> None:
    result = await _serve_one_recv(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", eof=False)
    assert isinstance(result, RemoteProtocolError)
    assert "not a replicator peer" in str(result) and "HTTP" in str(result)


async def test_newer_frame_version_is_refused_in_a_frame_the_peer_can_read() -> None:
    async def handler(conn: FramedConnection) -> None:
        try:
            await conn.recv(5)
        except VersionMismatchError as exc:
            await conn.send(Refuse("version", str(exc)))

    async with raw_client(handler) as (reader, writer):
        writer.write(raw_frame(MessageType.PING, b"\x92\x01\x02", version=2))
        answer = await asyncio.wait_for(reader.read(), 5)  # until the receiver closes
    decoder = FrameDecoder()
    decoder.feed(answer)
    frame = decoder.next_frame()
    assert frame is not None and isinstance(frame.message, Refuse)
    assert frame.message.code == "version"
    assert "peer speaks frame format version 2" in frame.message.message


async def test_handler_failure_closes_the_connection() -> None:
    async def handler(conn: FramedConnection) -> None:
        raise ValueError("boom")

    server = await serve("127.0.0.1", 0, handler)
    conn = await connect("127.0.0.1", server.sockets[0].getsockname()[1])
    with pytest.raises(ConnectionClosedError):
        await conn.recv(5)
    await conn.aclose()
    server.close()
    await server.wait_closed()


async def test_last_frame_reaches_a_peer_that_was_still_sending() -> None:
    """A receiver that refuses (e.g. its disk is full) while the sender streams records:
    closing with the sender's records unread must not turn into a reset that makes the
    sender's kernel drop the Error before the sender reads it."""

    async def handler(conn: FramedConnection) -> None:
        assert await conn.recv(5) == HELLO
        await conn.send(welcome(1 << 30))
        await asyncio.sleep(0.3)  # the sender's records pile up unread
        await conn.send(Error("storage", "receiver disk is full"))

    server = await serve("127.0.0.1", 0, handler)
    sender = await connect("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        await sender.send(HELLO)
        assert await sender.recv(5) == welcome(1 << 30)
        lsn = 1
        with contextlib.suppress(ConnectionClosedError):
            for _ in range(48):
                await sender.send(random_records(lsn, n=16, size=64 * 1024))
                lsn += 16
        msg = await sender.recv(5)
        assert isinstance(msg, Error) and msg.code == "storage", msg
    finally:
        await sender.aclose()
        server.close()
        await server.wait_closed()


# --- connecting -----------------------------------------------------------------------------------


async def test_connection_refused_has_a_one_line_message() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DialError) as info:
        await connect("127.0.0.1", port)
    assert str(info.value) == f"cannot connect to 127.0.0.1:{port}: connection refused"
    assert isinstance(info.value, OSError) and info.value.errno == errno.ECONNREFUSED
    assert info.value.strerror == "connection refused"


async def test_missing_unix_socket(tmp_path: Path) -> None:
    with pytest.raises(DialError, match=r"cannot connect to unix:.*nope\.sock: no such socket"):
        await connect_unix(str(tmp_path / "nope.sock"))


async def test_connect_timeout() -> None:
    # a listener whose accept queue is full drops new SYNs: connect() hangs until the timeout
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        try:
            with pytest.raises(DialError, match=r"127\.0\.0\.1:\d+: timed out after 0\.3 s"):
                await connect("127.0.0.1", port, timeout=0.3)
        finally:
            for filler in fillers:
                filler.close()


async def test_a_tls_handshake_nobody_answers_is_told_from_an_unreachable_host() -> None:
    """A port that accepts and then says nothing (an HTTP server waiting for a request
    line: a wrong --to; a stopped receiver) timed out as "timed out after 10 s", the
    same words as a host that cannot be reached, and a TLS sender was told to check that
    the receiver runs. A listener with room in its queue takes the TCP connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with pytest.raises(DialError) as info:
            await connect("127.0.0.1", port, timeout=0.3, ssl=context)
    assert "the TLS handshake got no answer within 0.3 s" in str(info.value)
    assert "though the port accepts connections" in str(info.value)
    assert info.value.errno == errno.ETIMEDOUT
    # what a sender says then: check the address, not "is `replicator receive` running?"
    from replicator.engine.connectors import TcpConnector
    from replicator.engine.errors import ConnectError

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        connector = TcpConnector("127.0.0.1", port, timeout=0.3, tls=context)
        with pytest.raises(ConnectError) as refused:
            await connector.connect()
    assert "the receiver's --listen address" in (refused.value.hint or ""), refused.value.hint


def test_connect_reasons() -> None:
    assert _connect_reason(TimeoutError(), 10.0) == ("timed out after 10 s", errno.ETIMEDOUT)
    reason, _ = _connect_reason(socket.gaierror(-2, "Name or service not known"), 1)
    assert reason == "cannot resolve the host name (Name or service not known)"
    reason, err = _connect_reason(OSError(errno.EHOSTUNREACH, "No route to host"), 1)
    assert (reason, err) == ("no route to host", errno.EHOSTUNREACH)


# --- flow control and shaping ---------------------------------------------------------------------


async def test_a_reader_that_does_not_read_stops_the_sender() -> None:
    sender, receiver = await connection_pair()
    await _handshake(sender, receiver, window=64 * MIB)
    sent = 0
    with pytest.raises(TimeoutError):
        for lsn in range(1, 60):
            await asyncio.wait_for(sender.send(random_records(lsn, n=1, size=MIB - 100)), 0.5)
            sent += 1
    assert sent < 40, "backpressure never reached the sender"
    # the receiver holds at most about one frame: reading paused behind it
    assert receiver.protocol._decoder.buffered < 3 * MIB
    for _ in range(sent + 1):  # the blocked send completes once the receiver reads
        assert isinstance(await receiver.recv(5), Records)
    await asyncio.gather(sender.aclose(), receiver.aclose())


async def test_a_silent_peer_is_cut_off_and_a_send_blocked_in_drain_wakes() -> None:
    """A peer gone without a reset (a path that drops every packet) sends nothing and reads
    nothing: a send waiting for the full buffer to drain waited until TCP gave up
    retransmitting (about 15 minutes), whatever timeout the reader had."""
    sender, receiver = await connection_pair()
    await _handshake(sender, receiver, window=64 * MIB)
    sender.abort_when_silent(0.5)
    started = asyncio.get_running_loop().time()
    sent = 0
    with pytest.raises(ConnectionClosedError, match=r"sent nothing for 0\.5 s"):
        async with asyncio.timeout(10):
            for lsn in range(1, 60):
                await sender.send(random_records(lsn, n=1, size=MIB - 100))
                sent += 1
    assert sent < 40, "backpressure never reached the sender"  # the send in drain failed
    assert asyncio.get_running_loop().time() - started < 5
    with pytest.raises(ConnectionClosedError, match=r"sent nothing for 0\.5 s"):
        await sender.recv(1)  # the reader is told the same
    await asyncio.gather(sender.aclose(), receiver.aclose())


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_delivered_stalls_with_a_peer_reading_nothing_and_send_now_never_waits(
    kind: str, tmp_path: Path
) -> None:
    """What a stopping sender tells a stalled receiver by (engine/link.py ``StopWatch``):
    the bytes its side took stop growing while it reads nothing, a heartbeat still goes
    out at once, and once it reads again everything counts as taken."""
    async with open_pair(kind, tmp_path) as (sender, receiver):
        await _handshake(sender, receiver, window=64 * MIB)
        assert sender.delivered() == sender.bytes_sent

        async def flood() -> None:
            for lsn in range(1, 41):
                await sender.send(random_records(lsn, n=1, size=MIB - 100))

        task = asyncio.create_task(flood())
        try:
            await asyncio.sleep(1.0)
            if task.done():
                await task  # its error, if any
            assert not task.done(), "backpressure never reached the sender"
            stalled = sender.delivered()
            assert stalled is not None and stalled < sender.bytes_sent
            before = sender.bytes_sent
            sender.send_now(Ping(7, 0))  # no await: it does not wait for the full buffers
            assert sender.bytes_sent > before
            await asyncio.sleep(0.3)
            assert sender.delivered() == stalled  # the peer took nothing more
            with pytest.raises(LocalProtocolError, match="sent with send"):
                sender.send_now(random_records(99, n=1))
            got = [await receiver.recv(5) for _ in range(41)]  # the peer reads again
            assert got.count(Ping(7, 0)) == 1  # after the frames written before it
            assert sum(isinstance(m, Records) for m in got) == 40
            await task
            await asyncio.sleep(0.2)  # the last bytes leave our buffers for the read ones
            assert sender.delivered() == sender.bytes_sent
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def test_each_message_taken_restarts_the_silence_and_a_frame_not_taken_does_not() -> None:
    sender, receiver = await connection_pair()
    await _handshake(sender, receiver, window=MIB)
    sender.abort_when_silent(1.0)
    for nonce in range(15):  # 1.5 s in all, a message every 0.1 s
        await receiver.send(Ping(nonce, 0))
        assert await sender.recv(5) == Ping(nonce, 0)
        await asyncio.sleep(0.1)
    # arrives, but our reader does not take it: no sign of life, or a peer that pings but
    # reads nothing (stuck) would keep our reader waiting to send it a Pong for ever
    await receiver.send(Ping(99, 0))
    await asyncio.sleep(1.5)
    assert sender.closed
    with pytest.raises(ConnectionClosedError, match="sent nothing for 1 s"):
        await sender.recv(1)
    await asyncio.gather(sender.aclose(), receiver.aclose())


class RecordingShaper:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def acquire(self, nbytes: int) -> None:
        self.calls.append(nbytes)
        await self.gate.wait()


async def test_shaper_sees_bulk_frames_only_and_never_delays_control() -> None:
    shaper = RecordingShaper()
    sender, receiver = await connection_pair(shaper=shaper)
    await _handshake(sender, receiver, window=8 * MIB)
    first = random_records(1, n=2, size=10_000)
    await sender.send(first)
    assert shaper.calls == [sender.bytes_sent - len(HELLO_FRAME)]  # the frame's wire size
    shaper.gate.clear()  # the shaper now holds bulk frames back
    held = asyncio.create_task(sender.send(random_records(3, n=1)))
    await asyncio.sleep(0.01)
    await sender.send(Ping(1, 1))  # control frames pass
    bye = asyncio.create_task(sender.send(Goodbye("done")))  # final frames wait for bulk ones
    assert await receiver.recv(5) == first
    assert await receiver.recv(5) == Ping(1, 1)
    assert not held.done() and not bye.done()
    shaper.gate.set()
    await held
    await bye
    assert isinstance(await receiver.recv(5), Records)
    assert await receiver.recv(5) == Goodbye("done")
    assert len(shaper.calls) == 2
    await asyncio.gather(sender.aclose(), receiver.aclose())


async def test_cancelled_shaping_leaves_the_connection_usable() -> None:
    shaper = RecordingShaper()
    sender, receiver = await connection_pair(shaper=shaper)
    await _handshake(sender, receiver, window=8 * MIB)
    shaper.gate.clear()  # paused, as at rate 0
    credit = sender.credit
    task = asyncio.create_task(sender.send(random_records(1)))
    await asyncio.sleep(0.01)
    bye = asyncio.create_task(sender.send(Goodbye("stopping")))  # waits behind the held frame
    await asyncio.sleep(0.01)
    assert not bye.done()
    task.cancel()  # a sender stopping: the held frame never goes ...
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(bye, 5)  # ... and the Goodbye behind it does
    assert sender.credit == credit  # nothing of the frame was counted as sent
    assert await receiver.recv(5) == Goodbye("stopping")
    await asyncio.gather(sender.aclose(), receiver.aclose())


# --- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def _tls_contexts(cert: Path, key: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    return server, client


async def test_tls_is_a_wrapper_around_the_same_protocol(tls_files: tuple[Path, Path]) -> None:
    server_ctx, client_ctx = _tls_contexts(*tls_files)
    accepted: asyncio.Queue[FramedConnection] = asyncio.Queue()
    finished = asyncio.Event()

    async def handler(conn: FramedConnection) -> None:
        await accepted.put(conn)
        await finished.wait()

    server = await serve("127.0.0.1", 0, handler, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    sender = await connect("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
    receiver = await asyncio.wait_for(accepted.get(), 5)
    assert sender.get_extra_info("ssl_object").version() == "TLSv1.3"
    await _conformance(sender, receiver)
    finished.set()
    await sender.aclose()
    server.close()
    await server.wait_closed()


async def test_tls_close_is_bounded_when_the_peer_never_answers(
    tls_files: tuple[Path, Path],
) -> None:
    server_ctx, client_ctx = _tls_contexts(*tls_files)
    accepted: asyncio.Queue[FramedConnection] = asyncio.Queue()
    finished = asyncio.Event()

    async def handler(conn: FramedConnection) -> None:
        await accepted.put(conn)
        await finished.wait()

    server = await serve("127.0.0.1", 0, handler, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    sender = await connect("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
    receiver = await asyncio.wait_for(accepted.get(), 5)
    await _handshake(sender, receiver, window=MIB)  # the sender now holds reads back
    loop = asyncio.get_running_loop()
    started = loop.time()
    await receiver.aclose(timeout=0.2)  # no close_notify comes back: abort
    assert loop.time() - started < 2
    assert receiver.closed
    finished.set()
    await sender.aclose()
    server.close()
    await server.wait_closed()


async def test_tls_client_against_a_plain_receiver(tls_files: tuple[Path, Path]) -> None:
    _, client_ctx = _tls_contexts(*tls_files)
    seen: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handler(conn: FramedConnection) -> None:
        try:
            await conn.recv(5)
        except Exception as exc:
            seen.set_result(exc)

    server = await serve("127.0.0.1", 0, handler)
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(DialError, match=f"cannot connect to 127.0.0.1:{port}"):
        await connect("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost", timeout=5)
    error = await asyncio.wait_for(seen, 5)
    assert isinstance(error, RemoteProtocolError) and "speak TLS" in str(error)
    server.close()
    await server.wait_closed()
