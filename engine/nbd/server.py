"""asyncio NBD server: the I/O adapter around the sans-IO codec in ``proto.py``.

Each connection is an ``asyncio.BufferedProtocol``: the socket reads straight into its
``ServerConnection``'s buffers; option events are answered on the spot. Each transmission
request starts at once and runs until it first has to wait (most small writes and
reads never do and finish right there); only then does it become a task. So pipelined
requests proceed concurrently and replies go out in completion order (the protocol
allows it). Replies are queued whole and all those finished in one loop iteration
leave in one ``writelines`` call, so they never interleave and a busy connection pays
one system call per batch.

Backpressure: a connection stops reading while it has ``max_inflight`` requests or
``max_inflight_bytes`` of payload in flight, or while the transport's write buffer is
above its high-water mark (a client that does not read its replies).

A client that breaks the protocol is disconnected; it never affects other clients.
A client that disconnects mid-request loses nothing that was acknowledged: requests
already received run to completion (their replies are dropped). One that only shuts down
its sending side still gets every reply, then the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Coroutine, Generator, Mapping
from typing import Any, Final, cast

import structlog

from replicator.engine.nbd.backend import Export, JournaledFileExport, NbdIOError
from replicator.engine.nbd.endpoints import stale_unix_socket
from replicator.engine.nbd.gate import WriteGate
from replicator.engine.nbd.native import MAX_BATCH, NATIVE, scan_writes
from replicator.engine.nbd.proto import (
    DEFAULT_MAX_REQUEST,
    NEED_DATA,
    REPLY_SIZE,
    REQUEST_SIZE,
    BlockSize,
    Cmd,
    CmdFlag,
    Disconnect,
    Errno,
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
    check_request,
    parse_request,
    reply_header,
)

log = structlog.get_logger("replicator.nbd")

HANDSHAKE_TIMEOUT: Final = 30.0
SHUTDOWN_TIMEOUT: Final = 60.0
_SMALL_REPLY: Final = 64 * 1024  # below this, header and data are joined into one write
_NAMES_SHOWN: Final = 8  # export names an unknown-export error lists
# plain ints for the per-request path (IntEnum/IntFlag operators run Python code)
_READ, _WRITE, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.FLUSH)
_TRIM, _WRITE_ZEROES = int(Cmd.TRIM), int(Cmd.WRITE_ZEROES)
_FUA, _NO_HOLE = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE)
_ENOSPC, _EIO = int(Errno.ENOSPC), int(Errno.EIO)


class NbdServer:
    """Serves ``exports`` (by name) over unix sockets and/or loopback TCP."""

    def __init__(
        self,
        exports: Mapping[str, Export],
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        max_inflight: int = 64,
        max_inflight_bytes: int = 128 * 1024 * 1024,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
        gate: WriteGate | None = None,
    ) -> None:
        self.exports = dict(exports)
        self.gate = gate  # changes (write, zeroes, trim) wait while it is held
        self.max_request = max_request
        self.block_size = BlockSize.for_max_request(max_request)
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max(max_inflight_bytes, max_request)
        self.handshake_timeout = handshake_timeout
        self.shutdown_timeout = shutdown_timeout
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._connections: set[_Connection] = set()
        self._past_end: set[str] = set()  # exports a WRITE past the end was reported for
        self.shutting_down = False
        self._closed = False

    async def start_unix(self, path: str, *, mode: int = 0o600) -> None:
        """Listen on a unix socket. A stale socket file at ``path`` (nobody accepts on it) is
        replaced; anything else there is refused (``endpoints.stale_unix_socket``)."""
        if await asyncio.to_thread(stale_unix_socket, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _Connection(self), path)
        os.chmod(path, mode)
        self._servers.append(server)
        self._unix_paths.append(path)
        log.info("nbd.listening", socket=path, exports=sorted(self.exports))

    async def start_tcp(self, host: str, port: int) -> int:
        """Listen on TCP; returns the bound port (useful with ``port=0``)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), host, port)
        bound = int(server.sockets[0].getsockname()[1])
        self._servers.append(server)
        log.info("nbd.listening", host=host, port=bound, exports=sorted(self.exports))
        return bound

    def lookup(self, name: str) -> Export | None:
        if name == "" and len(self.exports) == 1:
            return next(iter(self.exports.values()))  # the default export
        return self.exports.get(name)

    def wrote_past_end(self, export: Export) -> None:
        """A WRITE reached past the export (refused, ENOSPC): said once per export, as a
        warning with what to do, because for a growable image it means that the image
        outgrew the room measured when serving began, and the VM now stops on ENOSPC."""
        if export.name in self._past_end:
            return
        self._past_end.add(export.name)
        log.warning(
            "nbd.write_past_export_end",
            export=export.name,
            size=export.size,
            hint=(
                "a client wrote past the end of the export and got ENOSPC. For a qcow2 or "
                "dynamic VHD image this means the image needs more room than was measured "
                "when serving began (it was resized or snapshotted while served, e.g. "
                "block_resize, or qemu-img resize or snapshot through NBD): restart "
                "`replicator send` to measure it again, or give a larger --nbd-size"
            ),
        )

    def _register(self, conn: _Connection) -> None:
        self._connections.add(conn)

    def _unregister(self, conn: _Connection) -> None:
        self._connections.discard(conn)

    async def aclose(self) -> None:
        """Stop accepting, let in-flight requests finish, flush every export. Idempotent.

        New requests arriving meanwhile get ESHUTDOWN (the spec's shutdown signal).
        The exports are flushed but not closed: their owner closes them.
        """
        if self._closed:
            return
        self._closed = True
        self.shutting_down = True
        if self.gate is not None and self.gate.held:
            self.gate.fail()  # held writes were never acknowledged: they fail, not land
        for server in self._servers:
            server.close()
        conns = list(self._connections)
        for conn in conns:
            conn.begin_shutdown()
        waits = [asyncio.ensure_future(conn.wait_idle()) for conn in conns]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.error("nbd.shutdown_timeout", connections=len(pending))
        for name, export in self.exports.items():
            try:
                await export.flush()
            except Exception as exc:
                log.error("nbd.final_flush_failed", export=name, error=str(exc))
        for conn in conns:
            conn.close()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        log.info("nbd.closed")


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.codec = ServerConnection(max_request=server.max_request)
        self.export: Export | None = None
        self.export_flags = 0
        # the export runs of plain small WRITEs go to in one batch (``native.py``), or None
        self.batching: JournaledFileExport | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.log = log
        self.tasks: set[asyncio.Task[None]] = set()  # strong references only
        self.inflight = 0
        self.inflight_bytes = 0
        self.requests = 0
        self.reading_paused = False
        self.writing_paused = False
        self.disconnecting = False  # DISC received, protocol error or shutdown
        self.lost = False
        self.eof = False  # the client shut down its sending side
        self._starved = False  # the codec has no complete event left (it said NEED_DATA)
        self._idle = asyncio.Event()
        self._idle.set()
        self._timer: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._processing = False

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if not peer:
            peer = f"unix:{transport.get_extra_info('sockname')}"
        elif isinstance(peer, tuple):
            peer = f"{peer[0]}:{peer[1]}"
        self.peer = str(peer)
        self.log = log.bind(peer=self.peer)
        self.server._register(self)
        if self.server.shutting_down:
            transport.close()
            return
        transport.write(self.codec.greeting())
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.server.handshake_timeout, self._handshake_timeout)

    # The socket reads straight into the codec's buffers: a large WRITE's payload lands in
    # the buffer that becomes the request's data (see proto.py).
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.codec.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.codec.buffer_updated(nbytes)
        self._starved = False  # until the codec says again that it needs more
        self._process()

    def eof_received(self) -> bool:
        # The client sends nothing more (a half-close, or it is gone). Keep our side open:
        # the requests it sent still run, and are answered while it reads; close once they
        # are (nbdkit does the same). A client that is gone makes the replies fail instead.
        self.eof = True
        self._process()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
        self.log.info(
            "nbd.disconnect",
            export=self.export.name if self.export else None,
            requests=self.requests,
            inflight=self.inflight,
            error=str(exc) if exc else None,
        )
        if not self.inflight:
            self.server._unregister(self)

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()
        self._process()

    # -- event processing -------------------------------------------------------------

    def _busy(self) -> bool:
        return (
            self.writing_paused
            or self.inflight >= self.server.max_inflight
            or self.inflight_bytes >= self.server.max_inflight_bytes
        )

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want_pause = self._busy()
        if want_pause and not self.reading_paused:
            transport.pause_reading()
            self.reading_paused = True
        elif not want_pause and self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False

    def _process(self) -> None:
        if self._processing:
            return  # a request that finished eagerly inside this loop: it goes on by itself
        self._processing = True
        try:
            self._process_events()
        finally:
            self._processing = False
        self._update_reading()
        if self.eof and self._starved and not self.inflight and not self.disconnecting:
            self._hang_up()  # nothing more will come, and every request was answered

    def _process_events(self) -> None:
        codec = self.codec
        while not self.disconnecting and not self._busy():
            if self.batching is not None and self._write_batch(self.batching):
                continue
            try:
                event = codec.next_event()
            except NbdClientError as exc:
                self.log.warning("nbd.protocol_error", error=str(exc))
                self._hang_up()
                return
            if event is NEED_DATA:
                self._starved = True
                break
            self._starved = False
            if isinstance(event, Request):
                self._on_request(event)
            elif isinstance(event, OversizedRequest):
                self.log.warning(
                    "nbd.request_too_large",
                    cmd=event.cmd,
                    length=event.length,
                    limit=self.server.max_request,
                )
                self._write(reply_header(event.handle, Errno.EINVAL))
            elif isinstance(event, Disconnect):
                self.disconnecting = True
                self._close_when_idle()
            elif isinstance(event, OptionGo):
                self._on_go(event)
            elif isinstance(event, OptionExportName):
                self._on_export_name(event)
            elif isinstance(event, OptionList):
                self._write(codec.reply_list(sorted(self.server.exports)))
            elif isinstance(event, OptionAbort):
                self._write(codec.reply_abort())
                self._hang_up()
            elif isinstance(event, OptionOther):
                if event.invalid is not None:
                    self._write(codec.reply_error(event.option, Rep.ERR_INVALID, event.invalid))
                else:
                    self._write(
                        codec.reply_error(
                            event.option,
                            Rep.ERR_UNSUP,
                            f"option {event.option} is not supported by this server",
                        )
                    )

    def _on_go(self, event: OptionGo) -> None:
        codec = self.codec
        if self.server.shutting_down:
            self._write(codec.reply_error(event.option, Rep.ERR_SHUTDOWN, "server shutting down"))
            return
        export = self.server.lookup(event.name)
        if export is None:
            self._write(codec.reply_error(event.option, Rep.ERR_UNKNOWN, self._unknown(event.name)))
            return
        self._write(codec.accept_go(event, export.size, export.flags, self.server.block_size))
        if event.go:
            self._enter_transmission(export)

    def _unknown(self, name: str) -> str:
        """Why ``name`` selects nothing, with the names that would (qemu prints it)."""
        names = sorted(self.server.exports)
        shown = ", ".join(repr(n) for n in names[:_NAMES_SHOWN])
        if len(names) > _NAMES_SHOWN:
            shown += f", ... ({len(names)} in all; NBD_OPT_LIST, nbdinfo --list, has them)"
        if name == "" and names:
            return f"no default export: this server has {len(names)}, name one ({shown})"
        if not names:
            return f"no export named {name!r} (this server exports nothing)"
        return f"no export named {name!r} (exported here: {shown})"

    def _on_export_name(self, event: OptionExportName) -> None:
        export = None if event.name is None else self.server.lookup(event.name)
        if export is None or self.server.shutting_down:
            self.log.warning("nbd.unknown_export", name=event.name)
            self.codec.reject_export_name()
            self._hang_up()
            return
        self._write(self.codec.accept_export_name(export.size, export.flags))
        self._enter_transmission(export)

    def _enter_transmission(self, export: Export) -> None:
        assert self.codec.state is Phase.TRANSMISSION
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.export = export
        self.export_flags = export.flags
        if NATIVE and isinstance(export, JournaledFileExport):
            self.batching = export
        self.log = self.log.bind(export=export.name)
        self.log.info("nbd.connect", size=export.size)

    def _on_request(self, req: Request) -> None:
        self.requests += 1
        export = self.export
        assert export is not None
        if self.server.shutting_down:
            self._write(reply_header(req.handle, Errno.ESHUTDOWN))
            return
        error = check_request(req, export.size, self.export_flags)
        if error:
            if error == _ENOSPC and req.cmd == _WRITE:
                self.server.wrote_past_end(export)
            self.log.info(
                "nbd.request_refused",
                cmd=req.cmd,
                flags=req.flags,
                offset=req.offset,
                length=req.length,
                error=Errno(error).name,
            )
            self._write(reply_header(req.handle, error))
            return
        self.inflight_bytes += req.length if req.cmd <= _WRITE else 0
        self.inflight += 1
        self._idle.clear()
        task = start_eagerly(self._run(export, req))
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _write_batch(self, export: JournaledFileExport) -> bool:
        """The batch path (``native.py``): the run of plain small WRITEs at the front of
        the received bytes, journaled and written at once (``write_batch``), replies
        joined. False when the next request is not one (``next_event`` takes it). What
        ``_on_request`` and ``_run`` check first is checked here: a fence closed, a
        shutdown, the request limit; when the export cannot take the batch now, each of
        its requests goes on as ``_on_request`` alone."""
        gate = self.server.gate
        if self.server.shutting_down or (gate is not None and gate.closed):
            return False
        room = min(MAX_BATCH, self.server.max_inflight - self.inflight)
        taken = self.codec.take_writes(scan_writes, export.file_size, room)
        if taken is None:
            return False
        batch, count, payload = taken
        try:
            done = export.write_batch(batch, count, payload)
        except Exception:
            self.requests += count
            self.log.exception("nbd.request_crashed", cmd=_WRITE, batch=count)
            self._write(b"".join(_batch_replies(batch, count, Errno.EIO)))
            return True
        if done is None:
            at = 0
            for _ in range(count):
                req = parse_request(batch, at)
                self._on_request(req)
                at += REQUEST_SIZE + req.length
            return True
        self.requests += count
        replies, failed = done
        if not failed and (gate is None or not gate.closed):
            self._write(replies)  # the usual case
            return True
        # a write failed (the export reconciles it first), or the fence closed while the
        # batch ran (a frozen process): the replies wait, as _run's do
        self.inflight += count
        self._idle.clear()
        task = asyncio.get_running_loop().create_task(
            self._finish_batch(export, replies, count, failed)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _finish_batch(
        self,
        export: JournaledFileExport,
        replies: bytes,
        count: int,
        failed: list[tuple[int, int]],
    ) -> None:
        """A batch's replies when they cannot go at once: each failed write's error once
        the export has reconciled it; all of them only once the fence lets them (EIO
        each when the target was promoted meanwhile)."""
        errors: dict[int, int] = dict.fromkeys((index for index, _ in failed), _EIO)
        gate = self.server.gate
        try:
            if failed:
                errors.update(await export.finish_batch(failed))
            if gate is not None and gate.closed and not await gate.passable():
                errors = dict.fromkeys(range(count), _EIO)
        except Exception:
            self.log.exception("nbd.request_crashed", cmd=_WRITE, batch=count)
            errors = dict.fromkeys(range(count), _EIO)
        finally:
            self.inflight -= count
        for index in range(count):
            reply = replies[index * REPLY_SIZE : (index + 1) * REPLY_SIZE]
            error = errors.get(index, 0)
            self._write(reply_header(int.from_bytes(reply[8:]), error) if error else reply)
        self._after_request()

    async def _run(self, export: Export, req: Request) -> None:
        data: bytes | None = None
        error = 0
        cmd = req.cmd
        gate = self.server.gate
        try:
            if (
                gate is not None
                and gate.closed
                and cmd != _READ
                and cmd != _FLUSH
                and not await gate.passable()
            ):
                error = Errno.EIO  # fenced for good: the target was promoted
            elif cmd == _WRITE:  # the hot paths first, without a further coroutine
                await export.write(req.offset, req.data, fua=bool(req.flags & _FUA))
            elif cmd == _READ:
                data = await export.read(req.offset, req.length)
            else:
                error = await _execute(export, req)
            if (
                gate is not None
                and not error
                and cmd != _READ
                and cmd != _FLUSH
                and gate.closed
                and not await gate.passable()
            ):
                # let through in time, done past the fence's deadline (a frozen process, a
                # stalled journal): acknowledged only once a renewal says this source is
                # still the primary; the target promoted meanwhile, never
                error = Errno.EIO
        except NbdIOError as exc:
            error = exc.errno
        except Exception:
            self.log.exception("nbd.request_crashed", cmd=req.cmd, offset=req.offset)
            error = Errno.EIO
        finally:
            self.inflight -= 1
            self.inflight_bytes -= req.length if req.cmd <= _WRITE else 0
        if data is not None and len(data) >= _SMALL_REPLY:
            self._write(reply_header(req.handle, error), data)
        elif data is not None:
            self._write(reply_header(req.handle, error) + data)
        else:
            self._write(reply_header(req.handle, error))
        self._after_request()

    def _after_request(self) -> None:
        if not self.inflight:
            self._idle.set()
            if self.lost:
                self.server._unregister(self)
        if self.disconnecting:
            self._close_when_idle()
        elif (self.reading_paused or self.eof) and not self._processing:
            self._update_reading()
            self._process()

    # -- output and teardown ----------------------------------------------------------

    def _write(self, head: bytes, data: bytes | None = None) -> None:
        """Queue a reply; all replies of one loop iteration leave in one system call."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client is gone; the request itself still completed
        self._out.append(head)
        if data is not None:
            self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.writelines(out)

    def _close_transport(self) -> None:
        self._flush_out()  # replies queued before the close still go out
        self.codec.close()
        if self.transport is not None:
            self.transport.close()

    def _close_when_idle(self) -> None:
        if not self.inflight:
            self._close_transport()

    def _hang_up(self) -> None:
        """Stop reading and close; in-flight requests still complete."""
        self.disconnecting = True
        self._close_transport()

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.codec.state is not Phase.TRANSMISSION:
            self.log.warning("nbd.handshake_timeout", timeout=self.server.handshake_timeout)
            self._hang_up()

    def begin_shutdown(self) -> None:
        if self.codec.state is not Phase.TRANSMISSION:
            self._hang_up()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def close(self) -> None:
        self._close_transport()


def _batch_replies(batch: bytes, count: int, error: int) -> list[bytes]:
    """Replies with ``error`` to the ``count`` WRITE requests in ``batch``."""
    out: list[bytes] = []
    at = 0
    for _ in range(count):
        req = parse_request(batch, at)
        out.append(reply_header(req.handle, error))
        at += REQUEST_SIZE + req.length
    return out


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` now, up to its first real suspension; only then give it a task.

    Most requests (a small write or read) finish without ever waiting, and a task per
    request cost about a quarter of the server's time at 4 KiB. This is what Python
    3.12's eager tasks do; here the code before the first suspension runs outside any
    task (``asyncio.current_task()`` is None there), which request code does not need.
    """
    try:
        pending = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_finish(_Suspended(coro, pending)))


class _Suspended:
    """Awaitable continuing a coroutine that was started by hand and is suspended."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Coroutine[Any, Any, None], pending: Any) -> None:
        self.coro = coro
        self.pending = pending  # what it yielded: the future it waits for (or None)

    def __await__(self) -> Generator[Any, None, None]:
        coro, pending = self.coro, self.pending
        while True:
            try:
                yield pending  # the task waits for the future exactly as ``await`` would
            except BaseException as exc:  # cancellation and the like go to the coroutine
                try:
                    pending = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    pending = coro.send(None)
                except StopIteration:
                    return


async def _finish(suspended: _Suspended) -> None:
    await suspended


async def _execute(export: Export, req: Request) -> int:
    """Run a validated FLUSH, WRITE_ZEROES or TRIM; returns the NBD error."""
    cmd = req.cmd
    fua = bool(req.flags & _FUA)
    if cmd == _FLUSH:
        await export.flush()
    elif cmd == _WRITE_ZEROES:
        may_trim = not req.flags & _NO_HOLE
        await export.write_zeroes(req.offset, req.length, fua=fua, may_trim=may_trim)
    elif cmd == _TRIM:
        await export.trim(req.offset, req.length, fua=fua)
    else:  # check_request lets nothing else through
        return Errno.EINVAL
    return 0
