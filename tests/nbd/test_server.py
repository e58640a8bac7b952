"""The asyncio server with a raw client: handshake, transmission, malformed traffic."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from replicator.engine.nbd import backend
from replicator.engine.nbd.proto import (
    IHAVEOPT,
    MAX_SKIP,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from tests.nbd.conftest import ServeFactory
from tests.nbd.helpers import OPT, REQ, RawClient, go_data, journal_records, loop_policy

KiB = 1024
SIZE = 256 * KiB
EXPECTED_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.CAN_MULTI_CONN
)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    return loop_policy(request.param)


def disk(tmp_path: Path, name: str = "disk0.img", size: int = SIZE) -> Path:
    p = tmp_path / name
    p.write_bytes(bytes(size))
    return p


def slow_datasync(monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
    real = backend.fdatasync_async

    async def slow(fd: int) -> None:
        await asyncio.sleep(delay)
        await real(fd)

    monkeypatch.setattr(backend, "fdatasync_async", slow)


async def assert_serves(socket: str, name: str = "disk0.img") -> None:
    """A fresh client can still do a write/read round trip."""
    c = await RawClient.open(socket, name)
    assert await c.request(Cmd.WRITE, 0, 4, b"ok!!") == (0, b"")
    assert await c.request(Cmd.READ, 0, 4) == (0, b"ok!!")
    await c.disconnect()


# -- handshake ---------------------------------------------------------------------


async def test_list_info_go_and_advertised_flags(tmp_path: Path, serve: ServeFactory) -> None:
    s = await serve(disk(tmp_path), disk(tmp_path, "disk1.img"))
    c = await RawClient.connect(s.socket)
    assert await c.greet(3) == 3  # FIXED_NEWSTYLE | NO_ZEROES
    names = await c.option_replies(Opt.LIST)
    assert [r.data[4:] for r in names[:-1]] == [b"disk0.img", b"disk1.img"]
    info = await c.option_replies(Opt.INFO, go_data("disk1.img", [Info.BLOCK_SIZE]))
    assert [r.rep for r in info] == [Rep.INFO, Rep.INFO, Rep.ACK]
    assert struct.unpack(">HQH", info[0].data) == (Info.EXPORT, SIZE, EXPECTED_FLAGS)
    assert struct.unpack(">HIII", info[1].data) == (Info.BLOCK_SIZE, 1, 4096, 32 * 1024 * KiB)
    await c.go("disk0.img")
    assert (c.size, c.flags) == (SIZE, EXPECTED_FLAGS)
    assert await c.request(Cmd.READ, 0, 8) == (0, bytes(8))
    await c.disconnect()


async def test_refused_options_keep_the_session_usable(tmp_path: Path, serve: ServeFactory) -> None:
    s = await serve(disk(tmp_path))
    c = await RawClient.connect(s.socket)
    await c.greet()
    for opt, data, rep in [
        (Opt.STRUCTURED_REPLY, b"", Rep.ERR_UNSUP),
        (Opt.STARTTLS, b"", Rep.ERR_UNSUP),
        (0x1234, b"whatever", Rep.ERR_UNSUP),
        (Opt.GO, go_data("nope"), Rep.ERR_UNKNOWN),
        (Opt.INFO, b"\0\0\0\x50abc", Rep.ERR_INVALID),
        (Opt.LIST, b"x", Rep.ERR_INVALID),
    ]:
        (reply,) = await c.option_replies(opt, data)
        assert reply.rep == rep, (opt, reply)
        assert reply.data  # every error carries a message for the user
    assert (await c.go("disk0.img"))[-1].rep == Rep.ACK
    await c.disconnect()


async def test_an_unknown_export_name_is_answered_with_the_names_served(
    tmp_path: Path, serve: ServeFactory
) -> None:
    """What qemu prints ("server reported: ...") says which names would work."""
    s = await serve(disk(tmp_path), disk(tmp_path, "disk1.img"))
    c = await RawClient.connect(s.socket)
    await c.greet()
    (reply,) = await c.option_replies(Opt.GO, go_data("disk2.img"))
    assert (reply.rep, reply.data.decode()) == (
        Rep.ERR_UNKNOWN,
        "no export named 'disk2.img' (exported here: 'disk0.img', 'disk1.img')",
    )
    (reply,) = await c.option_replies(Opt.INFO, go_data(""))
    assert (reply.rep, reply.data.decode()) == (
        Rep.ERR_UNKNOWN,
        "no default export: this server has 2, name one ('disk0.img', 'disk1.img')",
    )
    assert [r.rep for r in await c.option_replies(Opt.ABORT)] == [Rep.ACK]
    c.writer.close()


async def test_default_export_when_there_is_only_one(tmp_path: Path, serve: ServeFactory) -> None:
    s = await serve(disk(tmp_path))
    c = await RawClient.open(s.socket, "")
    assert c.size == SIZE
    await c.disconnect()


async def test_export_name_option(tmp_path: Path, serve: ServeFactory) -> None:
    s = await serve(disk(tmp_path))
    for cflags, tail in ((1, 124), (3, 0)):
        c = await RawClient.connect(s.socket)
        await c.greet(cflags)
        c.send_option(Opt.EXPORT_NAME, b"disk0.img")
        size, flags = struct.unpack(">QH", await c.exactly(10))
        assert (size, flags) == (SIZE, EXPECTED_FLAGS)
        assert await c.exactly(tail) == bytes(tail)
        assert await c.request(Cmd.WRITE, 0, 3, b"abc") == (0, b"")
        await c.disconnect()
    c = await RawClient.connect(s.socket)
    await c.greet()
    c.send_option(Opt.EXPORT_NAME, b"missing")
    assert await c.closed_by_server()  # no error reply exists for EXPORT_NAME


async def test_abort(tmp_path: Path, serve: ServeFactory) -> None:
    s = await serve(disk(tmp_path))
    c = await RawClient.connect(s.socket)
    await c.greet()
    (reply,) = await c.option_replies(Opt.ABORT)
    assert reply.rep == Rep.ACK
    assert await c.closed_by_server()


async def test_handshake_timeout_and_bad_client_flags(tmp_path: Path, serve: ServeFactory) -> None:
    s = await serve(disk(tmp_path), handshake_timeout=0.2)
    idle = await RawClient.connect(s.socket)
    await idle.greet()
    assert await idle.closed_by_server()
    bad = await RawClient.connect(s.socket)
    await bad.greet(client_flags=0x80)
    assert await bad.closed_by_server()
    await assert_serves(s.socket)


# -- transmission ------------------------------------------------------------------


async def test_io_round_trip_and_spec_errors(tmp_path: Path, serve: ServeFactory) -> None:
    s = await serve(disk(tmp_path))
    c = await RawClient.open(s.socket, "disk0.img")
    assert await c.request(Cmd.WRITE, 512, 5, b"hello", CmdFlag.FUA) == (0, b"")
    assert await c.request(Cmd.READ, 510, 9) == (0, b"\0\0hello\0\0")
    assert await c.request(Cmd.WRITE_ZEROES, 512, 2, flags=CmdFlag.NO_HOLE) == (0, b"")
    assert await c.request(Cmd.TRIM, 514, 3) == (0, b"")
    assert await c.request(Cmd.READ, 512, 5) == (0, bytes(5))
    assert await c.request(Cmd.FLUSH) == (0, b"")
    assert (await c.request(Cmd.READ, SIZE - 1, 2))[0] == Errno.EINVAL
    assert (await c.request(Cmd.WRITE, SIZE - 1, 2, b"xx"))[0] == Errno.ENOSPC
    assert (await c.request(Cmd.WRITE_ZEROES, SIZE, 1))[0] == Errno.ENOSPC
    assert (await c.request(Cmd.TRIM, SIZE - 1, 2))[0] == Errno.EINVAL
    assert (await c.request(Cmd.CACHE, 0, 512))[0] == Errno.EINVAL
    assert (await c.request(42, 0, 512))[0] == Errno.EINVAL
    assert (await c.request(Cmd.READ, 0, 512, flags=CmdFlag.DF))[0] == Errno.EINVAL
    assert (await c.request(Cmd.FLUSH, 1, 0))[0] == Errno.EINVAL
    assert await c.request(Cmd.READ, 512, 2) == (0, b"\0\0")  # still serving
    await c.disconnect()
    records = await journal_records(s.journal)
    assert [r.type.name for r in records] == ["WRITE", "ZERO", "TRIM", "FLUSH"]


async def test_a_write_past_the_end_is_reported_once_with_what_to_do(
    tmp_path: Path, serve: ServeFactory
) -> None:
    """A qcow2 resized through NBD outgrows the export measured at start: the VM stops on
    ENOSPC, and the sender's log must say why and what to do (an info line did not)."""
    s = await serve(disk(tmp_path))
    c = await RawClient.open(s.socket, "disk0.img")
    with capture_logs() as logs:
        for _ in range(3):
            assert (await c.request(Cmd.WRITE, SIZE - 2, 4, b"full"))[0] == Errno.ENOSPC
        assert (await c.request(Cmd.READ, SIZE - 2, 4))[0] == Errno.EINVAL
    await c.disconnect()
    warned = [e for e in logs if e["event"] == "nbd.write_past_export_end"]
    assert len(warned) == 1, logs
    assert warned[0]["log_level"] == "warning" and warned[0]["size"] == SIZE
    assert "restart `replicator send`" in warned[0]["hint"]


async def test_replies_complete_out_of_order(
    tmp_path: Path, serve: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_datasync(monkeypatch, 0.3)
    s = await serve(disk(tmp_path))
    c = await RawClient.open(s.socket, "disk0.img")
    c.send_request(Cmd.WRITE, 1, 0, 4, b"abcd")
    c.send_request(Cmd.FLUSH, 2)
    c.send_request(Cmd.READ, 3, 0, 4)
    order = [(await c.read_reply({3: 4}))[0] for _ in range(3)]
    assert order.index(3) < order.index(2)  # the read did not wait for the slow flush
    await c.disconnect()


async def test_many_pipelined_requests_with_a_small_inflight_limit(
    tmp_path: Path, serve: ServeFactory
) -> None:
    s = await serve(disk(tmp_path), max_inflight=2)
    c = await RawClient.open(s.socket, "disk0.img")
    lengths = {}
    for h in range(200):
        if h % 2:
            c.send_request(Cmd.READ, h, (h % 60) * 4096, 4096)
            lengths[h] = 4096
        else:
            c.send_request(Cmd.WRITE, h, (h % 60) * 4096, 4096, bytes([h % 256]) * 4096)
    seen = set()
    for _ in range(200):
        handle, error, _data = await c.read_reply(lengths)
        assert error == 0
        seen.add(handle)
    assert seen == set(range(200))
    await c.disconnect()


async def test_two_connections_to_one_export_see_each_other(
    tmp_path: Path, serve: ServeFactory
) -> None:
    s = await serve(disk(tmp_path))
    a = await RawClient.open(s.socket, "disk0.img")
    b = await RawClient.open(s.socket, "disk0.img")
    assert await a.request(Cmd.WRITE, 100, 3, b"xyz") == (0, b"")
    assert await b.request(Cmd.FLUSH) == (0, b"")  # CAN_MULTI_CONN: covers a's write
    assert s.journal.durable_lsn == s.journal.last_lsn
    assert await b.request(Cmd.READ, 100, 3) == (0, b"xyz")
    await a.disconnect()
    await b.disconnect()


async def test_tcp_loopback(tmp_path: Path, serve: ServeFactory) -> None:
    s = await serve(disk(tmp_path))
    port = await s.server.start_tcp("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    c = RawClient(reader, writer)
    await c.greet()
    assert (await c.go("disk0.img"))[-1].rep == Rep.ACK
    assert await c.request(Cmd.READ, 0, 4) == (0, bytes(4))
    await c.disconnect()


# -- malformed clients -------------------------------------------------------------


async def test_bad_request_magic_disconnects_only_that_client(
    tmp_path: Path, serve: ServeFactory
) -> None:
    s = await serve(disk(tmp_path))
    good = await RawClient.open(s.socket, "disk0.img")
    bad = await RawClient.open(s.socket, "disk0.img")
    bad.writer.write(b"\xde\xad\xbe\xef" + bytes(24))
    assert await bad.closed_by_server()
    assert await good.request(Cmd.WRITE, 0, 2, b"hi") == (0, b"")
    await good.disconnect()
    await assert_serves(s.socket)


async def test_bad_option_magic_disconnects(tmp_path: Path, serve: ServeFactory) -> None:
    s = await serve(disk(tmp_path))
    c = await RawClient.connect(s.socket)
    await c.greet()
    c.writer.write(OPT.pack(IHAVEOPT ^ 1, Opt.GO, 0))
    assert await c.closed_by_server()
    await assert_serves(s.socket)


async def test_oversized_write_is_refused_and_skipped(tmp_path: Path, serve: ServeFactory) -> None:
    s = await serve(disk(tmp_path), max_request=64 * KiB)
    c = await RawClient.open(s.socket, "disk0.img")
    assert (await c.request(Cmd.WRITE, 0, 128 * KiB, b"x" * 128 * KiB))[0] == Errno.EINVAL
    assert (await c.request(Cmd.READ, 0, 128 * KiB))[0] == Errno.EINVAL
    assert await c.request(Cmd.READ, 0, 4) == (0, bytes(4))  # the stream stayed in sync
    c.send_request(Cmd.WRITE, 9, 0, MAX_SKIP + 1)  # too large even to skip
    assert await c.closed_by_server()
    assert await journal_records(s.journal) == []
    await assert_serves(s.socket)


async def test_oversized_write_is_answered_only_after_its_payload(
    tmp_path: Path, serve: ServeFactory
) -> None:
    """A reply to a request the client is still sending looks like a reply to no request
    (libnbd: "no matching cookie found for server reply"; it hangs up)."""
    s = await serve(disk(tmp_path), max_request=64 * KiB)
    c = await RawClient.open(s.socket, "disk0.img")
    c.send_request(Cmd.WRITE, 7, 0, 256 * KiB, b"x" * 100 * KiB)
    await c.writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(c.reader.readexactly(1), 0.3)
    c.writer.write(b"x" * 156 * KiB)
    assert await c.read_reply() == (7, Errno.EINVAL, b"")
    assert await c.request(Cmd.READ, 0, 4) == (0, bytes(4))
    await c.disconnect()
    assert await journal_records(s.journal) == []


async def test_disconnect_mid_payload_applies_nothing_of_it(
    tmp_path: Path, serve: ServeFactory
) -> None:
    path = disk(tmp_path)
    s = await serve(path)
    c = await RawClient.open(s.socket, "disk0.img")
    assert await c.request(Cmd.WRITE, 0, 4, b"done") == (0, b"")
    c.writer.write(REQ.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 5, 4096, 8192) + b"p" * 5000)
    await c.writer.drain()
    c.writer.close()
    await asyncio.sleep(0.1)
    await assert_serves(s.socket)
    data = path.read_bytes()
    assert data[:4] == b"ok!!" and b"p" not in data
    assert [(r.offset, r.data) for r in await journal_records(s.journal)] == [
        (0, b"done"),
        (0, b"ok!!"),
    ]


async def test_requests_sent_before_a_hang_up_still_complete(
    tmp_path: Path, serve: ServeFactory
) -> None:
    path = disk(tmp_path)
    s = await serve(path)
    c = await RawClient.open(s.socket, "disk0.img")
    for i in range(20):
        c.send_request(Cmd.WRITE, i, i * 4096, 4096, bytes([i + 1]) * 4096)
    c.send_request(Cmd.FLUSH, 99)
    await c.writer.drain()
    c.writer.transport.abort()  # gone without reading a single reply
    for _ in range(100):
        records = await journal_records(s.journal)
        if len(records) == 21:
            break
        await asyncio.sleep(0.02)
    assert [r.type.name for r in records] == ["WRITE"] * 20 + ["FLUSH"]
    data = path.read_bytes()
    assert all(data[i * 4096 : (i + 1) * 4096] == bytes([i + 1]) * 4096 for i in range(20))


# -- shutdown ----------------------------------------------------------------------


async def test_a_client_that_half_closes_still_gets_every_reply(
    tmp_path: Path, serve: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that shuts down its sending side after its last request (no DISC) and
    reads on: each request it sent is answered, then the server closes (nbdkit does the
    same; the shim used to close at once and drop the replies of requests it ran)."""
    slow_datasync(monkeypatch, 0.2)  # the FUA writes are still running at the EOF
    path = disk(tmp_path)
    s = await serve(path, max_inflight=4)  # and some wait in the codec, not yet started
    c = await RawClient.open(s.socket, "disk0.img")
    for i in range(10):
        c.send_request(Cmd.WRITE, i, i * 4096, 4096, bytes([i + 1]) * 4096, CmdFlag.FUA)
    c.send_request(Cmd.FLUSH, 10)
    c.send_request(Cmd.WRITE, 11, 0, 4096, b"cut")  # incomplete: never answered
    await c.writer.drain()
    c.writer.write_eof()
    replies = sorted([(await c.read_reply())[:2] for _ in range(11)])
    assert replies == [(i, 0) for i in range(11)]
    assert await c.closed_by_server()
    assert path.read_bytes()[: 10 * 4096] == b"".join(bytes([i + 1]) * 4096 for i in range(10))
    await assert_serves(s.socket)


async def test_aclose_finishes_inflight_requests_then_closes(
    tmp_path: Path, serve: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await serve(disk(tmp_path))
    c = await RawClient.open(s.socket, "disk0.img")
    waiting = await RawClient.connect(s.socket)  # still in the handshake
    await waiting.greet()
    assert await c.request(Cmd.WRITE, 0, 4, b"last") == (0, b"")
    slow_datasync(monkeypatch, 0.3)
    c.send_request(Cmd.FLUSH, 7)
    await c.writer.drain()
    await asyncio.sleep(0.05)  # the flush is in flight
    closing = asyncio.ensure_future(s.server.aclose())
    await asyncio.sleep(0.05)
    c.send_request(Cmd.READ, 8, 0, 4)  # arrives during shutdown
    replies = {}
    for _ in range(2):
        handle, error, _ = await c.read_reply()
        replies[handle] = error
    assert replies == {7: 0, 8: Errno.ESHUTDOWN}
    await closing
    assert await c.closed_by_server()
    assert await waiting.closed_by_server()
    assert not await asyncio.to_thread(os.path.exists, s.socket)
    assert s.journal.durable_lsn == s.journal.last_lsn
