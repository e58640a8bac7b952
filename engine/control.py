"""The control socket: a running ``send`` or ``receive`` answers questions on a unix socket.

The socket lives in the process's state folder (a sender's ``STATE_DIR/control.sock``, a
receiver's ``DIR/.replicator/control.sock``). Only its owner may use it: it is created
under a 0077 umask, then set to 0600 and checked (a socket, mode 0600, our uid) before
the server answers anyone; every connection's peer credentials (``SO_PEERCRED``) are
checked as well, so a user that gets past the file mode (a socket file made wider by
hand) is still refused. Root is allowed, as it can read the state folder anyway.

Protocol, one exchange per connection: the client writes one JSON object on one line
(``{"op": "status"}``, at most ``MAX_REQUEST`` bytes, within ``REQUEST_TIMEOUT`` seconds),
the server answers one JSON object on one line and closes:

* ``{"ok": true, "result": ...}``
* ``{"ok": false, "code": CODE, "error": MESSAGE}`` with CODE one of ``bad_request``,
  ``too_large``, ``timeout``, ``unknown_op``, ``forbidden``, ``failed``.

Operations are handlers in ``ControlServer.handlers`` (op name -> coroutine function taking
the request object): ``ping`` is built in, ``status`` comes from ``engine/monitor.py``,
later ones (rate change, failover) are added the same way.

A socket file left behind by a killed process (nothing answers on it) is replaced at
start; one that answers belongs to a running process, and starting fails with
``ControlBusy`` naming it. The socket is removed on a clean exit.

A sender's state folder also holds ``sender.json``: the job, receiver and capture of the
sender that last ran there and its pid, kept OFD-locked while it runs. The lock is taken
before the socket is touched, so two senders starting at once on one folder cannot take
each other's socket; ``replicator status`` reads the file (without locking it) to name
the job when nothing runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import fcntl
import json
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from replicator.engine.errors import ConfigError, ExitCode, ReplicatorError, cannot_use_folder
from replicator.journal.durable import makedirs_durable, sync_dir

log = structlog.get_logger()

SOCKET_NAME = "control.sock"
SENDER_CLAIM = "sender.json"
MAX_REQUEST = 64 * 1024  # bytes of one request line
MAX_RESPONSE = 16 * 1024 * 1024  # what a client reads at most
REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request line
CLIENT_TIMEOUT = 10.0
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the final NUL
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, len, pid

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlBusy(ConfigError):
    """Another running process answers on the control socket (or holds the claim)."""


class ControlUnavailable(ReplicatorError):
    """Nothing answers on a control socket (no process runs, or it does not answer).
    ``pid``: the process that took the connection and then gave no answer (stopped, or
    stuck), None when none took it."""

    exit_code = ExitCode.CONNECT

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class ControlRefused(ConfigError):
    """The process behind a control socket will not answer us (permissions), or answered
    with an error."""


class RequestError(Exception):
    """A handler's way to answer ``bad_request`` (a missing or malformed argument)."""


class ControlServer:
    """Serve ``handlers`` on the unix socket ``path``; see the module docstring.

    ``owner`` names the process for messages ("a sender for job 'x'"); ``allowed_uids``
    defaults to our effective uid and root.
    """

    def __init__(
        self,
        path: Path,
        handlers: dict[str, Handler] | None = None,
        *,
        owner: str = "a replicator process",
        allowed_uids: frozenset[int] | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.path = path
        self.owner = owner
        self.handlers: dict[str, Handler] = {"ping": self._ping}
        self.handlers.update(handlers or {})
        self.allowed_uids = (
            allowed_uids if allowed_uids is not None else frozenset({os.geteuid(), 0})
        )
        self.request_timeout = request_timeout
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and listen; ControlBusy when a live process answers on ``path``.

        Done on the event loop's thread, without yielding to it: the umask is the whole
        process's, and no other work may create files while it is 0077."""
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(
                self._client, sock=sock, limit=MAX_REQUEST + 1
            )
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("control.listening", path=str(self.path))

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        await close_server(server, self._clients)
        self._unlink()

    # -- setting up the socket file ------------------------------------------------------
    def _bind(self) -> socket.socket:
        directory, name = self.path.parent, self.path.name
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._clear_stale(dir_fd, name)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                old = os.umask(0o077)
                try:
                    sock.bind(_sun_path(self.path, dir_fd))
                finally:
                    os.umask(old)
                os.chmod(name, 0o600, dir_fd=dir_fd)  # then checked without following links
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                self._inode = (st.st_dev, st.st_ino)
                mode = stat.S_IMODE(st.st_mode)
                if not stat.S_ISSOCK(st.st_mode) or mode != 0o600 or st.st_uid != os.geteuid():
                    raise OSError(
                        errno.EPERM,
                        f"control socket came out as mode {mode:o} owned by uid {st.st_uid} "
                        "(wanted 600, ours)",
                    )
                sock.listen(16)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                self._unlink()
                raise
            return sock
        finally:
            os.close(dir_fd)

    def _clear_stale(self, dir_fd: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(
                errno.EEXIST, f"{self.path} exists and is not a socket: move it out of the way"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(_sun_path(self.path, dir_fd))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # left by a process that is gone
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
        else:
            raise ControlBusy(
                f"another process already answers on the control socket {self.path}",
                hint=f"is {self.owner} already running? `replicator status` shows it; stop it "
                "first, or give this one its own state folder",
            )
        finally:
            probe.close()
        os.unlink(name, dir_fd=dir_fd)
        log.info("control.stale_socket_replaced", path=str(self.path))

    def _unlink(self) -> None:
        """Remove the socket file, when it is still the one we made."""
        if self._inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        self._inode = None

    # -- answering -----------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            response = await self._answer(reader, writer)
            writer.write(json.dumps(response, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._clients.discard(task)

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, Any]:
        uid, pid = _peer(writer)
        if uid is None or uid not in self.allowed_uids:
            log.warning("control.refused", path=str(self.path), peer_uid=uid, peer_pid=pid)
            return _error("forbidden", f"uid {uid} may not use this control socket")
        try:
            async with asyncio.timeout(self.request_timeout):
                line = await reader.readuntil(b"\n")
        except TimeoutError:
            return _error("timeout", f"no request line within {self.request_timeout:g} s")
        except asyncio.LimitOverrunError:
            return _error("too_large", f"a request is one line of at most {MAX_REQUEST} bytes")
        except asyncio.IncompleteReadError as exc:
            if len(exc.partial) > MAX_REQUEST:
                return _error("too_large", f"a request is one line of at most {MAX_REQUEST} bytes")
            line = exc.partial  # no newline before EOF: take what came
        if len(line) > MAX_REQUEST + 1:
            return _error("too_large", f"a request is one line of at most {MAX_REQUEST} bytes")
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error("bad_request", f"not JSON: {exc}")
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return _error("bad_request", 'a request is a JSON object with an "op" string')
        op = request["op"]
        handler = self.handlers.get(op)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return _error("unknown_op", f"unknown op {op!r} (known: {known})")
        token = _REQUESTER.set(writer)
        try:
            result = await handler(request)
        except RequestError as exc:
            return _error("bad_request", str(exc))
        except Exception as exc:
            log.exception("control.op_failed", op=op)
            return _error("failed", f"{op} failed: {type(exc).__name__}: {exc}")
        finally:
            _REQUESTER.reset(token)
        return {"ok": True, "result": result}

    async def _ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "owner": self.owner, "ops": sorted(self.handlers)}


async def close_server(server: asyncio.AbstractServer, clients: set[asyncio.Task[None]]) -> None:
    """Stop a small asyncio server (this socket, the metrics endpoint): no new clients,
    the ones being answered cancelled and awaited."""
    server.close()
    for task in list(clients):
        task.cancel()
    for task in list(clients):
        with contextlib.suppress(BaseException):
            await task
    with contextlib.suppress(Exception):
        await server.wait_closed()


# the connection of the request a handler is answering (set around each handler call)
_REQUESTER: contextvars.ContextVar[asyncio.StreamWriter | None] = contextvars.ContextVar(
    "control_requester", default=None
)


def requester_gone() -> bool:
    """Whether the client of the request being answered has closed its end: it was
    interrupted, or it gave up waiting (a receiver stopped for minutes reads the request
    only when it runs again). An operation with lasting effects (a promotion) asks this
    before it acts, so an abandoned request never acts unwatched. False outside a request."""
    writer = _REQUESTER.get()
    sock = writer.get_extra_info("socket") if writer is not None else None
    if sock is None:
        return False
    try:  # on a duplicate: the loop's own socket object offers no recv
        with socket.socket(fileno=os.dup(sock.fileno())) as peer:
            peeked: bytes = peer.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False  # open, and nothing more sent: still waiting for the answer
    except OSError:
        return True
    return peeked == b""


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "error": message}


def _peer(writer: asyncio.StreamWriter) -> tuple[int | None, int | None]:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None, None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None, None
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return uid, pid


def _listener_pid(sock: socket.socket) -> int | None:
    """The pid of the process listening at the far end of connected ``sock`` (the kernel
    records it at connect, whether that process runs, is stopped or is stuck)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    pid: int = _PEERCRED.unpack(raw)[0]
    return pid or None  # 0: not visible from here (another pid namespace)


def _sun_path(path: Path, dir_fd: int) -> str:
    """``path`` as a bindable address: through /proc/self/fd when it is too long."""
    text = os.fspath(path)
    if len(os.fsencode(text)) <= _SUN_PATH_MAX:
        return text
    return f"/proc/self/fd/{dir_fd}/{path.name}"


@contextlib.contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def request(path: Path, op: str, *, timeout: float = CLIENT_TIMEOUT, **args: Any) -> Any:
    """Ask the process behind the control socket ``path``; its ``result``.

    ControlUnavailable when nothing answers (no socket, nothing listening, no answer in
    time); ControlRefused when we may not ask (permissions) or the answer is an error.
    """
    taker: int | None = None  # the process that took the connection (SO_PEERCRED)
    try:
        with _dir_fd(path) as dir_fd, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(_sun_path(path, dir_fd))
            taker = _listener_pid(sock)
            # a server that refuses us answers without reading: its answer is still there
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            data = _read_line(sock)
    except PermissionError as exc:
        raise ControlRefused(
            f"control socket {path}: permission denied",
            hint="run it as the user that runs the process (or as root)",
        ) from exc
    except (TimeoutError, OSError) as exc:
        reason = "no answer in time" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ControlUnavailable(f"control socket {path}: {reason}", pid=taker) from exc
    try:
        response = json.loads(data)
    except ValueError as exc:
        raise ControlUnavailable(
            f"control socket {path}: answer is not JSON ({exc})", pid=taker
        ) from exc
    if not isinstance(response, dict):
        raise ControlUnavailable(f"control socket {path}: answer is not a JSON object", pid=taker)
    if not response.get("ok"):
        code = response.get("code")
        raise ControlRefused(
            f"the process behind {path} answered {code}: {response.get('error')}",
            hint="run it as the user that runs the process (or as root)"
            if code == "forbidden"
            else "check the request; `ping` lists the operations it knows",
        )
    return response.get("result")


async def request_async(
    path: Path, op: str, *, timeout: float = CLIENT_TIMEOUT, **args: Any
) -> Any:
    """``request`` from a coroutine, in a daemon thread: a command interrupted while it
    waits (SIGINT, SIGTERM) exits at once, where ``asyncio.to_thread`` held the exit until
    the answer or the timeout came (minutes, with a stuck receiver). The socket closes
    with the process, and the server sees its requester gone (``requester_gone``)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = request(path, op, timeout=timeout, **args)
        except BaseException as exc:
            error = exc
            loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=run, name=f"control-{op}", daemon=True).start()
    return await future


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            if chunks:
                break
            raise
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n") or size > MAX_RESPONSE:
            break
    return b"".join(chunks)


# -- the sender's claim on its state folder ------------------------------------------------


class SenderClaim:
    """``STATE_DIR/sender.json``, OFD-locked while a sender runs (see the module docstring).

    ``__enter__`` raises ControlBusy when another sender holds it, ConfigError when the
    state folder cannot be created; other failures (a read-only or odd file system) are
    logged and the claim is not held (``held`` False): replication goes on without it.
    """

    def __init__(self, state_dir: Path, info: dict[str, Any]) -> None:
        self.path = state_dir / SENDER_CLAIM
        self.state_dir = state_dir
        self.info = info
        self.held = False
        self._fd: int | None = None
        self._made: list[Path] = []  # the folders this claim created, deepest first
        self._before: bytes | None = None  # sender.json as it was before the claim
        self._new = False  # sender.json was made by this claim

    def __enter__(self) -> SenderClaim:
        self._made = _missing_folders(self.state_dir)
        try:
            makedirs_durable(self.state_dir)
        except OSError as exc:
            raise cannot_use_folder(
                f"state folder {self.state_dir}",
                exc,
                hint="create it, fix its permissions, or pick another with --state-dir",
            ) from exc
        self._new = not os.path.lexists(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("control.claim_unavailable", path=str(self.path), error=str(exc))
            return self
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                other = read_claim(self.state_dir) or {}
                job = other.get("job")
                pid = other.get("pid")
                raise ControlBusy(
                    f"a sender{f' for job {job!r}' if job else ''}"
                    f"{f' (pid {pid})' if pid else ''} already runs with state folder "
                    f"{self.state_dir}",
                    hint="stop it first, or give this one its own --state-dir",
                ) from exc
            log.warning("control.claim_unavailable", path=str(self.path), error=str(exc))
            return self
        try:  # what a failed start puts back (``abandon``); None for a file it made
            self._before = None if self._new else os.pread(fd, 1 << 20, 0)
        except OSError:
            self._before = None
        self._fd = fd
        self.held = True
        # "records_end": this release says how its runs end (``record_end``); a claim without
        # it was written by an older one, which never did (``at_rest.last_run``)
        self.info = {**self.info, "pid": os.getpid(), "started": time.time(), "records_end": True}
        self._write(self.info)
        return self

    def record_end(self, error: BaseException | None) -> None:
        """Say in the claim how this sender ended (``ended``; ``error`` and ``exit_code``
        when a failure ended it), so that ``status`` at rest can tell a run that failed
        (a ``send --once`` from cron that could not reach its receiver) from one that
        completed; a sender killed before it could say leaves no ``ended``."""
        if self._fd is None:
            return
        end: dict[str, Any] = {"ended": time.time(), "error": None, "exit_code": None}
        if error is not None:
            code = error.exit_code if isinstance(error, ReplicatorError) else ExitCode.BUG
            end.update(error=str(error) or type(error).__name__, exit_code=int(code))
        self._write({**self.info, **end})

    def abandon(self) -> None:
        """Undo the claim of a start that failed before the sender did anything (a
        metrics address in use, another process's control socket): ``sender.json`` as it
        was (removed when this claim made it) and the folders the claim made removed, so
        that ``status`` shows no job that never ran and a previous run's record stays."""
        if self._fd is None:
            return
        fd, self._fd, self.held = self._fd, None, False
        try:
            if self._before is not None:
                os.pwrite(fd, self._before, 0)
                os.ftruncate(fd, len(self._before))
            elif self._new:  # made by this claim: removed while still locked
                self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("control.claim_not_undone", path=str(self.path), error=str(exc))
        finally:
            os.close(fd)
        for folder in self._made:  # deepest first; only what is left empty
            try:
                folder.rmdir()
            except OSError:
                break
            with contextlib.suppress(OSError):
                sync_dir(folder.parent)

    def _write(self, info: dict[str, Any]) -> None:
        assert self._fd is not None
        data = json.dumps(info, sort_keys=True).encode() + b"\n"
        try:  # written over (padded with the blanks JSON allows), then cut: never empty
            old = os.fstat(self._fd).st_size
            os.pwrite(self._fd, data.ljust(old, b" "), 0)
            os.ftruncate(self._fd, len(data))
        except OSError as exc:  # the file names the job for `status` at rest; not vital
            log.warning("control.claim_unwritable", path=str(self.path), error=str(exc))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the description drops its OFD lock
            self._fd = None
        self.held = False


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist, deepest first."""
    missing: list[Path] = []
    while not os.path.lexists(path) and path.parent != path:
        missing.append(path)
        path = path.parent
    return missing


def read_claim(state_dir: Path) -> dict[str, Any] | None:
    """What ``sender.json`` says (the sender that runs or last ran there), or None."""
    try:
        raw = json.loads((state_dir / SENDER_CLAIM).read_bytes())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def claim_held(state_dir: Path) -> bool:
    """True while a sender holds ``sender.json`` (tested without taking the lock)."""
    try:
        fd = os.open(state_dir / SENDER_CLAIM, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
        return bool(_FLOCK.unpack(got)[0] != fcntl.F_UNLCK)
    except OSError:
        return False
    finally:
        os.close(fd)
