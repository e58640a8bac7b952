"""Real I/O errors, on cue: a FUSE passthrough in its own process, driven from the test.

The processes under test (``replicator receive --dir``, ``replicator send --state-dir``)
get their directory on a faultfs mount. Their syscalls reach a real file system through
``python -m tests.faultfs`` (see :mod:`tests.faultfs.fs`), which fails the operations a
test asked for with the errno it asked for (ENOSPC, EIO, EDQUOT, ...), and performs
everything else on SOURCE_DIR. So an fsync really returns EIO, a write(2) really gets
ENOSPC and writes nothing, and the code under test handles what a sick disk would give
it, not a mocked call.

Example::

    with FaultFS(tmp_path / "real", tmp_path / "dir") as fs:
        receiver = start_receiver(fs.mountpoint)          # writes through the mount
        rule = fs.add("fsync", errno.EIO, path="*journal/*", after=2, times=1)
        ...                                               # drive a send
        fs.wait_for_hit(rule)
        assert fs.hits()[str(rule)] == 1
        fs.clear()                                        # healthy disk again

``add`` returns a rule id. ``op`` is one of :data:`OPS` or ``"*"``; ``path`` is an
:func:`fnmatch.fnmatchcase` glob on the path relative to the mount root (``*`` also
matches ``/``; a rename matches on its old or its new path, so both a temp name and the
final name of an atomic write can be aimed at). ``after`` lets that many matching ops
pass first; ``times`` limits how often the rule fires (None: until removed). A firing
rule fails the op without performing it; ``partial=True`` (write only) writes the first
half of the request and then fails. Any errno in 1..511 but ENOSYS may be injected (the
kernel turns larger ones into EIO, and takes ENOSYS as "op not implemented": it would
stop sending that op for the rest of the mount).

``budget(n)`` turns the mount into a small disk: writes and fallocate may add ``n`` more
bytes in total, a write that crosses the budget is cut short (write(2) returns the short
count) and the next one gets ENOSPC, and statfs reports the budget as free space. It
counts bytes written, not blocks allocated: overwrites spend it too, punching holes and
growing a file with truncate are free, and nothing is given back by unlink.

The control socket speaks JSON lines: one object per request (``{"cmd": "add", "op":
"write", "errno": 28, "path": "*.dat"}``), one per answer (``{"ok": true, "id": 1}`` or
``{"ok": false, "error": "..."}``); commands are ping, add, remove, clear, hits, count,
budget and stats, and track_unsynced and power_cut (a machine losing power: see
:mod:`tests.faultfs.volatile`). :class:`FaultControl` is the client for a mount started
elsewhere, for instance by a helper process that was handed the socket address.

Limits: no hard links (``link`` fails with EPERM), no xattrs, no ``lseek``
SEEK_DATA/SEEK_HOLE through the mount (the kernel treats the file as all data; look in
SOURCE_DIR), no O_TMPFILE, no ``copy_file_range`` offload (callers fall back to copying),
locks are local to the mount (which is what a single host needs). RENAME_WHITEOUT gets
EINVAL. Reads the kernel can serve from its page cache (data written or read earlier
through the same open) never reach the server, so a ``read`` rule catches reads after an
open, or through O_DIRECT. getattr, lookup and readdir are not counted and cannot be
failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Final

__all__ = ["OPS", "FaultControl", "FaultFS", "FaultFSError", "is_mounted", "powered", "rebooted"]

OPS: Final = frozenset(
    {
        "write",
        "read",
        "fsync",  # fsync and fdatasync of a file
        "fsyncdir",
        "flush",  # close(2) of a file (every close of every descriptor)
        "create",  # open(O_CREAT) of a new file, mknod
        "open",  # open of an existing file (O_CREAT on an existing file too)
        "rename",
        "unlink",
        "rmdir",
        "mkdir",
        "symlink",
        "truncate",  # truncate/ftruncate, and open(O_TRUNC) of an existing file
        "chmod",
        "fallocate",  # all modes: allocate, keep size, punch hole, zero range
        "statfs",
    }
)

MOUNT_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 15.0
_REPO: Final = Path(__file__).resolve().parents[2]
_OCTAL: Final = re.compile(r"\\([0-7]{3})")


class FaultFSError(RuntimeError):
    """The faultfs process failed to mount, failed a control request, or misbehaved."""


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """Whether a faultfs mount sits at ``mountpoint`` (give it without symlinks).

    Reads the mount table and makes no syscall on the path: a stat() there (realpath
    does one) would hang on a mount whose server is stuck and fail on one whose server
    died, and from the server itself, once it stops serving, it would wait for itself.
    """
    target = os.path.abspath(mountpoint)
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode(errors="surrogateescape").splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if "-" not in fields[4:]:
            continue
        fstype = fields[fields.index("-", 4) + 1]
        point = _OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4])  # \040 is a space
        if point == target and fstype == "fuse.faultfs":
            return True
    return False


def _address(control: str) -> str:
    """A leading "@" names an abstract unix socket (no file, no path length limit)."""
    return "\0" + control[1:] if control.startswith("@") else control


class FaultControl:
    """Client of a faultfs control socket; usable from any process that knows its address.

    One connection, opened on first use; thread-safe (one request at a time).
    """

    def __init__(self, control: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        self.control = os.fspath(control)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._rfile: Any = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ rules
    def add(
        self,
        op: str,
        errno: int,
        *,
        path: str = "*",
        after: int = 0,
        times: int | None = None,
        partial: bool = False,
    ) -> int:
        """Fail ``op`` on ``path`` with ``errno`` (see the module docstring); the rule id."""
        reply = self._call(
            "add", op=op, errno=errno, path=path, after=after, times=times, partial=partial
        )
        return int(reply["id"])

    def remove(self, rule_id: int) -> bool:
        """Stop one rule (its hit count stays); False when it was not live."""
        return bool(self._call("remove", id=rule_id)["removed"])

    def clear(self) -> None:
        """Remove every rule and the budget: a plain passthrough again."""
        self._call("clear")

    def budget(self, nbytes: int | None) -> None:
        """Allow ``nbytes`` more bytes of writes/fallocate, then ENOSPC (None: no limit)."""
        self._call("budget", bytes=nbytes)

    # ------------------------------------------------------------------ power cut
    def track_unsynced(self) -> None:
        """From now on, keep what each change of a file's data replaces until an fsync
        of the file covers it (``tests/faultfs/volatile.py``), for ``power_cut``."""
        self._call("track_unsynced")

    def power_cut(self, seed: int | None = None) -> dict[str, int]:
        """The machine loses power: every op from now on fails with EIO, and every change
        no fsync covered since ``track_unsynced`` is taken back, newest first (the worst
        case), or with ``seed`` what a random writeback had not written yet (pages in any
        order, names in order). Kill the processes using the mount next, then stop it;
        what is left in ``source`` is what the disk would hold after a reboot. Returns
        files, changes_undone, changes_seen and names_undone."""
        return {k: int(v) for k, v in self._call("power_cut", seed=seed)["undone"].items()}

    # ------------------------------------------------------------------ counters
    def hits(self) -> dict[str, int]:
        """Rule id (as a string) -> how many times it fired, for every rule ever added."""
        return {k: int(v) for k, v in self._call("hits")["hits"].items()}

    def count(self, path: str = "*") -> dict[str, int]:
        """Ops seen since mounting, by kind, on paths matching ``path`` (failed ones too).

        Read it before arming a rule to aim at "the next fsync of the journal" with
        ``after``, or afterwards to see that an op was attempted at all.
        """
        return {k: int(v) for k, v in self._call("count", path=path)["count"].items()}

    def stats(self) -> dict[str, int | None]:
        """writes, bytes_written, max_write, reads, internal_errors, budget_left/refusals."""
        return dict(self._call("stats")["stats"])

    def wait_for_hit(self, rule_id: int, n: int = 1, timeout: float = 30.0) -> None:
        """Block until rule ``rule_id`` has fired ``n`` times (the op under test ran)."""
        deadline = time.monotonic() + timeout
        while self.hits().get(str(rule_id), 0) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rule {rule_id} did not fire {n} times in {timeout} s")
            time.sleep(0.02)

    def ping(self) -> int:
        """The server's pid."""
        return int(self._call("ping")["pid"])

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def _disconnect(self) -> None:
        if self._rfile is not None:
            self._rfile.close()
            self._rfile = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _call(self, cmd: str, **args: Any) -> dict[str, Any]:
        line = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(self.timeout)
                    try:
                        sock.connect(_address(self.control))
                    except OSError:
                        sock.close()
                        raise
                    self._sock, self._rfile = sock, sock.makefile("rb")
                self._sock.sendall(line)
                answer = self._rfile.readline()
            except OSError:
                self._disconnect()
                raise
            if not answer:
                self._disconnect()
                raise FaultFSError(f"faultfs control {self.control} closed the connection")
        reply: dict[str, Any] = json.loads(answer)
        if not reply.get("ok"):
            raise ValueError(f"faultfs refused {cmd}: {reply.get('error')}")
        return reply


class FaultFS(FaultControl):
    """A faultfs mount of ``source`` at ``mountpoint`` for the length of a ``with`` block.

    Entering starts ``python -m tests.faultfs`` (both directories are created if missing)
    and returns once the mount is live and the control socket answers. Leaving unmounts
    (``fusermount3 -u``; when the mount is busy the server is told to stop and detaches
    it lazily), waits for the process, kills it if it hangs, and detaches a mount that
    is still there, also when the block raised. With ``strict`` (the default) leaving
    raises FaultFSError when the server crashed or hit a bug of its own (an internal
    error, which would otherwise pass for an injected fault), unless the block is
    already raising.

    ``control`` defaults to a fresh abstract socket name; ``log`` (the server's stderr)
    defaults to ``<mountpoint>.faultfs.log`` next to the mount point, kept for post-mortems.
    """

    def __init__(
        self,
        source: Path,
        mountpoint: Path,
        *,
        control: str | os.PathLike[str] | None = None,
        log: Path | None = None,
        strict: bool = True,
        timeout: float = 10.0,
    ) -> None:
        if control is None:
            control = f"@faultfs-{os.getpid()}-{secrets.token_hex(6)}"
        super().__init__(control, timeout=timeout)
        self.source = Path(source)
        self.mountpoint = Path(mountpoint)
        self._real_mnt = ""  # resolved before mounting: resolving it later would stat it
        self.log = log if log is not None else Path(f"{mountpoint}.faultfs.log")
        self.strict = strict
        self.proc: subprocess.Popen[bytes] | None = None
        self._logf: Any = None

    def __enter__(self) -> FaultFS:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        except FaultFSError as err:
            if exc_type is None:
                raise
            print(f"faultfs teardown: {err}", file=sys.stderr)  # the block's error wins

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        if self.proc is not None:
            raise FaultFSError("this FaultFS is already running")
        self.source.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._real_mnt = os.path.realpath(self.mountpoint)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
        cmd = [
            sys.executable, "-m", "tests.faultfs", str(self.source), str(self.mountpoint),
            "--control", self.control, "--foreground", "--die-with-parent",
        ]  # fmt: skip
        self._logf = self.log.open("ab")
        # own session: a ^C aimed at pytest must reach the teardown, not the server first
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            self._wait_mounted(self.proc)
        except BaseException:
            self._shutdown(self.proc)
            raise

    def _wait_mounted(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise FaultFSError(f"faultfs exited with {proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError, FaultFSError):
                if self.ping() == proc.pid and is_mounted(self._real_mnt):
                    return
            if time.monotonic() > deadline:
                raise FaultFSError(f"faultfs did not mount in {MOUNT_TIMEOUT} s:\n{self.logs()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Unmount and end the process (idempotent); see the class docstring."""
        proc = self.proc
        if proc is None:
            return
        internal = 0
        if proc.poll() is None:
            with contextlib.suppress(OSError, FaultFSError, ValueError, KeyError):
                internal = int(self.stats()["internal_errors"] or 0)
        forced = self._shutdown(proc)
        problems = []
        if internal:
            problems.append(f"{internal} internal error(s) in faultfs (a bug of the harness)")
        if proc.returncode != 0 and not forced:
            problems.append(f"faultfs exited with {proc.returncode}")
        if problems and self.strict:
            raise FaultFSError("; ".join(problems) + f"\n{self.logs()[-5000:]}")

    def _shutdown(self, proc: subprocess.Popen[bytes]) -> bool:
        """Unmount, stop ``proc`` and detach what is left; True when it had to be killed."""
        forced = False
        try:
            self.close()
            if proc.poll() is None:
                if not (is_mounted(self._real_mnt) and _unmount(self._real_mnt, lazy=False)):
                    proc.send_signal(signal.SIGTERM)  # busy: the server detaches it lazily
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    forced = True
                    proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT)
        finally:
            if is_mounted(self._real_mnt):
                _unmount(self._real_mnt, lazy=True)
            if self._logf is not None:
                self._logf.close()
                self._logf = None
            self.proc = None
        return forced


def powered(source: Path, mountpoint: Path) -> FaultFS:
    """A started mount whose unsynced changes a ``power_cut`` takes back (the caller
    stops it, or hands it to ``rebooted``)."""
    fs = FaultFS(source, mountpoint)
    fs.start()
    try:
        fs.track_unsynced()
    except BaseException:
        fs.stop()
        raise
    return fs


def rebooted(fs: FaultFS) -> FaultFS:
    """The machine is back with what its disk kept after a ``power_cut``: ``fs`` stopped
    (if it was not) and the same folder mounted again by ``powered``."""
    fs.stop()
    return powered(fs.source, fs.mountpoint)


def _unmount(target: str, *, lazy: bool) -> bool:
    """fusermount3 -u [-z], falling back to umount [-l]; whether the mount is gone."""
    commands = []
    if shutil.which("fusermount3"):
        commands.append(["fusermount3", "-u", *(["-z"] if lazy else []), target])
    commands.append(["umount", *(["-l"] if lazy else []), target])
    for cmd in commands:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(cmd, capture_output=True, timeout=30, check=False)
        if not is_mounted(target):
            return True
    return False
