"""A userspace WAN emulator and fault proxy: a TCP proxy on loopback between a client and
an upstream server that adds one-way delay, jitter and a rate cap, and injects network
faults on cue.

There is no ``tc netem`` on the machines this runs on, so fault-injection tests and
``replicator bench`` put this proxy between ``replicator send`` and ``replicator receive``.

Use::

    async with WanEmulator(("127.0.0.1", port), profile=LinkProfile(delay=0.05)) as wan:
        host, port = wan.address              # connect the client here
        await wan.wait_connections(1)         # the proxy has connected it upstream
        wan.corrupt(1, "up", after=100)       # the 101st byte the client sends next
        wan.profile = LinkProfile(rate=12.5e6)  # applies to live connections at once

or from a shell (runs until SIGINT/SIGTERM; prints ``listening on HOST:PORT`` first)::

    python -m replicator.transport.wan --listen 127.0.0.1:0 --to 127.0.0.1:7000 \\
        --delay 50ms --jitter 5ms --rate 100Mbit

Directions: "up" is client to upstream, "down" is upstream to client. Each accepted
connection is connected to the upstream address; if that fails the client gets a reset.

Link model (``LinkProfile``), per direction:

* Delay: a chunk read at time t is written to the other side at
  ``max(previous release, t + delay + u * jitter)`` (u uniform in [-1, 1], drawn per
  chunk, delay never below 0), so jitter never reorders bytes: TCP is a stream. EOF (a
  FIN) and a reset from one peer travel through the delay line behind the data.
* Reading continues during the delay: the link holds up to ``queue`` bytes per direction
  (default ``max(4 MiB, 2 x rate x (delay + jitter))``), then the proxy stops reading
  that side and TCP backpressure reaches the sender. With a delay and no rate cap, the
  throughput is therefore at most ``queue / delay``.
* Rate: a token bucket per direction, shared by all connections (it is the link's
  capacity), ``burst`` bytes deep (default ``max(64 KiB, rate x 10 ms)``): over any
  window of T seconds at most ``burst + rate x T`` bytes leave. A direction's rate is
  ``rate``; ``down_rate`` overrides it for "down" (``math.inf``: unlimited).
* The proxy terminates TCP: each peer's TCP runs over loopback and sees no delay.
  Application round trips (requests and replies, credit windows, pings) see it; a bare
  TCP window does not (so a plain TCP transfer runs at the rate cap whatever the delay).
  Nothing is lost, duplicated or reordered except by the faults.
* Setting ``WanEmulator.profile`` applies to live connections at once: chunks waiting in
  the link are released by the new delay (measured from their arrival) and the new rate.

Scheduling uses ``loop.time()`` with one timer per direction per connection (not per
chunk); chunks are read up to 256 KiB at a time. With no delay, no rate and no fault
pending, data is written straight through from the read buffer.

Faults (deterministic; each applies to the connections open now, accepted even if still
connecting upstream (``wait_connections`` waits for a client's), and, with
``upcoming=N``, to the next N connections accepted; ``current=False`` skips the open
ones; positions count the bytes the proxy reads from the sending side from the moment of
the call, so ``after=0`` is "right after the bytes already in the link"):

* ``cut()``: both peers get a FIN (clean EOF); data still in the link is lost; the proxy
  then discards what either peer sends and closes each side when that peer closes.
  ``cut(after=N, direction=d)``: the link delivers exactly N more bytes in direction d,
  then cuts.
* ``reset()``: both peers get a RST (SO_LINGER 0, then abort); their next read raises
  ConnectionResetError. ``reset(after=N, direction=d)``: N more bytes in d, then resets
  (once those bytes have left the proxy's write buffer).
* ``stall(seconds)``: forward nothing, both directions, every connection (new ones too),
  for ``seconds`` or until ``resume()`` (``seconds=None``); sockets stay open, reading
  continues up to the queue limit, nothing is lost.
* ``corrupt(nbytes, direction, after=0, mask=0xFF)``: XOR ``mask`` into exactly the
  ``nbytes`` bytes that follow the next ``after`` bytes in ``direction``.
* ``refuse(True)``: new connections are accepted, then closed at once (FIN) without
  connecting upstream, until ``refuse(False)``.

``stats`` counts per direction bytes forwarded, connections, and faults injected.
``aclose()`` (idempotent; also on leaving ``async with``) closes the listener and aborts
every connection, cancels the proxy's tasks and timers, and returns once every socket is
closed.

Units (``parse_duration``, ``parse_rate``, also for the CLI options):

* durations: a number with ``us`` (or ``µs``), ``ms`` or ``s``: "50ms", "0.05s",
  "250us"; "0" alone is accepted.
* rates: a number with ``bit``/``b/s`` (bits per second) or ``B/s`` (bytes per second),
  optionally prefixed by k, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024):
  "100Mbit", "1Gbit", "12MB/s", "12MiB/s", "800kb/s". ``bps`` is refused as ambiguous
  (tc reads "mbps" as megabytes per second). Rates are returned in bytes per second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import math
import random
import re
import signal
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self, TypeVar, cast

__all__ = [
    "Direction",
    "LinkProfile",
    "WanEmulator",
    "WanStats",
    "main",
    "parse_duration",
    "parse_rate",
]

Direction = Literal["up", "down"]
_T = TypeVar("_T")
_DIRECTIONS = ("up", "down")

READ_SIZE = 256 * 1024
MIN_QUEUE = 4 * 1024 * 1024
MIN_BURST = 64 * 1024
BURST_TIME = 0.010
# Transport write buffers: enough that a loopback peer is rarely waited for, small enough
# that the link's own queue (which has the delay and rate) holds the backlog.
WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024
# Timers fire up to ~1 ms off (epoll and libuv count milliseconds): release what is due
# within this much, rather than arming a timer for a fraction of a millisecond.
TIMER_SLACK = 0.001
# While waiting for tokens, wake once a quarter of the burst has accrued: writes are not
# tiny, and a timer up to 3/4 burst late (7.5 ms at the default) loses no tokens to the cap.
QUANTUM_FRACTION = 0.25
MIN_TOKEN_WAIT = 0.0005
RESET_FLUSH_POLL = 0.001
_LINGER_ZERO = struct.pack("ii", 1, 0)


# -- the link profile -------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkProfile:
    """What the emulated link does to each direction; see the module docstring.

    ``rate``/``down_rate`` are bytes per second; None for ``rate`` (or ``math.inf``) is
    unlimited, None for ``down_rate`` means "same as ``rate``". ``burst`` and ``queue``
    are bytes, None for the defaults.
    """

    delay: float = 0.0
    jitter: float = 0.0
    rate: float | None = None
    down_rate: float | None = None
    burst: int | None = None
    queue: int | None = None

    def __post_init__(self) -> None:
        for name in ("delay", "jitter"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"LinkProfile.{name} must be a finite number >= 0, got {value}")
        for name in ("rate", "down_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"LinkProfile.{name} must be > 0 or None, got {value}")
        for name in ("burst", "queue"):
            value = getattr(self, name)
            if value is not None and not value >= 1:
                raise ValueError(f"LinkProfile.{name} must be >= 1 or None, got {value}")

    def rate_of(self, direction: Direction) -> float | None:
        """Bytes per second in ``direction``; None when unlimited."""
        rate = self.down_rate if direction == "down" and self.down_rate is not None else self.rate
        return None if rate is None or math.isinf(rate) else float(rate)

    def burst_of(self, direction: Direction) -> int:
        """The token bucket's depth in ``direction`` (bytes)."""
        if self.burst is not None:
            return self.burst
        rate = self.rate_of(direction)
        return max(MIN_BURST, int(rate * BURST_TIME)) if rate is not None else MIN_BURST

    def queue_of(self, direction: Direction) -> int:
        """Bytes the link holds per connection in ``direction`` before reading stops."""
        if self.queue is not None:
            return self.queue
        rate = self.rate_of(direction)
        bdp = 2 * rate * (self.delay + self.jitter) if rate is not None else 0.0
        return max(MIN_QUEUE, int(bdp))


@dataclass
class WanStats:
    """Counters since start; ``bytes_up``/``bytes_down`` are bytes written to the far side."""

    accepted: int = 0  # TCP connections accepted, refused ones included
    active: int = 0  # connections not yet closed on both sides
    refused: int = 0  # closed at once by refuse()
    upstream_failed: int = 0  # the upstream connect failed (the client got a reset)
    bytes_up: int = 0
    bytes_down: int = 0
    up_at: float = 0.0  # loop.time() of the latest write upstream (0: none yet)
    corrupted: int = 0  # bytes corrupted
    cuts: int = 0  # connections cut (a FIN both ways) by cut()
    resets: int = 0  # connections reset by reset()
    stalls: int = 0  # stall() calls
    faults: dict[str, int] = field(default_factory=dict)  # the above by name, for logs

    def _count(self, fault: str, n: int = 1) -> None:
        setattr(self, fault, getattr(self, fault) + n)
        self.faults[fault] = self.faults.get(fault, 0) + n


# -- internals --------------------------------------------------------------------------------


class _Marker(enum.Enum):
    """Events that travel through the delay line behind the data."""

    EOF = "eof"  # the sender's FIN: shut down writing on the far side
    CUT = "cut"  # an injected cut at this position
    RESET = "reset"  # an injected reset at this position
    LOST = "lost"  # the sending peer's connection failed: reset the far side


_Payload = bytes | memoryview | _Marker
# (arrival time, jitter draw in [-1, 1], payload)
_Entry = tuple[float, float, _Payload]


class _Bucket:
    """A token bucket for one direction of the emulated link (all connections share it)."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self.burst = float(MIN_BURST)
        self.quantum = 1.0
        self.tokens = 0.0
        self.stamp = 0.0

    def configure(self, rate: float | None, burst: int, now: float) -> None:
        if self.rate is not None:
            self.refill(now)
        else:
            self.tokens = float(burst)  # a link that was unlimited starts full
        self.rate = rate
        self.burst = float(burst)
        self.tokens = min(self.tokens, self.burst)
        self.quantum = max(1.0, self.burst * QUANTUM_FRACTION)
        self.stamp = now

    def refill(self, now: float) -> None:
        assert self.rate is not None
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now


class _Side(asyncio.BufferedProtocol):
    """One of a connection's two sockets: the client's or the upstream's."""

    def __init__(self, link: _Link, name: str) -> None:
        self.link = link
        self.name = name
        self.transport: asyncio.Transport | None = None
        # set by _Link: the pipe carrying what this side sends, and the one writing to it
        self.pipe_out: _Pipe
        self.pipe_in: _Pipe
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)
        self.eof = False  # this peer sent a FIN
        self.wrote_eof = False
        self.discard = False  # after a cut: drop input, close when the peer closes
        self.lost = False

    def new_buffer(self) -> None:
        """The transport may still hold the old buffer (uvloop, Python 3.12+): replace it."""
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not self.wrote_eof and not transport.is_closing():
            self.wrote_eof = True
            transport.write_eof()

    def abort(self, *, rst: bool) -> None:
        transport = self.transport
        if transport is None or self.lost:
            return
        if rst:
            # abort() alone closes with a FIN when nothing is unread; linger 0 forces a RST
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        transport.abort()

    # -- protocol callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.link.emu._open.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # small messages must not wait for Nagle
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.link.side_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if not self.discard:
            self.pipe_out.feed(nbytes)

    def eof_received(self) -> bool:
        self.eof = True
        if self.discard:
            return False  # cut: the peer has closed too, close the socket
        self.pipe_out.feed_marker(_Marker.EOF)
        return True  # half-close: keep writing the other direction

    def pause_writing(self) -> None:
        self.pipe_in.dst_paused = True

    def resume_writing(self) -> None:
        self.pipe_in.dst_paused = False
        self.pipe_in.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        emu = self.link.emu
        emu._open.discard(self)
        self.link.side_lost(self, exc)
        if not emu._open and emu._idle is not None and not emu._idle.done():
            emu._idle.set_result(None)


class _Pipe:
    """One direction of one connection: the delay line, its timer, its backpressure."""

    def __init__(self, link: _Link, direction: Direction, src: _Side, dst: _Side) -> None:
        self.link = link
        self.emu = link.emu
        self.loop = link.emu._loop
        self.direction: Direction = direction
        self.up = direction == "up"
        self.src = src
        self.dst = dst
        self.bucket = self.emu._buckets[direction]
        self.queue: deque[_Entry] = deque()
        self.queued = 0  # data bytes in the queue
        self.in_count = 0  # bytes read from src
        self.out_count = 0  # bytes written to dst
        self.last_due = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.src_paused = False  # we paused reading src (the queue is full)
        self.dst_paused = False  # dst's write buffer is full
        self.closed = False  # input ends here (EOF, a fault marker, the link closed)
        self.finished = False  # the EOF was written to dst
        self.corrupt: list[tuple[int, int, bytes]] = []  # [start, end) stream offsets, table
        self.trigger: tuple[int, _Marker] | None = None  # cut/reset at a stream offset
        self.configure(self.emu._profile)

    def configure(self, profile: LinkProfile) -> None:
        self.delay = profile.delay
        self.jitter = profile.jitter
        self.high = profile.queue_of(self.direction)
        self.low = self.high // 2
        self.fast = self.delay == 0 and self.jitter == 0 and self.bucket.rate is None

    # -- input --------------------------------------------------------------------------------

    def feed(self, nbytes: int) -> None:
        """``nbytes`` arrived in src's read buffer."""
        if self.closed:
            return
        src = self.src
        start = self.in_count
        self.in_count = start + nbytes
        if self.corrupt:
            self._apply_corrupt(src.view, start, nbytes)
        trigger = self.trigger
        if trigger is not None and trigger[0] <= start + nbytes:
            keep = trigger[0] - start
            self.trigger = None
            if keep:
                self._enqueue(bytes(src.view[:keep]))
            self.feed_marker(trigger[1])
            return
        data = src.view[:nbytes]
        dst = self.dst.transport
        if (
            self.fast
            and not self.queue
            and not self.dst_paused
            and dst is not None
            and not self.emu._stalled
        ):
            dst.write(data)
            self.out_count += nbytes
            if self.up:
                self.emu.stats.bytes_up += nbytes
                self.emu.stats.up_at = self.loop.time()
            else:
                self.emu.stats.bytes_down += nbytes
            if dst.get_write_buffer_size():
                src.new_buffer()
            return
        self._enqueue(bytes(data))

    def feed_marker(self, marker: _Marker) -> None:
        """Queue an event behind the data; nothing is read after it."""
        if self.closed:
            return
        self.closed = True
        self.trigger = None
        self._enqueue(marker)

    def _enqueue(self, payload: _Payload) -> None:
        jit = self.emu._rng.uniform(-1.0, 1.0) if self.jitter else 0.0
        self.queue.append((self.loop.time(), jit, payload))
        if not isinstance(payload, _Marker):
            self.queued += len(payload)
            if self.queued >= self.high and not self.src_paused:
                self._pause_src()
        if len(self.queue) == 1:
            # otherwise the head's timer, resume_writing, resume() or the upstream connect
            # is due to pump already
            self.pump()

    def _apply_corrupt(self, view: memoryview, start: int, nbytes: int) -> None:
        end = start + nbytes
        keep = []
        for lo, hi, table in self.corrupt:
            a, b = max(lo, start), min(hi, end)
            if a < b:
                piece = view[a - start : b - start]
                piece[:] = bytes(piece).translate(table)
                self.emu.stats._count("corrupted", b - a)
            if hi > end:
                keep.append((lo, hi, table))
        self.corrupt = keep

    def _pause_src(self) -> None:
        transport = self.src.transport
        if transport is not None and not transport.is_closing():
            self.src_paused = True
            transport.pause_reading()

    def _resume_src(self) -> None:
        self.src_paused = False
        transport = self.src.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    # -- output -------------------------------------------------------------------------------

    def pump(self) -> None:
        """Write what is due (and has tokens) to dst; arm the timer for the rest."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        dst = self.dst.transport
        if dst is None or self.dst_paused or self.emu._stalled or self.link.closed:
            return  # the upstream connect, resume_writing or resume() pumps again
        queue = self.queue
        bucket = self.bucket
        stats = self.emu.stats
        now = self.loop.time()
        while queue:
            arrival, jit, payload = queue[0]
            due = arrival + self.delay + jit * self.jitter
            due = max(self.last_due, due if due > arrival else arrival)
            if due > now + TIMER_SLACK:
                self.timer = self.loop.call_at(due, self.pump)
                break
            self.last_due = due
            if isinstance(payload, _Marker):
                queue.popleft()
                self._release_marker(payload)
                return
            size = len(payload)
            take = size
            if bucket.rate is not None:
                bucket.refill(now)
                want = min(size, bucket.quantum)
                if bucket.tokens < want:
                    wait = (want - bucket.tokens) / bucket.rate
                    self.timer = self.loop.call_at(now + max(wait, MIN_TOKEN_WAIT), self.pump)
                    break
                take = min(size, int(bucket.tokens))
                bucket.tokens -= take
            if take == size:
                queue.popleft()
                dst.write(payload)
            else:
                view = memoryview(payload)
                queue[0] = (arrival, jit, view[take:])
                dst.write(view[:take])
            self.queued -= take
            self.out_count += take
            if self.up:
                stats.bytes_up += take
                stats.up_at = now
            else:
                stats.bytes_down += take
            if self._dst_full():
                break
        if self.src_paused and self.queued <= self.low:
            self._resume_src()

    def _dst_full(self) -> bool:
        # write() may have called pause_writing: a method, so the type checker knows
        return self.dst_paused

    def _release_marker(self, marker: _Marker) -> None:
        link = self.link
        if marker is _Marker.EOF:
            self.finished = True
            self.dst.write_eof()
            link.check_finished()
        elif marker is _Marker.CUT:
            link.cut(injected=True)
        elif marker is _Marker.RESET:
            dst = self.dst.transport
            if dst is not None and dst.get_write_buffer_size():
                # deliver the bytes before the reset point first: a RST drops unsent data
                self.queue.appendleft((self.last_due, 0.0, marker))
                self.timer = self.loop.call_later(RESET_FLUSH_POLL, self.pump)
                return
            link.reset(injected=True)
        else:
            link.reset(injected=False)

    def stop(self) -> None:
        """The link closed: drop the queue and the timer."""
        self.closed = True
        self.trigger = None
        self.corrupt = []
        self.queue.clear()
        self.queued = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Link:
    """One proxied connection: a client side, an upstream side, a pipe each way."""

    def __init__(self, emu: WanEmulator) -> None:
        self.emu = emu
        self.closed = False  # cut, reset, refused, finished or aborted
        self.established = False  # the upstream connection is up
        self.gone = False
        self.connect_task: asyncio.Task[None] | None = None
        self.client = _Side(self, "client")
        self.upstream = _Side(self, "upstream")
        self.up = _Pipe(self, "up", self.client, self.upstream)
        self.down = _Pipe(self, "down", self.upstream, self.client)
        self.client.pipe_out = self.upstream.pipe_in = self.up
        self.upstream.pipe_out = self.client.pipe_in = self.down

    def pipe(self, direction: Direction) -> _Pipe:
        return self.up if direction == "up" else self.down

    def side_made(self, side: _Side) -> None:
        emu = self.emu
        if side is self.upstream:
            if self.closed:
                side.abort(rst=True)
                return
            self.established = True
            emu._notify()
            self.up.pump()
            return
        emu.stats.accepted += 1
        if emu._closing or emu._refusing:
            self.closed = True
            if emu._refusing and not emu._closing:
                emu.stats.refused += 1
            assert side.transport is not None
            side.transport.close()
            return
        emu._links.add(self)
        emu.stats.active += 1
        emu._apply_upcoming(self)
        if not self.closed:
            self.connect_task = emu._loop.create_task(self._connect())
            emu._tasks.add(self.connect_task)
            self.connect_task.add_done_callback(emu._tasks.discard)

    async def _connect(self) -> None:
        emu = self.emu
        host, port = emu.upstream
        try:
            await emu._loop.create_connection(lambda: self.upstream, host, port)
        except OSError:
            if not self.closed:
                emu.stats.upstream_failed += 1
                self.reset(injected=False)
        finally:
            self.check_gone()

    def apply(self, fault: _Fault) -> None:
        if self.closed:
            return
        if fault.kind == "corrupt":
            pipe = self.pipe(fault.direction)
            if not pipe.closed:
                start = pipe.in_count + (fault.after or 0)
                table = bytes(b ^ fault.mask for b in range(256))
                pipe.corrupt.append((start, start + fault.nbytes, table))
            return
        marker = _Marker.CUT if fault.kind == "cut" else _Marker.RESET
        if fault.after is None:
            if marker is _Marker.CUT:
                self.cut(injected=True)
            else:
                self.reset(injected=True)
            return
        pipe = self.pipe(fault.direction)
        if fault.after == 0:
            pipe.feed_marker(marker)
        elif not pipe.closed and (
            pipe.trigger is None or pipe.trigger[0] > pipe.in_count + fault.after
        ):
            pipe.trigger = (pipe.in_count + fault.after, marker)

    def _stop(self) -> None:
        self.closed = True
        self.up.stop()
        self.down.stop()
        task = self.connect_task
        if task is not None and not task.done() and not self.established:
            # only while connecting: once connection_made has run, uvloop's
            # create_connection closes a cancelled transport without connection_lost
            task.cancel()

    def cut(self, *, injected: bool) -> None:
        """A FIN to both peers; then drop their input and close each when it closes."""
        if self.closed:
            return
        self._stop()
        if injected:
            self.emu.stats._count("cuts")
        for side in (self.client, self.upstream):
            transport = side.transport
            if transport is None or side.lost:
                continue
            if side.eof:
                transport.close()
            else:
                side.discard = True
                side.write_eof()
                transport.resume_reading()  # to see the peer's FIN
        self.check_gone()

    def reset(self, *, injected: bool) -> None:
        """A RST to both peers."""
        if self.closed:
            return
        self._stop()
        if injected:
            self.emu.stats._count("resets")
        self.client.abort(rst=True)
        self.upstream.abort(rst=True)
        self.check_gone()

    def abort(self) -> None:
        """The emulator closes: drop everything now."""
        self._stop()
        self.client.abort(rst=False)
        self.upstream.abort(rst=False)

    def check_finished(self) -> None:
        """Both peers sent a FIN and both were delivered: close both sockets."""
        if self.up.finished and self.down.finished and not self.closed:
            self._stop()
            for side in (self.client, self.upstream):
                if side.transport is not None:
                    side.transport.close()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if not self.closed:
            # the peer failed (a reset, a write error): tell the other peer, after the data
            # still on the way to it, with a reset; nothing more can reach this side
            side.pipe_in.stop()
            if side.pipe_out.closed:
                self.reset(injected=False)
            else:
                side.pipe_out.feed_marker(_Marker.LOST)
        self.check_gone()

    def check_gone(self) -> None:
        if self.gone:
            return
        client_done = self.client.transport is None or self.client.lost
        upstream_done = self.upstream.transport is None or self.upstream.lost
        connecting = self.connect_task is not None and not self.connect_task.done()
        if client_done and upstream_done and not connecting and self in self.emu._links:
            self.gone = True
            self.closed = True
            self.emu._links.discard(self)
            self.emu.stats.active -= 1
            self.emu._notify()


@dataclass(frozen=True)
class _Fault:
    kind: str  # "cut", "reset", "corrupt"
    direction: Direction = "up"
    after: int | None = None
    nbytes: int = 0
    mask: int = 0xFF


# -- the emulator -----------------------------------------------------------------------------


class WanEmulator:
    """A TCP proxy from ``listen`` to ``upstream`` that emulates a WAN link and faults.

    Create it in a running event loop (asyncio or uvloop); ``start()`` (or ``async
    with``) opens the listener; ``aclose()`` closes everything. ``seed`` makes the
    jitter reproducible.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        profile: LinkProfile | None = None,
        seed: int | None = None,
    ) -> None:
        self.upstream = upstream
        self.listen = listen
        self.stats = WanStats()
        self._loop = asyncio.get_running_loop()
        self._rng = random.Random(seed)
        self._profile = LinkProfile() if profile is None else profile
        self._buckets: dict[str, _Bucket] = {d: _Bucket() for d in _DIRECTIONS}
        self._configure_buckets()
        self._server: asyncio.AbstractServer | None = None
        self._address: tuple[str, int] | None = None
        self._links: set[_Link] = set()
        self._open: set[_Side] = set()  # sides whose socket is open
        self._tasks: set[asyncio.Task[None]] = set()
        self._upcoming: list[tuple[_Fault, int]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._stalled = False
        self._stall_timer: asyncio.TimerHandle | None = None
        self._refusing = False
        self._closing = False
        self._idle: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound address (``listen`` may have port 0)."""
        if self._closing:
            raise RuntimeError("the WAN emulator is closed")
        if self._server is None:
            host, port = self.listen
            self._server = await self._loop.create_server(
                lambda: _Link(self).client, host, port, reuse_address=True
            )
            sockname = self._server.sockets[0].getsockname()
            self._address = (str(sockname[0]), int(sockname[1]))
        assert self._address is not None
        return self._address

    async def aclose(self) -> None:
        """Close the listener and abort every connection; idempotent."""
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = self._loop.create_future()
        self._closing = True
        try:
            if self._server is not None:
                self._server.close()
            if self._stall_timer is not None:
                self._stall_timer.cancel()
            for link in list(self._links):
                link.abort()  # cancels the connect tasks that can be
            tasks = list(self._tasks)
            self._idle = self._loop.create_future()
            if not self._open:
                self._idle.set_result(None)
            self._notify()
            # no timeout needed: aborted transports report connection_lost on the next turn
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._idle
            if self._server is not None:
                await self._server.wait_closed()
        finally:
            self._closed.set_result(None)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect (after ``start()``)."""
        if self._address is None:
            raise RuntimeError("the WAN emulator has not started")
        return self._address

    @property
    def connections(self) -> int:
        """Connections established to the upstream and still open."""
        return sum(1 for link in self._links if link.established and not link.closed)

    async def wait_connections(self, count: int = 1) -> None:
        """Wait until ``count`` connections are established through the proxy.

        Faults for "current connections" reach only those: call this after connecting a
        client and before injecting a fault into its connection. Wrap in
        ``asyncio.timeout`` as needed.
        """
        while self.connections < count:
            if self._closing:
                raise RuntimeError("the WAN emulator is closed")
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            await waiter

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- the link profile ---------------------------------------------------------------------

    @property
    def profile(self) -> LinkProfile:
        return self._profile

    @profile.setter
    def profile(self, profile: LinkProfile) -> None:
        """Applies to live connections at once."""
        self._profile = profile
        self._configure_buckets()
        for link in list(self._links):
            for pipe in (link.up, link.down):
                pipe.configure(profile)
                if pipe.queue:
                    pipe.pump()
                elif pipe.src_paused and pipe.queued <= pipe.low:
                    pipe._resume_src()

    def _configure_buckets(self) -> None:
        now = self._loop.time()
        for direction in _DIRECTIONS:
            d = cast(Direction, direction)
            self._buckets[d].configure(self._profile.rate_of(d), self._profile.burst_of(d), now)

    # -- faults -------------------------------------------------------------------------------

    def cut(
        self,
        *,
        after: int | None = None,
        direction: Direction = "up",
        current: bool = True,
        upcoming: int = 0,
    ) -> None:
        """Close both peers with a FIN, now or after ``after`` more bytes in ``direction``."""
        fault = _Fault("cut", _check_direction(direction), _check_after(after))
        self._inject(fault, current, upcoming)

    def reset(
        self,
        *,
        after: int | None = None,
        direction: Direction = "up",
        current: bool = True,
        upcoming: int = 0,
    ) -> None:
        """Reset both peers (RST), now or after ``after`` more bytes in ``direction``."""
        fault = _Fault("reset", _check_direction(direction), _check_after(after))
        self._inject(fault, current, upcoming)

    def corrupt(
        self,
        nbytes: int = 1,
        direction: Direction = "up",
        *,
        after: int = 0,
        mask: int = 0xFF,
        current: bool = True,
        upcoming: int = 0,
    ) -> None:
        """XOR ``mask`` into the ``nbytes`` bytes after the next ``after`` in ``direction``."""
        if nbytes < 1:
            raise ValueError(f"corrupt() needs nbytes >= 1, got {nbytes}")
        if not 1 <= mask <= 0xFF:
            raise ValueError(f"corrupt() needs a mask in 1..255, got {mask}")
        fault = _Fault("corrupt", _check_direction(direction), _check_after(after), nbytes, mask)
        self._inject(fault, current, upcoming)

    def stall(self, seconds: float | None = None) -> None:
        """Forward nothing for ``seconds`` (None: until ``resume()``); sockets stay open."""
        if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"stall() needs seconds >= 0 or None, got {seconds}")
        self.stats._count("stalls")
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._stalled = True
        if seconds is not None:
            self._stall_timer = self._loop.call_later(seconds, self.resume)

    def resume(self) -> None:
        """End a stall; what waited is forwarded (subject to the delay and rate)."""
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if not self._stalled:
            return
        self._stalled = False
        for link in list(self._links):
            link.up.pump()
            link.down.pump()

    def refuse(self, on: bool = True) -> None:
        """While on, new connections are accepted and closed at once (a FIN)."""
        self._refusing = on

    def _inject(self, fault: _Fault, current: bool, upcoming: int) -> None:
        if upcoming < 0:
            raise ValueError(f"upcoming must be >= 0, got {upcoming}")
        if upcoming:
            self._upcoming.append((fault, upcoming))
        if current:
            for link in list(self._links):
                link.apply(fault)

    def _apply_upcoming(self, link: _Link) -> None:
        pending = []
        for fault, count in self._upcoming:
            link.apply(fault)
            if count > 1:
                pending.append((fault, count - 1))
        self._upcoming = pending


def _check_direction(direction: str) -> Direction:
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    return cast(Direction, direction)


def _check_after(after: int | None) -> int | None:
    if after is not None and after < 0:
        raise ValueError(f"after must be >= 0, got {after}")
    return after


# -- units ------------------------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_DURATION = re.compile(_NUMBER + r"\s*(us|µs|ms|s)")
_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
_RATE = re.compile(_NUMBER + r"\s*(k|m|g|t|ki|mi|gi|ti)?(bits?(?:/s)?|b/s|B/s)", re.IGNORECASE)
_PREFIXES = {
    "": 1.0,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "ki": 1024.0,
    "mi": 1024.0**2,
    "gi": 1024.0**3,
    "ti": 1024.0**4,
}


def parse_duration(text: str) -> float:
    """Seconds from "50ms", "0.05s", "250us" (or "µs"); "0" alone is 0."""
    value = text.strip()
    if value == "0":
        return 0.0
    match = _DURATION.fullmatch(value)
    if match is None:
        raise ValueError(f"a duration wants a unit (us, ms, s), e.g. 50ms or 0.05s; got {text!r}")
    return float(match[1]) * _DURATION_UNITS[match[2]]


def parse_rate(text: str) -> float:
    """Bytes per second from "100Mbit", "1Gbit", "800kb/s" (bits) or "12MB/s", "12MiB/s"."""
    value = text.strip()
    match = _RATE.fullmatch(value)
    if match is None or "bps" in value.lower():
        raise ValueError(
            "a rate wants a unit: bits as 100Mbit or 100Mb/s, bytes as 12MB/s or 12MiB/s "
            f"(bps is ambiguous); got {text!r}"
        )
    number, prefix, unit = float(match[1]), (match[2] or "").lower(), match[3]
    # b/s and bit are bits; only a capital B is bytes
    bits = unit.lower().startswith("bit") or unit == "b/s"
    rate = number * _PREFIXES[prefix] / (8 if bits else 1)
    if not rate > 0:
        raise ValueError(f"a rate must be > 0, got {text!r}")
    return rate


def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"wants HOST:PORT or [IPv6]:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _format_hostport(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _format_rate(rate: float | None) -> str:
    return "unlimited" if rate is None else f"{rate * 8 / 1e6:g} Mbit/s"


# -- the command line -------------------------------------------------------------------------


def _option(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    def wrapper(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return wrapper


async def _serve(
    upstream: tuple[str, int], listen: tuple[str, int], profile: LinkProfile
) -> WanStats:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with WanEmulator(upstream, listen=listen, profile=profile) as wan:
            print(f"listening on {_format_hostport(wan.address)}", flush=True)
            print(
                f"wan: -> {_format_hostport(upstream)}, delay {profile.delay * 1e3:g} ms "
                f"+/- {profile.jitter * 1e3:g} ms, rate up {_format_rate(profile.rate_of('up'))}"
                f", down {_format_rate(profile.rate_of('down'))}",
                file=sys.stderr,
                flush=True,
            )
            await stop.wait()
            return wan.stats
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m replicator.transport.wan``: proxy until SIGINT/SIGTERM, then exit 0."""
    parser = argparse.ArgumentParser(
        prog="python -m replicator.transport.wan",
        description="A TCP proxy that emulates a WAN link: delay, jitter, a rate cap.",
    )
    hostport = _option(_parse_hostport)
    duration = _option(parse_duration)
    rate = _option(parse_rate)
    parser.add_argument("--listen", type=hostport, default=("127.0.0.1", 0), metavar="HOST:PORT")
    parser.add_argument("--to", type=hostport, required=True, metavar="HOST:PORT")
    parser.add_argument("--delay", type=duration, default=0.0, help="one-way, e.g. 50ms")
    parser.add_argument("--jitter", type=duration, default=0.0, help="+/-, e.g. 5ms")
    parser.add_argument("--rate", type=rate, default=None, help="each way, e.g. 100Mbit")
    parser.add_argument("--down-rate", type=rate, default=None, help="upstream to client")
    args = parser.parse_args(argv)
    profile = LinkProfile(
        delay=args.delay, jitter=args.jitter, rate=args.rate, down_rate=args.down_rate
    )
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        try:
            stats = runner.run(_serve(args.to, args.listen, profile))
        except OSError as exc:
            print(f"wan: error: {exc}", file=sys.stderr)
            return 1
    print(
        f"wan: {stats.accepted} connections, {stats.bytes_up} bytes up, "
        f"{stats.bytes_down} bytes down, faults {stats.faults or 'none'}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
