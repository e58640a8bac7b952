"""Fuzzing the NBD server: the sans-IO codec (handshake and transmission) and a real
NbdServer on a unix socket, fed arbitrary and mutated client streams.

The oracle is a reference reading of the client stream written from the NBD spec
(NetworkBlockDevice ``doc/proto.md``) and the limits ``proto.py`` documents
(``MAX_OPTION_DATA``, ``MAX_SKIP``, ``max_request``): it decides where the handshake
ends, which export is chosen, and which requests follow, up to the first protocol
error. The codec must hand out exactly those requests, raising nothing but
``NbdClientError``; and the server must call the export exactly for the requests
the spec calls valid: never a write, trim or zeroing for garbage, for a request that
was not complete, for a read-only export, out of bounds or with unknown flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import select
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st

from replicator.engine.nbd.proto import (
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_SKIP,
    NEED_DATA,
    REQUEST_MAGIC,
    REQUEST_SIZE,
    BlockSize,
    Cmd,
    CmdFlag,
    Disconnect,
    NbdClientError,
    OptionAbort,
    OptionExportName,
    OptionGo,
    OptionList,
    OptionOther,
    OversizedRequest,
    Phase,
    Rep,
    Request,
    ServerConnection,
    TransmissionFlag,
    check_request,
)
from replicator.engine.nbd.server import NbdServer
from tests.fuzz import support

MAX_REQUEST = 64 * 1024
RW_SIZE = 1 << 20
RO_SIZE = 64 * 1024
_T = TransmissionFlag
RW_FLAGS = int(
    _T.SEND_FLUSH | _T.SEND_FUA | _T.SEND_TRIM | _T.SEND_WRITE_ZEROES | _T.CAN_MULTI_CONN
)
RO_FLAGS = RW_FLAGS | int(_T.READ_ONLY)
EXPORTS = {"rw": (RW_SIZE, RW_FLAGS), "ro": (RO_SIZE, RO_FLAGS)}
BLOCK = BlockSize.for_max_request(MAX_REQUEST)

_OPT = struct.Struct(">QII")
_REQ = struct.Struct(">IHHQQI")


# --- the reference reading of a client stream (from the spec) -----------------------------


@dataclass
class Reading:
    """What a client stream says, read by the spec.

    ``export``: the export transmission started on (None: it never did); ``requests``:
    the transmission-phase requests in order (a WRITE with its payload), as
    (cmd, flags, handle, offset, length, data); ``oversized``: their indexes that exceed
    ``max_request`` (refused, payload skipped); ``error``: the stream breaks the
    protocol at some point (the server hangs up there).
    """

    export: str | None = None
    requests: list[tuple[int, int, int, int, int, bytes]] = field(default_factory=list)
    oversized: set[int] = field(default_factory=set)
    error: bool = False
    ended: bool = False  # ABORT, DISC, or a refused EXPORT_NAME: nothing more is read


def lookup(name: bytes, exports: dict[str, tuple[int, int]]) -> str | None:
    """An export name is a UTF-8 string without NUL, at most 4096 bytes (spec: strings);
    "" names the default export, which exists only when there is one export."""
    if len(name) > 4096 or b"\0" in name:
        return None
    try:
        text = name.decode()
    except UnicodeDecodeError:
        return None
    if text == "" and len(exports) == 1:
        return next(iter(exports))
    return text if text in exports else None


def go_export(data: bytes, exports: dict[str, tuple[int, int]]) -> str | None:
    """NBD_OPT_GO data: u32 name length, name, u16 n, n x u16 info requests."""
    if len(data) < 4:
        return None
    (n,) = struct.unpack_from(">I", data)
    if len(data) < 4 + n + 2:
        return None
    (count,) = struct.unpack_from(">H", data, 4 + n)
    if len(data) != 4 + n + 2 + 2 * count:
        return None
    return lookup(data[4 : 4 + n], exports)


def read_handshake(stream: bytes, exports: dict[str, tuple[int, int]]) -> tuple[Reading, int]:
    """The handshake part: (reading so far, offset where transmission starts)."""
    out = Reading()
    if len(stream) < 4:
        return out, len(stream)
    (flags,) = struct.unpack_from(">I", stream)
    if flags & ~0b11:  # FIXED_NEWSTYLE, NO_ZEROES: anything else is unknown
        out.error = True
        return out, len(stream)
    pos = 4
    while len(stream) - pos >= _OPT.size:
        magic, option, length = _OPT.unpack_from(stream, pos)
        if magic != IHAVEOPT or length > MAX_OPTION_DATA:
            out.error = True
            return out, len(stream)
        if len(stream) - pos - _OPT.size < length:
            break
        data = stream[pos + _OPT.size : pos + _OPT.size + length]
        pos += _OPT.size + length
        if option == 1:  # EXPORT_NAME: the export, or a hang-up (it has no error reply)
            out.export = lookup(data, exports)
            out.ended = out.export is None
            return out, pos
        if option == 2:  # ABORT
            out.ended = True
            return out, pos
        if option == 7:  # GO (INFO = 6 only informs)
            out.export = go_export(data, exports)
            if out.export is not None:
                return out, pos
    return out, len(stream)


def read_requests(stream: bytes, pos: int, out: Reading, max_request: int) -> Reading:
    """Transmission: 28-byte requests, a WRITE followed by its payload. A WRITE beyond
    ``max_request`` is refused and its payload skipped (up to MAX_SKIP; beyond that
    the length cannot be trusted: hang up); so is a READ beyond it (no payload)."""
    while len(stream) - pos >= REQUEST_SIZE:
        magic, flags, cmd, handle, offset, length = _REQ.unpack_from(stream, pos)
        if magic != REQUEST_MAGIC:
            out.error = True
            break
        pos += REQUEST_SIZE
        if cmd == Cmd.DISC:
            out.ended = True
            break
        data = b""
        if cmd == Cmd.WRITE and length <= max_request:
            if len(stream) - pos < length:
                break
            data = stream[pos : pos + length]
            pos += length
        elif cmd == Cmd.WRITE:
            if length > MAX_SKIP:
                out.error = True
                break
            if len(stream) - pos < length:
                break  # refused only once its payload is through (a client is still sending)
            pos += length
            out.oversized.add(len(out.requests))
        elif cmd == Cmd.READ and length > max_request:
            out.oversized.add(len(out.requests))
        out.requests.append((cmd, flags, handle, offset, length, data))
    return out


def read_stream(
    stream: bytes, exports: dict[str, tuple[int, int]] = EXPORTS, max_request: int = MAX_REQUEST
) -> Reading:
    out, pos = read_handshake(stream, exports)
    if out.export is None:
        return out
    return read_requests(stream, pos, out, max_request)


def spec_error(cmd: int, flags: int, offset: int, length: int, size: int, tflags: int) -> int:
    """The error a request deserves before it touches the export (0: it may run).

    The spec: a command or flag the server did not advertise is EINVAL; a write to a
    read-only export EPERM; a WRITE or WRITE_ZEROES beyond the end ENOSPC, a READ or TRIM
    beyond it EINVAL;
    FLUSH has offset and length 0. proto.py adds: length 0 is EINVAL.
    """
    fua = int(CmdFlag.FUA) if tflags & _T.SEND_FUA else 0
    advertised: dict[int, tuple[bool, int]] = {
        Cmd.READ: (True, fua),
        Cmd.WRITE: (True, fua),
        Cmd.FLUSH: (bool(tflags & _T.SEND_FLUSH), fua),
        Cmd.TRIM: (bool(tflags & _T.SEND_TRIM), fua),
        Cmd.WRITE_ZEROES: (bool(tflags & _T.SEND_WRITE_ZEROES), fua | int(CmdFlag.NO_HOLE)),
    }
    known, allowed = advertised.get(cmd, (False, 0))
    if not known or flags & ~allowed:
        return errno.EINVAL
    if cmd == Cmd.FLUSH:
        return errno.EINVAL if offset or length else 0
    mutates = cmd != Cmd.READ
    if mutates and tflags & _T.READ_ONLY:
        return errno.EPERM
    if length == 0:
        return errno.EINVAL
    if offset + length > size:
        return errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else errno.EINVAL
    return 0


def expected_calls(reading: Reading) -> list[tuple[Any, ...]]:
    """The export calls the requests of a reading deserve, in order."""
    if reading.export is None:
        return []
    size, tflags = EXPORTS[reading.export]
    calls: list[tuple[Any, ...]] = []
    for i, (cmd, flags, _, offset, length, data) in enumerate(reading.requests):
        if i in reading.oversized or spec_error(cmd, flags, offset, length, size, tflags):
            continue
        fua = bool(flags & CmdFlag.FUA)
        if cmd == Cmd.READ:
            calls.append(("read", offset, length))
        elif cmd == Cmd.WRITE:
            calls.append(("write", offset, data, fua))
        elif cmd == Cmd.WRITE_ZEROES:
            calls.append(("zero", offset, length, fua, not flags & CmdFlag.NO_HOLE))
        elif cmd == Cmd.TRIM:
            calls.append(("trim", offset, length, fua))
        else:
            calls.append(("flush",))
    return calls


MUTATING = ("write", "zero", "trim")


# --- client streams -----------------------------------------------------------------------

_names = st.sampled_from(
    [b"rw"] * 5 + [b"ro"] * 2 + [b"", b"nope", b"r\0w", b"\xff\xfe", b"rw" * 3, bytes(5000)]
)
_offsets = st.one_of(
    st.integers(0, RO_SIZE),
    st.integers(0, RW_SIZE + 4096),
    st.sampled_from([0, 1, 511, 512, RO_SIZE - 1, RO_SIZE, RW_SIZE - 1, RW_SIZE, 2**63, 2**64 - 1]),
)
_lengths = st.one_of(
    st.integers(1, 4096),
    st.integers(0, 70_000),
    st.sampled_from([0, 1, 4, 512, 4096, MAX_REQUEST, MAX_REQUEST + 1, MAX_SKIP + 1, 2**32 - 1]),
)
_cmds = st.one_of(
    st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES]),
    st.sampled_from([Cmd.DISC, Cmd.CACHE, Cmd.BLOCK_STATUS, Cmd.RESIZE, 9, 0xFFFF]),
    st.integers(0, 0xFFFF),
)
_cmd_flags = st.one_of(st.sampled_from([0, 0, 0, 1, 2, 3]), st.integers(0, 0xFFFF))


def option(opt: int, data: bytes = b"") -> bytes:
    return _OPT.pack(IHAVEOPT, opt, len(data)) + data


def go(opt: int, name: bytes, infos: tuple[int, ...] = ()) -> bytes:
    body = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
    return option(opt, body + b"".join(struct.pack(">H", i) for i in infos))


@st.composite
def handshakes(draw: st.DrawFn) -> bytes:
    """Client flags, a few options, and (usually) GO or EXPORT_NAME."""
    flags = draw(st.sampled_from([1, 3, 3, 3, 0, 1, 3, -1]))
    if flags < 0:
        flags = draw(st.integers(0, 2**32 - 1))
    out = [struct.pack(">I", flags)]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["list", "info", "other", "struct", "go-unknown", "bad-go"]))
        if kind == "list":
            out.append(option(3, draw(st.sampled_from([b"", b"x"]))))
        elif kind == "info":
            out.append(go(6, draw(_names), (0, 3)))
        elif kind == "other":
            out.append(option(draw(st.integers(0, 2**32 - 1)), draw(st.binary(max_size=40))))
        elif kind == "struct":
            out.append(option(8))
        elif kind == "go-unknown":
            out.append(go(7, b"nope"))
        else:
            out.append(option(7, draw(st.binary(max_size=12))))
    final = draw(st.sampled_from(["go"] * 6 + ["export-name"] * 2 + ["abort", "none"]))
    if final == "go":
        out.append(go(7, draw(_names), draw(st.sampled_from([(), (3,), (0, 1, 2)]))))
    elif final == "export-name":
        out.append(option(1, draw(_names)))
    elif final == "abort":
        out.append(option(2))
    return b"".join(out)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Transmission-phase requests, valid and invalid, with payloads for WRITEs."""
    out = []
    for _ in range(draw(st.integers(0, 6))):
        cmd: int
        if draw(st.booleans()):  # one the spec calls valid (on "rw"; "ro" refuses writes)
            cmd = draw(st.sampled_from([Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.READ]))
            flags = draw(st.sampled_from([0, 1, 2, 3] if cmd == Cmd.WRITE_ZEROES else [0, 1]))
            length = draw(st.integers(1, 4096))
            offset = draw(st.integers(0, RO_SIZE - length))
        else:
            cmd, flags, offset = draw(_cmds), draw(_cmd_flags), draw(_offsets)
            length = draw(_lengths)
        handle = draw(st.integers(0, 2**64 - 1))
        out.append(_REQ.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length))
        if cmd == Cmd.WRITE:
            if length <= 8192:
                out.append(draw(st.binary(min_size=length, max_size=length)))
            else:  # a long payload, sent in part (skipped, or the request stays incomplete)
                out.append(bytes(draw(st.integers(0, 3000))))
    if draw(st.booleans()):
        out.append(_REQ.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0))
    out.append(draw(st.binary(max_size=draw(st.sampled_from([0, 0, 8, 40])))))
    return b"".join(out)


def client_streams() -> st.SearchStrategy[bytes]:
    """Garbage; a handshake and requests; the same with the requests mutated (the
    handshake intact); the same with any byte mutated."""
    flags = st.integers(0, 3).map(struct.Struct(">I").pack)
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(flags, st.binary(max_size=200)).map(b"".join),
        st.tuples(handshakes(), requests()).map(b"".join),
        st.tuples(handshakes(), requests().flatmap(support.mutations)).map(b"".join),
        st.tuples(handshakes(), requests()).map(b"".join).flatmap(support.mutations),
    )


def transmission_streams() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=200), requests(), requests().flatmap(support.mutations))


# --- the sans-IO codec ------------------------------------------------------------------


def state_of(codec: ServerConnection) -> Phase:
    """The state, read through a call (so mypy does not narrow it across calls)."""
    return codec.state


class CodecRun:
    """Drives a ServerConnection as server.py does (same answers), checking each event."""

    def __init__(
        self,
        transmission: str | None = None,
        direct_payload: int = MAX_REQUEST,
        read_size: int = MAX_REQUEST,
    ) -> None:
        self.codec = ServerConnection(
            max_request=MAX_REQUEST, direct_payload=direct_payload, read_size=read_size
        )
        self.export: str | None = None
        self.requests: list[tuple[int, int, int, int, int, bytes]] = []
        self.oversized: set[int] = set()
        self.error = False
        self.ended = False
        if transmission is not None:  # a proper handshake first
            self.feed(struct.pack(">I", 3) + go(7, transmission.encode()))
            assert self.codec.state is Phase.TRANSMISSION and self.export == transmission

    def feed(self, data: bytes) -> None:
        self.codec.receive_data(data)
        self.drain()

    def drain(self) -> None:
        codec = self.codec
        while True:
            state = codec.state
            try:
                event = codec.next_event()
            except NbdClientError:
                assert not self.error and codec.state is Phase.ERROR
                self.error = True
                continue  # after an error: NEED_DATA, for good
            if event is NEED_DATA:
                self.check_buffer()
                return
            assert not self.error and not self.ended, f"{event!r} after the end"
            self.answer(event, state)

    def check_buffer(self) -> None:
        """What waits in the buffer is less than one option or one request."""
        held = self.codec.buffered
        state = self.codec.state
        if state is Phase.CLIENT_FLAGS:
            assert held < 4
        elif state is Phase.OPTIONS:
            assert held < 16 + MAX_OPTION_DATA
        elif state is Phase.TRANSMISSION:
            assert held < REQUEST_SIZE + MAX_REQUEST
        assert state is not Phase.OPTION_PENDING  # every option was answered

    def answer(self, event: object, state: Phase) -> None:
        codec = self.codec
        if isinstance(event, Request | OversizedRequest):
            assert state is Phase.TRANSMISSION and codec.state is Phase.TRANSMISSION
            assert 0 <= event.cmd <= 0xFFFF and 0 <= event.flags <= 0xFFFF
            data = b""
            if isinstance(event, Request):
                assert event.length == len(event.data) if event.cmd == Cmd.WRITE else not event.data
                data = bytes(event.data)
                size, tflags = EXPORTS[self.export or ""]
                got = check_request(event, size, tflags)
                want = spec_error(event.cmd, event.flags, event.offset, event.length, size, tflags)
                assert got == want, (event[:5], got, want)
            else:
                assert event.length > MAX_REQUEST and event.cmd in (Cmd.READ, Cmd.WRITE)
                self.oversized.add(len(self.requests))
            self.requests.append(
                (event.cmd, event.flags, event.handle, event.offset, event.length, data)
            )
        elif isinstance(event, Disconnect):
            assert codec.state is Phase.CLOSED
            self.ended = True
        elif isinstance(event, OptionGo):
            assert state_of(codec) is Phase.OPTION_PENDING
            if event.name in EXPORTS:
                size, tflags = EXPORTS[event.name]
                assert codec.accept_go(event, size, tflags, BLOCK)
                if event.go:
                    assert state_of(codec) is Phase.TRANSMISSION
                    self.export = event.name
            else:
                codec.reply_error(event.option, Rep.ERR_UNKNOWN, "no such export")
        elif isinstance(event, OptionExportName):
            if event.name in EXPORTS:
                size, tflags = EXPORTS[event.name]
                codec.accept_export_name(size, tflags)
                self.export = event.name
            else:
                assert codec.reject_export_name() == b""
                self.ended = True
        elif isinstance(event, OptionList):
            codec.reply_list(sorted(EXPORTS))
        elif isinstance(event, OptionAbort):
            codec.reply_abort()
            self.ended = True
        else:
            assert isinstance(event, OptionOther), event
            rep = Rep.ERR_INVALID if event.invalid is not None else Rep.ERR_UNSUP
            codec.reply_error(event.option, rep, event.invalid or "unsupported")

    def finish(self) -> Reading:
        if self.ended or self.error:  # nothing more is read
            assert self.codec.state in (Phase.CLOSED, Phase.ERROR)
            self.codec.receive_data(b"more bytes after the end")
            assert self.codec.next_event() is NEED_DATA
            self.drain()
        return Reading(self.export, self.requests, self.oversized, self.error, self.ended)


def codec_reading(stream: bytes, seed: int, transmission: str | None = None) -> Reading:
    rnd = random.Random(seed)
    # payloads from this size on are read into buffers of their own, and the receive
    # buffer compacts and grows around reads this small (the defaults are larger than
    # anything here, so draw them: 1 sends every payload to its own buffer)
    run = CodecRun(
        transmission,
        direct_payload=rnd.choice([1, 3, 512, MAX_REQUEST]),
        read_size=rnd.choice([1, 7, 100, MAX_REQUEST]),
    )
    for chunk in support.splits(rnd, stream):
        run.feed(chunk)
    return run.finish()


def same_reading(got: Reading, want: Reading) -> None:
    assert got.export == want.export
    assert got.requests == want.requests
    assert got.oversized == want.oversized
    assert got.error == want.error


def handshake_then_requests(stream: bytes, seed: int) -> None:
    support.tick()
    got = codec_reading(stream, seed)
    want = read_stream(stream)
    same_reading(got, want)
    if want.ended and want.export is None:
        assert got.ended


@pytest.mark.parametrize("prof", support.profiles(500, 18_000))
def test_codec_reads_a_client_stream_as_the_spec_does(prof: settings) -> None:
    support.run(prof, handshake_then_requests, client_streams(), support.SEEDS)


def requests_after_go(export: str, stream: bytes, seed: int) -> None:
    support.tick()
    got = codec_reading(stream, seed, transmission=export)
    want = read_requests(stream, 0, Reading(export), MAX_REQUEST)
    same_reading(got, want)
    assert got.ended == want.ended


@pytest.mark.parametrize("prof", support.profiles(500, 16_000))
def test_codec_reads_requests_as_the_spec_does(prof: settings) -> None:
    support.run(
        prof,
        requests_after_go,
        st.sampled_from(["rw", "ro"]),
        transmission_streams(),
        support.SEEDS,
    )


# --- a real server on a unix socket -----------------------------------------------------------


class RecordingExport:
    """An in-memory export that records every call the server makes."""

    def __init__(self, name: str, size: int, flags: int, calls: list[tuple[Any, ...]]) -> None:
        self._name, self._size, self._flags = name, size, flags
        self.calls = calls

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    @property
    def flags(self) -> int:
        return self._flags

    async def read(self, offset: int, length: int) -> bytes:
        self.calls.append(("read", offset, length))
        return bytes(length)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        self.calls.append(("write", offset, bytes(data), fua))

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool) -> None:
        self.calls.append(("zero", offset, length, fua, may_trim))

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        self.calls.append(("trim", offset, length, fua))

    async def flush(self) -> None:
        self.calls.append(("flush",))

    async def aclose(self) -> None:
        pass


class ServerThread:
    """An NbdServer on its own event loop thread, with recording exports."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls: dict[str, list[tuple[Any, ...]]] = {name: [] for name in EXPORTS}
        exports = {
            name: RecordingExport(name, size, flags, self.calls[name])
            for name, (size, flags) in EXPORTS.items()
        }
        self.server = NbdServer(exports, max_request=MAX_REQUEST, handshake_timeout=10.0)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start_unix(path))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def settle(self) -> None:
        """Wait until every connection is gone (its requests done) and the loop is idle."""

        async def idle() -> None:
            for _ in range(1000):
                if not self.server._connections:
                    break
                await asyncio.sleep(0.001)
            assert not self.server._connections, "a connection outlived its client"
            await asyncio.sleep(0)

        self.call(idle())

    def take_calls(self) -> dict[str, list[tuple[Any, ...]]]:
        out = {name: list(calls) for name, calls in self.calls.items()}
        for calls in self.calls.values():
            calls.clear()
        return out

    def close(self) -> None:
        self.call(self.server.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="module")
def nbd_server() -> Iterator[ServerThread]:
    # a short directory: a unix socket path must fit in 108 bytes, tmp_path may not
    sockdir = tempfile.mkdtemp(prefix="nbdfuzz", dir="/tmp")
    server = ServerThread(os.path.join(sockdir, "s"))
    yield server
    server.close()
    shutil.rmtree(sockdir, ignore_errors=True)


def talk(path: str, stream: bytes, timeout: float = 20.0) -> None:
    """Send ``stream``, then FIN; read (and drop) everything until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.setblocking(False)
        sent, writing = 0, True
        if not stream:
            sock.shutdown(socket.SHUT_WR)
            writing = False
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLOUT)
        deadline = timeout * 1000
        while True:
            ready = poller.poll(deadline)
            assert ready, "the server neither read nor closed"
            _, mask = ready[0]
            if mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
                try:
                    if not sock.recv(1 << 20):
                        return
                except (ConnectionResetError, BlockingIOError):
                    pass
                except OSError as exc:  # pragma: no cover - unexpected
                    raise AssertionError(f"reading from the server: {exc}") from exc
            if writing and mask & select.POLLOUT:
                try:
                    sent += sock.send(stream[sent : sent + 65536])
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    sent = len(stream)  # it hung up: what is left is never read
                if sent >= len(stream):
                    writing = False
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                    poller.modify(sock, select.POLLIN)


def server_calls_only_what_the_spec_allows(server: ServerThread, stream: bytes) -> None:
    """The export calls are the ones the spec reading asks for, in order: all of them, or
    (a client that half-closes may not wait for them) the first ones. Either way not
    one write, trim or zeroing more."""
    support.tick()
    talk(server.path, stream)
    server.settle()
    calls = server.take_calls()
    reading = read_stream(stream)
    for name, got in calls.items():
        want = expected_calls(reading) if reading.export == name else []
        assert got == want[: len(got)], (name, reading)
        event(f"export calls: {'all' if got == want else 'first ones'}")
    assert not [c for c in calls["ro"] if c[0] in MUTATING]


@pytest.mark.parametrize("prof", support.profiles(300, 8_000))
def test_server_changes_an_export_only_for_valid_requests(
    nbd_server: ServerThread, prof: settings
) -> None:
    def body(stream: bytes) -> None:
        server_calls_only_what_the_spec_allows(nbd_server, stream)

    support.run(prof, body, client_streams())


def test_garbage_never_reaches_an_export(nbd_server: ServerThread) -> None:
    """Random bytes that never complete a handshake: not one call on any export."""
    rnd = random.Random(20260)
    for _ in range(200):
        support.tick()
        stream = rnd.randbytes(rnd.randint(0, 300))
        talk(nbd_server.path, stream)
        nbd_server.settle()
        assert read_stream(stream).export is None
        assert nbd_server.take_calls() == {name: [] for name in EXPORTS}
