"""The asyncio adapter: the only place in the transport that does I/O.

``FramedConnection`` drives a sans-IO ``ProtocolConnection`` over an asyncio transport
(TCP, unix socket, socketpair, or TLS around any of them) through a
``BufferedProtocol``, so large frames are read straight into their own buffer.

Flow control, both ways:
* writing: ``send`` writes a frame and waits while the transport's buffer is above
  its high-water mark (``drain``);
* reading: reading pauses while a complete frame waits for ``recv``, so a peer
  cannot fill our memory faster than the engine consumes messages.

Credit: the engine waits for ``Credit`` messages itself (the sender's reader task
sees them); ``FramedConnection.credit`` mirrors the protocol's count for checks.

Encoding runs in the event loop (about 1.5 ms per MiB of compressible payload, 0.15 ms
when incompressible); ``offload=`` moves it to a worker thread for large bulk frames.

Shaping: an optional ``shaper`` (anything with ``async acquire(nbytes)``) is awaited
before each bulk frame (Records, Manifest) with its wire size. Control frames (acks,
credit, pings, goodbye) never wait for it. Bulk frames keep their order among
themselves; final frames (Goodbye, Error, Refuse) wait for bulk frames in progress. A bulk
frame whose send is cancelled while it waits for the shaper never goes (nothing of it was
written or counted), and the connection stays usable.

Silence: ``abort_when_silent(seconds)`` cuts the connection once no message has come from
the peer for that long, so that every task waiting on it wakes, a send blocked in
``drain`` included (a peer gone without a reset: a path that drops packets, a host cut off,
sends no RST, and TCP retransmits for about 15 minutes before it gives up).

Strangers: ``serve`` keeps at most ``max_pending`` connections whose peer has not
completed its part of the handshake (closing one of them to make room for a new one: the
oldest of the source address holding the most, so one flooding address evicts its own),
and aborts any that has not done so within ``handshake_timeout``. Together with the
frame limits of ``ProtocolConnection`` this bounds what peers that never say Hello can
make a receiver hold (docs/PROTOCOL.md, "Memory bounds").

TLS on a server (``serve(ssl=...)``): each accepted TCP connection gets its TLS layer
from us, not from ``create_server``, so a connection still in its TLS handshake is one of
those pending connections too (same count, same deadline), and the handler runs only
once the handshake has succeeded: a peer whose certificate is refused never reaches it.
``ssl`` may be a function returning the context, called at every accept (certificates
replaced on disk take effect without a restart). A peer that speaks our plaintext
protocol to a TLS server is answered with ``Refuse("auth")`` saying so.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import socket
import ssl as _ssl
import struct
import termios
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import structlog

from replicator.transport.compression import CompressionChoice
from replicator.transport.errors import CERT_PROBLEMS as CERT_PROBLEMS
from replicator.transport.errors import ConnectionClosedError as ConnectionClosedError
from replicator.transport.errors import DialError as DialError
from replicator.transport.frames import DEFAULT_MAX_FRAME, FRAME_MAGIC, LocalProtocolError
from replicator.transport.messages import (
    PAYLOAD_FIELD,
    Error,
    Goodbye,
    Message,
    Refuse,
)
from replicator.transport.protocol import (
    DEFAULT_WINDOW,
    ConnectionClosed,
    NeedData,
    ProtocolConnection,
    Role,
    State,
    TransferStats,
)

log = structlog.get_logger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_CLOSE_TIMEOUT = 5.0
# serve(): connections whose peer has not sent its handshake message yet. A legitimate
# peer sends its Hello right after connecting, so it spends about a round trip in this
# state. Measured on the receiver (uvloop, its real handler): 14 KiB of RSS for one that
# sends nothing or a bare prefix, 73 KiB for one that sent 65,000 bytes of a maximal
# Hello; so 64 of them hold 0.9 MiB, 4.6 MiB at worst.
DEFAULT_MAX_PENDING = 64
# serve(): a peer that has not completed its part of the handshake (its Hello arrived
# and was read) within this long is cut off, so a silent peer cannot hold a slot. It
# does not cover our own answer: a receiver may take seconds to open a job.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# The window in which closing pending connections to make room counts as one burst: one
# warning when it starts, one with the count when it ends.
_BURST_WINDOW = 10.0
# Lingering close: a peer's late input is read into this and dropped. A peer that never
# completed the handshake has nothing worth reading fast.
_DISCARD = 64 * 1024
_DISCARD_STRANGER = 4 * 1024
# glibc keeps memory freed by a session with large frames in its heaps (the frames, and
# the engine's records behind them, are mid-size allocations that raise its dynamic mmap
# threshold, so later ones come from the heap, not from mmap). Measured on a receiver
# (in-process): 4 concurrent initial syncs of 128 MiB left it at 223 MiB RSS, up from
# 35 MiB, with 0.4 MiB of live Python objects; malloc_trim(0) took 3-6 ms and brought it
# back to 35 MiB. So once a connection whose input buffers reached _TRIM_FROM is gone,
# memory is trimmed _TRIM_AFTER seconds later (once for any number of such connections;
# the engine frees what it held for the session meanwhile).
_TRIM_FROM = 1024 * 1024
_TRIM_AFTER = 1.0
# Transport write buffer marks: a few frames may queue in user space, so encoding the
# next frame overlaps with the kernel sending the previous one.
WRITE_HIGH_WATER = 4 * 1024 * 1024
WRITE_LOW_WATER = 1024 * 1024

# offload=N: bulk frames with a payload of N bytes or more are encoded (lz4, blake3) in a
# worker thread, so the loop stays free while they compress. Off by default: measured on
# 2 shared cores it costs 20-30% of throughput (the thread hop, and the second core is
# busy anyway); it pays when the sender's loop has other CPU work and a core to spare.
DEFAULT_OFFLOAD: int | None = None

Handler = Callable[["FramedConnection"], Awaitable[None]]
# serve(ssl=...): a context, or a function returning one (called at every accept)
ServerTls = _ssl.SSLContext | Callable[[], _ssl.SSLContext]
# serve(on_refused=...): told why a connection was refused before its handler ran
Refused = Callable[[str], None]
# what a TLS receiver answers a peer that speaks our protocol in plaintext
PLAINTEXT_REFUSAL = (
    "this receiver accepts TLS connections only: give the sender --tls-dir DIR with keys "
    "from `replicator keygen --out DIR` (the receiver's CA)"
)
# served TLS: asyncio's TLS read size once the handshake is done; before, a small buffer
_TLS_READ_BUFFER = 256 * 1024
_TLS_HANDSHAKE_BUFFER = 16 * 1024
# a peer refused that way: how long its remaining input is read and dropped, so that the
# refusal is not lost to a reset
_REFUSAL_LINGER = 2.0


class Shaper(Protocol):
    """A rate limiter for bulk frames (e.g. a token bucket); awaited before each one."""

    async def acquire(self, nbytes: int) -> None: ...


def _shaper_rate(shaper: Shaper | None) -> float | None:
    """The rate a shaper holds the link to (bytes/s), when it says (a TokenBucket does)."""
    rate = getattr(shaper, "effective_rate", None)
    return float(rate) if isinstance(rate, int | float) else None


class FramedConnection:
    """One replication connection over an asyncio transport.

    Concurrency: any number of tasks may ``send`` (frames are written whole and in
    call order); only one task may ``recv`` at a time.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        window: int = DEFAULT_WINDOW,
        compress: bool = True,
        shaper: Shaper | None = None,
        offload: int | None = DEFAULT_OFFLOAD,
        peer: str = "?",
    ) -> None:
        self.role = role
        self.protocol = ProtocolConnection(
            role, max_frame=max_frame, window=window, compress=compress
        )
        self.peer = peer
        self.last_received = time.monotonic()  # when the peer's last message arrived
        self._shaper = shaper
        self._offload = offload
        # lz4 per connection: off while the CPU, not the link, would be the bottleneck
        self._may_compress = compress
        self.compression = CompressionChoice()
        self._bulk_ended = 0.0  # perf_counter when the last bulk frame's send returned
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._bulk_lock = asyncio.Lock()
        self._reading = False  # a recv() is in progress
        self._read_waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost = False
        self._lost_exc: BaseException | None = None
        self._closed = asyncio.Event()  # set by connection_lost
        self._closing = False
        self._writelines = False
        self._written = 0  # bytes handed to the transport (``delivered``)
        self._discard: bytearray | None = None  # set by a lingering close: input is dropped
        self._abort_reason: str | None = None  # why we cut the connection, for recv errors
        self._evicted = False  # serve() closed it to make room for a newer one
        self._silence: float | None = None  # abort_when_silent: the silence allowed ...
        self._silence_from = 0.0  # ... counted from the later of this and last_received
        self._silence_timer: asyncio.TimerHandle | None = None
        # set by serve() while the peer has not completed its part of the handshake
        self._pending_over: Callable[[FramedConnection], None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        # serve(ssl=...): the TCP transport under TLS, known before the TLS handshake is done
        # (``_transport`` is the TLS one, set once it is)
        self._raw_transport: asyncio.Transport | None = None

    # -- public API ---------------------------------------------------------------------------

    @property
    def credit(self) -> int:
        """Sender: payload bytes it may still send (see ProtocolConnection.credit)."""
        return self.protocol.credit

    @property
    def state(self) -> State:
        return self.protocol.state

    @property
    def stats(self) -> TransferStats:
        return self.protocol.stats

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the stream so far, framing included."""
        return self.protocol.stats.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.protocol.stats.bytes_received

    def delivered(self) -> int | None:
        """Bytes of ours the peer's side took: those handed to the transport, less what
        still waits in its buffer and in the kernel's send queue (which keeps what the
        peer's TCP has not acknowledged). It stops growing when the peer reads nothing
        (its window closed: stopped, stuck) or the network between us drops everything;
        a stopping sender tells a slow link from a dead one by it (engine/link.py). None
        when it cannot be measured (no socket, closed). Under TLS the ciphertext already
        handed to the TCP transport counts as taken: a bounded error (its buffer's limit)."""
        transport = self._transport
        if transport is None or self._lost or self._closing:
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
        except (OSError, ValueError):
            return None
        queued: int = struct.unpack("i", raw)[0]
        return self._written - transport.get_write_buffer_size() - queued

    @property
    def closed(self) -> bool:
        return self._closing or self._lost

    async def send(self, msg: Message) -> None:
        """Send one message, then wait while the write buffer is full (backpressure).

        Raises LocalProtocolError if the protocol forbids it, ConnectionClosedError when
        the connection is gone.
        """
        self._check_writable()
        bulk = type(msg) in PAYLOAD_FIELD  # Records, Manifest
        if not bulk and not (
            isinstance(msg, Goodbye | Error | Refuse) and self._bulk_lock.locked()
        ):
            # control frames go out at once, never behind a shaped or encoding bulk frame
            self._write(self.protocol.send(msg))
            await self._drain()
            return
        async with self._bulk_lock:  # bulk frames, and final frames behind them, keep order
            encoded = None
            choice = self.compression
            cap = _shaper_rate(self._shaper)
            compress = self.protocol.compress = self._may_compress and bulk and choice.use(cap)
            level = self.protocol.compress_level = choice.level(cap) if compress else 0
            started = time.perf_counter()
            try:
                if self._offload is not None and _payload_size(msg) >= self._offload:
                    encoded = await asyncio.to_thread(self.protocol.encode, msg)
                else:
                    encoded = self.protocol.encode(msg)
            except LocalProtocolError:
                encoded = None  # send() below raises it again and records the failure
            else:
                choice.observe(
                    encoded.payload_raw,
                    encoded.payload_wire,
                    time.perf_counter() - started,
                    encoded.lz4_ran,  # not ``compress``: a frame the samples skipped is raw
                    level,
                )
            encode_seconds = time.perf_counter() - started
            if bulk and self._shaper is not None and encoded is not None:
                # tokens first, then the protocol counts the frame as sent: a wait cancelled
                # here (a sender stopping while paused at rate 0) leaves the stream usable
                # for the Goodbye, the frame never went
                await self._shaper.acquire(sum(map(len, encoded.buffers)))
            self._check_writable()
            self._write(self.protocol.send(msg, encoded=encoded))
            drain_from = time.perf_counter()
        await self._drain()
        if bulk and encoded is not None:  # what the frame's sending says of the link: lz4's choice
            ended = time.perf_counter()
            between = started - self._bulk_ended if self._bulk_ended else 0.0
            choice.observe_send(encoded.wire_size, encode_seconds, ended - drain_from, between)
            self._bulk_ended = ended

    def send_now(self, msg: Message) -> None:
        """Write a control message (a heartbeat) at once, without waiting while the write
        buffer is full: for a caller that must not be held by a peer reading nothing.
        Raises as ``send`` does; bulk messages go through ``send``."""
        if type(msg) in PAYLOAD_FIELD:
            raise LocalProtocolError(f"{type(msg).__name__} is sent with send(), in order")
        self._check_writable()
        self._write(self.protocol.send(msg))

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message from the peer.

        Raises TimeoutError after ``timeout`` seconds without a message (the connection
        stays usable), ConnectionClosedError at EOF, RemoteProtocolError (or its
        VersionMismatchError) when the peer sends something invalid.
        """
        if self._reading:
            raise RuntimeError("recv() is already running in another task")
        self._reading = True
        try:
            async with asyncio.timeout(timeout):
                return await self._recv()
        finally:
            self._reading = False

    async def aclose(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Close: flush what is buffered, then close the socket. Idempotent.

        A lingering close where the stream allows it (TCP, unix): send what is buffered
        and a FIN, then read and drop whatever the peer still sends until it closes too
        (all within ``timeout``, then abort). Closing a socket with unread input sends a
        reset, and a reset makes the peer's kernel drop our last frames unread: a receiver
        refusing records (disk full) while the sender streams them would lose the Error
        saying why.
        """
        transport = self._transport
        if not self._closing and transport is not None:
            self._closing = True
            # a TLS shutdown must read the peer's close_notify: stop holding reads back
            self._resume_reading()
            if transport.can_write_eof() and not self._lost:
                greeted = self.protocol.handshake_received
                self._discard = bytearray(_DISCARD if greeted else _DISCARD_STRANGER)
                transport.write_eof()
            else:
                transport.close()
        self._wake_all()
        if transport is None or self._lost:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._closed.wait()
        except TimeoutError:
            transport.abort()

    def abort(self) -> None:
        """Close at once, dropping unsent data."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()
        elif self._raw_transport is not None:  # still in its TLS handshake
            self._raw_transport.abort()
        self._wake_all()

    def _abort(self, reason: str) -> None:
        """abort(), and tell recv() why: the reason replaces whatever the cut would look
        like (a frame cut short, "closed locally"), unless the peer had already failed."""
        if self._abort_reason is None and not self._lost and self.state is not State.ERROR:
            self._abort_reason = reason
        self.abort()

    def abort_when_silent(self, seconds: float) -> None:
        """From now on, abort the connection once no message has come from the peer for
        ``seconds`` (counted from now, then from ``last_received``): every ``recv`` and
        ``send`` waiting on it raises ConnectionClosedError saying so.

        ``recv(timeout)`` alone does not keep that rule: it fails only the task in
        ``recv``, and its clock runs only while that task waits there. A peer gone
        without a reset (its packets dropped) left a send blocked in ``drain`` (our
        buffers full, nobody reading them) asleep until TCP gave up retransmitting, about
        15 minutes later; and a reader answering a Ping waited in the Pong's ``drain``,
        where no timeout of its ``recv`` ran at all. A peer that sends but is not read
        (our reader busy) counts as silent too: a frame is heard when ``recv`` takes it.
        """
        self._silence, self._silence_from = seconds, time.monotonic()
        if self._silence_timer is not None:
            self._silence_timer.cancel()
        self._silence_timer = self._loop.call_later(seconds, self._check_silence)

    def _check_silence(self) -> None:
        self._silence_timer = None
        seconds = self._silence
        if seconds is None or self.closed:
            return
        quiet = time.monotonic() - max(self.last_received, self._silence_from)
        if quiet < seconds:  # a message came meanwhile: wait for the rest of the silence
            self._silence_timer = self._loop.call_later(seconds - quiet, self._check_silence)
            return
        self._abort(
            f"{self.peer} sent nothing for {seconds:g} s: stopped or stuck, or the network "
            "between us drops everything"
        )

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Transport details: "peername", "sockname", "ssl_object", "peercert", ... (during
        a served TLS handshake, the TCP connection's: its addresses, no certificate yet)."""
        transport = self._transport or self._raw_transport
        if transport is None:
            return default
        return transport.get_extra_info(name, default)

    # -- reading ------------------------------------------------------------------------------

    async def _recv(self) -> Message:
        protocol = self.protocol
        while True:
            if self._abort_reason is not None:
                raise ConnectionClosedError(self._abort_reason)
            event = protocol.next_event()
            if isinstance(event, ConnectionClosed):
                raise self._closed_error(event.clean)
            if not isinstance(event, NeedData):
                if self._pending_over is not None and protocol.handshake_received:
                    self._end_pending()
                self.last_received = time.monotonic()
                return event
            if self._closing and not self._lost:
                raise ConnectionClosedError(f"connection to {self.peer} was closed locally")
            self._resume_reading()
            waiter = self._loop.create_future()
            self._read_waiter = waiter
            try:
                await waiter
            finally:
                self._read_waiter = None

    def _closed_error(self, clean: bool) -> ConnectionClosedError:
        if self._abort_reason is not None:
            return ConnectionClosedError(self._abort_reason, clean=False)
        if self._closing:
            return ConnectionClosedError(
                f"connection to {self.peer} was closed locally", clean=clean
            )
        if clean:
            error = ConnectionClosedError(f"{self.peer} closed the connection", clean=True)
        elif self._lost_exc is not None:
            error = ConnectionClosedError(
                f"connection to {self.peer} lost: {self._lost_exc}", clean=False
            )
            error.__cause__ = self._lost_exc
        else:
            error = ConnectionClosedError(
                f"{self.peer} closed the connection in the middle of the session", clean=False
            )
        return error

    def _resume_reading(self) -> None:
        if self._read_paused and self._transport is not None and not self._lost:
            self._read_paused = False
            self._transport.resume_reading()

    def _data_arrived(self) -> None:
        if self.protocol.ready:
            transport = self._transport
            if not self._read_paused and transport is not None and not transport.is_closing():
                self._read_paused = True
                transport.pause_reading()
            waiter = self._read_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # -- writing ------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._lost or self._closing or self._transport is None:
            reason = f": {self._lost_exc}" if self._lost_exc is not None else ""
            error = ConnectionClosedError(f"connection to {self.peer} is closed{reason}")
            # what ended it (a TLS alert, a reset) stays findable, as in _closed_error
            raise error from self._lost_exc

    def _write(self, buffers: list[bytes | memoryview]) -> None:
        transport = self._transport
        assert transport is not None
        self._written += sum(memoryview(buf).nbytes for buf in buffers)
        if self._writelines:
            transport.writelines(buffers)
        else:
            for buf in buffers:
                transport.write(buf)

    async def _drain(self) -> None:
        if not self._write_paused:
            return
        if self._lost:
            raise self._closed_error(False)
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._drain_waiters.remove(waiter)
        if self._lost or self._abort_reason is not None:  # woken by our cut (abort)
            raise self._closed_error(False)

    def _wake_all(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    # -- transport callbacks (called by _StreamProtocol) --------------------------------------

    def _connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        # asyncio's own selector transports join the buffers of writelines() into one
        # copy before Python 3.12; uvloop and newer loops send them with writev/sendmsg.
        self._writelines = type(transport).writelines is not asyncio.WriteTransport.writelines
        if self.peer == "?":
            self.peer = _describe_peer(transport)

    def _connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._lost_exc = exc
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None
        self._discard = None
        self.protocol.receive_data(b"")  # EOF: the decoder drops a frame cut short
        self._end_pending()
        self._closed.set()
        self._wake_all()
        if self.protocol.buffer_high_water >= _TRIM_FROM:
            _trim_soon(self._loop)

    # -- the handshake deadline (serve) -------------------------------------------------------

    def _watch_handshake(
        self, timeout: float | None, over: Callable[[FramedConnection], None]
    ) -> None:
        """Call ``over(self)`` once the peer has completed its part of the handshake or
        the connection is gone; abort it if neither happened within ``timeout``."""
        self._pending_over = over
        if timeout is not None:
            self._deadline = self._loop.call_later(timeout, self._handshake_expired, timeout)

    def _end_pending(self) -> None:
        over, self._pending_over = self._pending_over, None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if over is not None:
            over(self)

    def _handshake_expired(self, timeout: float) -> None:
        self._deadline = None
        if self._pending_over is not None:
            self._abort(f"{self.peer} did not complete the handshake within {timeout:g} s")

    def _pause_writing(self) -> None:
        self._write_paused = True

    def _resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)


class _StreamProtocol(asyncio.BufferedProtocol):
    """Glue between an asyncio transport and a FramedConnection."""

    def __init__(self, conn: FramedConnection, on_made: Callable[[FramedConnection], None]) -> None:
        self._conn = conn
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._conn._connection_made(cast(asyncio.Transport, transport))
        self._on_made(self._conn)

    def get_buffer(self, sizehint: int) -> memoryview:
        discard = self._conn._discard
        if discard is not None:
            return memoryview(discard)
        return self._conn.protocol.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._conn._discard is not None:
            return  # lingering close: the peer's late input is dropped
        self._conn.protocol.buffer_updated(nbytes)
        self._conn._data_arrived()

    def eof_received(self) -> bool:
        self._conn.protocol.receive_data(b"")
        self._conn._data_arrived()
        return False  # close our end too: nothing is sent after the peer is gone

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn._connection_lost(exc)

    def pause_writing(self) -> None:
        self._conn._pause_writing()

    def resume_writing(self) -> None:
        self._conn._resume_writing()


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (musl, macOS: nothing to do there)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


_malloc_trim = _load_malloc_trim()
# loops with a trim scheduled (a loop that closes first must not block later ones)
_trims_pending: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def _trim_soon(loop: asyncio.AbstractEventLoop) -> None:
    """Return freed heap memory to the system shortly (see _TRIM_FROM)."""
    if _malloc_trim is None or loop in _trims_pending or loop.is_closed():
        return
    _trims_pending.add(loop)
    loop.call_later(_TRIM_AFTER, _trim, loop)


def _trim(loop: asyncio.AbstractEventLoop) -> None:
    _trims_pending.discard(loop)
    if _malloc_trim is not None:
        _malloc_trim(0)


def _payload_size(msg: Message) -> int:
    field = PAYLOAD_FIELD.get(type(msg))
    return len(getattr(msg, field)) if field is not None else 0


def _describe_peer(transport: asyncio.BaseTransport) -> str:
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(name, str) and name:
        return f"unix:{name}"
    sock = transport.get_extra_info("sockname")
    if isinstance(sock, str) and sock:
        return f"unix:{sock}"
    return "unix:?"


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


CANNOT_RESOLVE = "cannot resolve the host name"  # how DialError's reason starts, then


def _connect_reason(exc: BaseException, timeout: float) -> tuple[str, int | None]:
    """A short, human reason for a failed connection attempt."""
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s", errno.ETIMEDOUT
    if isinstance(exc, _ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}", None
    if isinstance(exc, socket.gaierror):
        return f"{CANNOT_RESOLVE} ({exc.strerror})", None
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused", exc.errno
    if isinstance(exc, ConnectionResetError) and not exc.strerror:  # a TLS handshake cut
        return "the peer reset the connection during the TLS handshake", errno.ECONNRESET
    if isinstance(exc, FileNotFoundError):
        return "no such socket", exc.errno
    if isinstance(exc, OSError):
        if exc.errno is not None and exc.strerror:
            return exc.strerror[:1].lower() + exc.strerror[1:], exc.errno
        return str(exc), exc.errno
    return str(exc), None


# --- opening connections --------------------------------------------------------------------


def _factory(
    role: Role, kw: dict[str, Any], peer: str = "?"
) -> tuple[Callable[[], _StreamProtocol], list[FramedConnection]]:
    made: list[FramedConnection] = []

    def build() -> _StreamProtocol:
        conn = FramedConnection(role, peer=peer, **kw)
        return _StreamProtocol(conn, made.append)

    return build, made


async def connect(
    host: str,
    port: int,
    *,
    role: Role = Role.SENDER,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    **kw: Any,
) -> FramedConnection:
    """Open a TCP (or TLS, with ``ssl``) connection.

    Extra keywords go to FramedConnection (max_frame, window, compress, shaper). Raises
    DialError (an OSError) with a one-line message, e.g. "cannot connect to
    127.0.0.1:9: connection refused".
    """
    target = _target(host, port)
    factory, made = _factory(role, kw, target)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(
                factory, host, port, ssl=ssl, server_hostname=server_hostname if ssl else None
            )
    except (OSError, TimeoutError) as exc:
        reason, err = _connect_reason(exc, timeout)
        if ssl is not None and isinstance(exc, TimeoutError) and await _accepts(host, port):
            reason = (
                f"{NO_TLS_ANSWER} within {timeout:g} s, though the port "
                "accepts connections (a process there that is stopped or stuck, or another "
                "service than a replicator's)"
            )
        raise DialError(target, reason, err) from exc
    return made[0]


NO_TLS_ANSWER = "the TLS handshake got no answer"  # how DialError's reason starts, then


async def _accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a plain TCP connection to ``host:port`` opens now: after a TLS connection
    timed out, it tells a handshake nobody answered (a wrong port: an HTTP server waiting
    for a request line; a stopped receiver the kernel still takes connections for) from a
    host that could not be reached at all. Closed at once, nothing sent."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def connect_unix(
    path: str,
    *,
    role: Role = Role.SENDER,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    **kw: Any,
) -> FramedConnection:
    """Open a connection over a unix socket; errors as for connect()."""
    target = f"unix:{path}"
    factory, made = _factory(role, kw, target)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.create_unix_connection(
                factory, path, ssl=ssl, server_hostname=server_hostname if ssl else None
            )
    except (OSError, TimeoutError) as exc:
        reason, err = _connect_reason(exc, timeout)
        raise DialError(target, reason, err) from exc
    return made[0]


def _source(conn: FramedConnection) -> object:
    """Whom a pending connection counts against: its IPv4 address, or its IPv6 /64 (one
    host is commonly given a whole /64); one source for unix sockets and socket pairs."""
    peer = conn.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%")[0])
    except ValueError:
        return peer[0]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        return ipaddress.IPv6Network((address, 64), strict=False)
    return address


class _Sessions:
    """Runs the handler of each accepted connection in its own task, then closes it.

    Connections whose peer has not completed its part of the handshake are "pending";
    at most ``max_pending`` are kept. When a new one would exceed that, a pending
    connection is closed at once: the oldest of the source (``_source``) that holds the
    most of them, the newcomer counted. A legitimate sender says Hello within a round trip
    of connecting, so it is rarely the oldest, whereas refusing the newcomer instead would
    let max_pending silent connections (renewed every handshake_timeout) lock every
    sender out; and choosing within the largest source keeps one flooding address from
    evicting a slow sender elsewhere (a 300 ms round trip spends several of them in a TLS
    handshake), however fast it connects.
    """

    def __init__(
        self,
        handler: Handler,
        max_pending: int | None,
        handshake_timeout: float | None,
        on_refused: Refused | None = None,
    ) -> None:
        if max_pending is not None and max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        self._handler = handler
        self.refused: Refused = on_refused or (lambda reason: None)
        self._max_pending = max_pending
        self._handshake_timeout = handshake_timeout
        self._tasks: set[asyncio.Task[None]] = set()
        # in the order they arrived, with their source
        self._pending: dict[FramedConnection, object] = {}
        self._burst: asyncio.TimerHandle | None = None
        self._burst_closed = 0

    def start(self, conn: FramedConnection) -> None:
        """A connection was accepted: count it as pending and run its handler."""
        self.admit(conn)
        self.run(conn)

    def admit(self, conn: FramedConnection) -> None:
        """Count ``conn`` as pending until its peer has completed its part of the
        handshake (for TLS: from the TCP accept, the TLS handshake included)."""
        if self._max_pending is not None or self._handshake_timeout is not None:
            if self._max_pending is not None:
                while len(self._pending) >= self._max_pending:
                    self._make_room(conn)
            self._pending[conn] = _source(conn)
            conn._watch_handshake(self._handshake_timeout, self._pending_over)

    def run(self, conn: FramedConnection) -> None:
        """Run the handler of an admitted connection."""
        task = asyncio.get_running_loop().create_task(
            self._run(conn), name=f"replicator-session {conn.peer}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pending_over(self, conn: FramedConnection) -> None:
        self._pending.pop(conn, None)

    def _make_room(self, newcomer: FramedConnection) -> None:
        counts: dict[object, int] = {_source(newcomer): 1}
        for source in self._pending.values():
            counts[source] = counts.get(source, 0) + 1
        most = max(counts.values())  # a source holding that many has one pending at least
        oldest = next(c for c, source in self._pending.items() if counts[source] == most)
        del self._pending[oldest]
        oldest._pending_over = None  # it is not counted any more
        oldest._evicted = True
        oldest._abort(
            f"closed {oldest.peer}: more than {self._max_pending} connections were waiting "
            "for a handshake"
        )
        self._burst_closed += 1
        self.refused("too_many_pending")
        if self._burst is None:
            log.warning(
                "transport.too_many_pending",
                peer=oldest.peer,
                newcomer=newcomer.peer,
                max_pending=self._max_pending,
                action="closed the oldest connection waiting for a handshake",
            )
            self._burst = asyncio.get_running_loop().call_later(_BURST_WINDOW, self._burst_over)

    def _burst_over(self) -> None:
        closed, self._burst_closed, self._burst = self._burst_closed, 0, None
        if closed > 1:
            log.warning(
                "transport.too_many_pending_burst",
                closed=closed,
                seconds=_BURST_WINDOW,
                max_pending=self._max_pending,
            )

    async def _run(self, conn: FramedConnection) -> None:
        try:
            await self._handler(conn)
        except Exception:
            log.exception("transport.handler_failed", peer=conn.peer)
        finally:
            await conn.aclose()


class _TlsGate(asyncio.BufferedProtocol):
    """The TCP side of a connection served with TLS, while its TLS handshake runs.

    It sits between the TCP transport and the TLS layer (a ``_ServedTls`` built for this
    connection, whose application protocol is the connection's ``_StreamProtocol``): it
    counts the connection as pending from the accept on, looks at the first bytes (a
    plaintext replicator peer gets a Refuse it can read), then passes everything to the
    TLS layer. The handler starts when the TLS layer reports the handshake done; a
    connection that ends before that is logged with the reason and never reaches it.
    """

    def __init__(
        self,
        conn: FramedConnection,
        tls: _ServedTls,
        sessions: _Sessions,
        refusal: bytes | None,
    ) -> None:
        self._conn = conn
        self._tls = tls
        self._sessions = sessions
        self._refusal = refusal
        self._head: bytearray | None = bytearray(len(FRAME_MAGIC))  # until it is known
        self._seen = 0
        self._raw: asyncio.Transport | None = None
        self._refused: str | None = None
        self._drop: bytearray | None = None  # a refused plaintext peer's input goes here

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)
        self._raw = raw
        conn = self._conn
        conn._raw_transport = raw
        conn.peer = _describe_peer(raw)
        self._sessions.admit(conn)
        self._tls.connection_made(raw)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._drop is not None:
            return memoryview(self._drop)
        if self._head is not None:
            return memoryview(self._head)[self._seen :]
        return self._tls.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._drop is not None:
            return  # a refused plaintext peer: its input is dropped
        head = self._head
        if head is None:
            self._tls.buffer_updated(nbytes)
            return
        self._seen += nbytes
        # a TLS ClientHello starts with 0x16; our frames with FRAME_MAGIC
        if head[0] == FRAME_MAGIC[0] and self._seen < len(head):
            return
        if bytes(head[: self._seen]) == FRAME_MAGIC and self._refusal is not None:
            self._refuse_plaintext()
            return
        self._head = None
        view = memoryview(head)[: self._seen]
        while view:  # hand what we looked at to the TLS layer
            buffer = self._tls.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            self._tls.buffer_updated(n)
            view = view[n:]

    def _refuse_plaintext(self) -> None:
        raw = self._raw
        assert raw is not None and self._refusal is not None
        self._head = None
        self._refused = "the peer does not use TLS (a sender run with --insecure?)"
        self._drop = bytearray(_DISCARD_STRANGER)
        raw.write(self._refusal)
        if raw.can_write_eof():
            raw.write_eof()  # a lingering close: the peer reads the Refuse, then closes
            asyncio.get_running_loop().call_later(_REFUSAL_LINGER, raw.abort)
        else:
            raw.close()

    def eof_received(self) -> bool | None:
        if self._refused is not None:
            return False
        self._tls.eof_received()  # it closes the connection itself
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self._conn
        if conn._transport is None:  # the handshake never completed
            if self._head is not None and self._seen == 0 and conn._abort_reason is None:
                # closed without a byte: a port probe or a health check, not an attempt
                log.info("transport.closed_before_tls", peer=conn.peer)
            else:
                reason = self._refused or conn._abort_reason or _tls_failure(exc)
                log.warning("transport.tls_refused", peer=conn.peer, reason=reason)
                if not conn._evicted:  # counted as such by _make_room
                    self._sessions.refused("tls")
            conn._end_pending()
            _trim_soon(conn._loop)  # what OpenSSL held for the handshake goes back too
        self._tls.connection_lost(exc)

    def pause_writing(self) -> None:
        self._tls.pause_writing()

    def resume_writing(self) -> None:
        self._tls.resume_writing()


def _tls_failure(exc: BaseException | None) -> str:
    """Why a TLS handshake failed, in words a log reader can act on."""
    if exc is None or isinstance(exc, ConnectionResetError | BrokenPipeError):
        how = "closed" if exc is None else "reset"
        return (
            f"the peer {how} the connection during the TLS handshake; a peer that refuses "
            "our certificate (another CA, expired) does that"
        )
    if isinstance(exc, _ssl.SSLCertVerificationError):
        why = CERT_PROBLEMS.get(exc.verify_code, "")
        return f"certificate refused: {exc.verify_message or exc.reason}{why}"
    if isinstance(exc, _ssl.SSLError):
        reason = str(exc.reason or exc)
        if reason == "WRONG_VERSION_NUMBER" or reason.startswith("HTTP"):
            return f"the peer does not speak TLS ({reason})"
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED"):
            return "the peer sent no certificate"
        return f"TLS handshake failed: {reason}"
    return f"TLS handshake failed: {exc}"


class _ServedTls(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS layer (on any loop, uvloop's too) with two changes for a server.

    * A handshake that fails sends its alert before the connection is cut: asyncio and
      uvloop both drop it, so a TLS 1.3 client whose certificate is refused (which it
      learns only after its side of the handshake is done) would just see the connection
      close, and could not tell the user why.
    * Its receive buffer is small until the handshake is done (asyncio's is 256 KiB from
      the start): connections still in their handshake are the ones a flood is made of.
    """

    max_size = _TLS_HANDSHAKE_BUFFER  # asyncio's read size; raised once the handshake is done

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        # (typeshed knows neither the instance attribute nor the method)
        if handshake_exc is None:
            self.max_size = _TLS_READ_BUFFER  # type: ignore[misc]
        else:
            with contextlib.suppress(Exception):
                self._process_outgoing()  # type: ignore[attr-defined]  # the alert saying why
        super()._on_handshake_complete(handshake_exc)


def _server_factory(
    role: Role,
    handler: Handler,
    kw: dict[str, Any],
    max_pending: int | None,
    handshake_timeout: float | None,
    tls: ServerTls | None = None,
    on_refused: Refused | None = None,
) -> Callable[[], asyncio.BaseProtocol]:
    sessions = _Sessions(handler, max_pending, handshake_timeout, on_refused)
    if tls is None:

        def build() -> _StreamProtocol:
            return _StreamProtocol(FramedConnection(role, **kw), sessions.start)

        return build

    loop = asyncio.get_running_loop()
    refusal = None
    if role is Role.RECEIVER:
        frame = ProtocolConnection(Role.RECEIVER).encode(Refuse("auth", PLAINTEXT_REFUSAL))
        refusal = b"".join(frame.buffers)

    def build_tls() -> _TlsGate:
        conn = FramedConnection(role, **kw)
        context = tls() if callable(tls) else tls
        waiter: Any = None  # nobody waits: the gate and the application protocol see it all
        timeout: Any = handshake_timeout or DEFAULT_HANDSHAKE_TIMEOUT
        layer = _ServedTls(
            loop,
            _StreamProtocol(conn, sessions.run),
            context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=timeout,
        )
        return _TlsGate(conn, layer, sessions, refusal)

    return build_tls


async def serve(
    host: str,
    port: int,
    handler: Handler,
    *,
    role: Role = Role.RECEIVER,
    ssl: ServerTls | None = None,
    backlog: int = 100,
    max_pending: int | None = DEFAULT_MAX_PENDING,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    on_refused: Refused | None = None,
    **kw: Any,
) -> asyncio.Server:
    """Listen on TCP; run ``handler(conn)`` for each connection (the connection is closed
    when the handler returns). Port 0 picks a free port (see server.sockets).

    At most ``max_pending`` connections may wait for their peer's handshake message (a
    Hello for a receiver): the oldest is closed to make room. One whose peer has not
    completed its part of the handshake within ``handshake_timeout`` seconds is aborted;
    the handler must read the Hello promptly (``conn.recv()``), as it counts only once
    read. None disables either bound.

    ``ssl``: TLS (a context, or a function called at every accept that returns one). The
    TLS handshake counts against both bounds (its own timeout is ``handshake_timeout``
    as well); the handler runs only for connections whose handshake succeeded, and a
    failed one is logged (``transport.tls_refused``, with the peer and the reason).

    ``on_refused(reason)`` counts the connections refused before the handler could see
    them: "tls" (a failed TLS handshake, a plaintext peer), "too_many_pending" (closed to
    make room; see ``max_pending``).
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        _server_factory(role, handler, kw, max_pending, handshake_timeout, ssl, on_refused),
        host,
        port,
        backlog=backlog,
    )


async def serve_unix(
    path: str,
    handler: Handler,
    *,
    role: Role = Role.RECEIVER,
    ssl: ServerTls | None = None,
    backlog: int = 100,
    max_pending: int | None = DEFAULT_MAX_PENDING,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    on_refused: Refused | None = None,
    **kw: Any,
) -> asyncio.Server:
    """Listen on a unix socket; as serve()."""
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(
        _server_factory(role, handler, kw, max_pending, handshake_timeout, ssl, on_refused),
        path,
        backlog=backlog,
    )


async def connection_pair(**kw: Any) -> tuple[FramedConnection, FramedConnection]:
    """A connected (sender, receiver) pair over socket.socketpair(), for tests and for
    running both ends in one process. Keywords go to both FramedConnections."""
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    ends: list[FramedConnection] = []
    try:
        for role, sock in ((Role.SENDER, left), (Role.RECEIVER, right)):
            factory, made = _factory(role, kw, f"socketpair:{role.peer.value}")
            await loop.create_unix_connection(factory, sock=sock)
            ends.append(made[0])
    except BaseException:
        for end in ends:
            end.abort()
        left.close()
        right.close()
        raise
    return ends[0], ends[1]
