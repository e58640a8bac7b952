"""Helpers for integration tests: real replicator processes and real qemu tools."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import blake3
import pytest

from replicator.engine.errors import ReplicatorError
from replicator.transport import Message, Ping

REPLICATOR = [sys.executable, "-m", "replicator.cli"]
# -q: warnings and errors only. Info lines (one per cycle, per connection) would fill the
# logs of long runs (and any pipe nobody reads: see LoggedPopen); tests of those lines use
# LOUD_ENV
ENV = {**os.environ, "REPLICATOR_LOG_FORMAT": "json", "REPLICATOR_QUIET": "1"}
LOUD_ENV = {k: v for k, v in ENV.items() if k != "REPLICATOR_QUIET"}


class LoggedPopen(subprocess.Popen[str]):
    """A child (text mode) whose stderr goes to a file, never to a pipe: ``log``, appended
    to, else an unlinked temporary file. Nobody has to read a file while the child runs;
    a pipe holds 64 KiB, and a long-lived child that logged more into one nobody read
    blocked in write(2) on its log and stopped serving (the kill cycles' "NBD writer did
    not pause").

    ``stderr`` reads that file from where this child's output begins, as a pipe would be
    read, except that ``read()`` returns what is there now instead of waiting for the end:
    after the child exits (``poll()``, ``wait()``), all of it. ``communicate()`` waits for
    the child, then reads."""

    def __init__(self, args: list[str], *, log: Path | None = None, **popen: Any) -> None:
        assert "stderr" not in popen, "a LoggedPopen's stderr is its log"
        popen.pop("text", None)
        with tempfile.TemporaryFile("w+b") if log is None else log.open("ab") as sink:
            start = os.lseek(sink.fileno(), 0, os.SEEK_END)
            # another open file description of the same file: its own offset
            reader = open(f"/proc/self/fd/{sink.fileno()}", "rb")  # noqa: SIM115
            reader.seek(start)
            try:
                super().__init__(args, stderr=sink, text=True, **popen)
            except BaseException:
                reader.close()
                raise
        self.stderr = io.TextIOWrapper(reader, errors="replace")
        self._said = ""

    def communicate(
        self, input: str | None = None, timeout: float | None = None
    ) -> tuple[str, str]:
        err, self.stderr = self.stderr, None  # stdin and stdout as Popen does them; waits
        try:
            out = super().communicate(input, timeout)[0]
        finally:
            self.stderr = err
        assert err is not None
        if not err.closed:  # a second call answers the same, as Popen's does
            self._said = err.read()
            err.close()  # as a pipe is once communicate() has read it
        return out, self._said


def require_tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: run `make test`, which installs the Debian packages"
    return path


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` ("16m") mounted at ``mountpoint`` (made) for the block: a small
    disk a test fills (root, as in CI)."""
    mountpoint.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                   check=True)  # fmt: skip
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


_DRAW = random.SystemRandom()  # not the global generator, which hypothesis seeds per test


def free_port() -> int:
    """A port free now, for a process to listen on later: drawn below the kernel's
    ephemeral range, where the port 0 of a bind would come from, so the outgoing
    connections of every test running meanwhile (which take ephemeral ports) cannot take
    it before the listener binds it."""
    low = _ephemeral_low()
    for _ in range(1000):
        port = _DRAW.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port found between 10000 and {low}")


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return low if low > 11_000 else 32768


def replicator(
    *args: str, check: bool = False, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*REPLICATOR, *args], capture_output=True, text=True, timeout=timeout, env=ENV, check=check
    )


def one_line_error(stderr: str) -> str:
    """The one ``replicator: error:`` line a failed command prints (asserts there is one)."""
    lines = [line for line in stderr.splitlines() if line.startswith("replicator: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def qemu_img(*args: str) -> str:
    require_tool("qemu-img")
    return subprocess.run(
        ["qemu-img", *args], check=True, capture_output=True, text=True, timeout=120
    ).stdout


def qemu_io(fmt: str, path: Path | str, *commands: str) -> None:
    require_tool("qemu-io")
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    cmd.append(str(path))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "error" not in out.stdout.lower(), out.stdout + out.stderr


# what every nbdsh script may use: nbd_errno(exc), an nbd.Error's errno name
_NBDSH_PRELUDE = (
    "import errno\n"
    "def nbd_errno(exc):\n"  # a name in libnbd 1.14, a number in later versions
    "    return exc.errno if isinstance(exc.errno, str) else errno.errorcode[exc.errno]\n"
)


def nbdsh(script: str, timeout: float = 120) -> str:
    """Run a Python ``script`` in libnbd's ``nbdsh`` (``h`` is an unconnected handle,
    ``nbd`` the module); returns its output, failing with it when nbdsh exits non-zero.

    nbdsh runs ``python3 -m nbd``: the Python beside it is the one its package installed
    the module for (not a pyenv or venv ``python3`` earlier on ``PATH``).
    """
    path = require_tool("nbdsh")
    env = {**os.environ, "PATH": f"{os.path.dirname(path)}:{os.environ.get('PATH', '')}"}
    out = subprocess.run(
        [path, "-c", _NBDSH_PRELUDE + script],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    assert out.returncode == 0, f"nbdsh exited {out.returncode}:\n{out.stdout}{out.stderr}"
    return out.stdout


def allocated(path: Path) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of ``path`` its file system holds blocks for, merged
    and cut at its size, as ``filefrag`` (FIEMAP, e2fsprogs) lists them: written and
    unwritten (fallocated, zeroed in place) extents alike; SEEK_DATA and ``qemu-img map``
    call unwritten ones holes on ext4 and XFS, so they cannot tell a preallocated disk
    from a sparse one. The check that a replica's allocation is its source's."""
    out = subprocess.run(
        [require_tool("filefrag"), "-v", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    head = re.search(r"is (\d+) \(\d+ blocks? of (\d+) bytes\)", out)
    assert head is not None, out
    size, block = int(head[1]), int(head[2])
    ranges: list[tuple[int, int]] = []
    for m in re.finditer(r"^\s*\d+:\s+(\d+)\.\.\s*(\d+):", out, re.MULTILINE):
        lo, hi = int(m[1]) * block, min((int(m[2]) + 1) * block, size)
        if hi <= lo:
            continue
        if ranges and ranges[-1][1] >= lo:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], hi))
        else:
            ranges.append((lo, hi))
    return ranges


def qemu_compare(
    fmt: str, a: Path, b: Path, *, shared: bool = False
) -> subprocess.CompletedProcess[str]:
    """``qemu-img compare``; ``shared`` (-U) reads an image a sender is serving over NBD,
    which holds QEMU's write lock on it (engine/imagelock.py)."""
    return subprocess.run(
        ["qemu-img", "compare", *(["-U"] if shared else []), "-f", fmt, "-F", fmt, str(a), str(b)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def distinct_random_disk(path: Path, size: int) -> None:
    """``size`` bytes (whole MiB) of incompressible data, every 1 MiB block distinct: a
    rotation of one random MiB, far cheaper than ``os.urandom(size)``."""
    block = os.urandom(1024 * 1024)
    with path.open("wb") as f:
        for i in range(size // len(block)):
            f.write(block[i:] + block[:i])


def b3(path: Path) -> str:
    h = blake3.blake3()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return str(h.hexdigest())


@dataclass(frozen=True)
class ProcessEntry:
    """One process as /proc shows it: its parent, its state letter ("Z": a zombie) and
    its arguments."""

    pid: int
    ppid: int
    state: str
    argv: list[bytes]


def process_entry(pid: int) -> ProcessEntry | None:
    """``pid`` as /proc shows it now, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"
    return ProcessEntry(pid, int(fields[1]), fields[0], argv)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may take its time)."""
    entry = process_entry(pid)
    return entry is not None and entry.state != "Z"


def processes() -> Iterator[ProcessEntry]:
    """Every process /proc lists (one that ends while being read is left out)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := process_entry(int(entry))) is not None:
            yield found


def wait_port(port: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """Until ``proc`` listens on ``port`` (fails at once if it exits): 60 s, as a start
    took more than 20 on a loaded 2-core machine running three test workers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                said = proc.stderr.read()[-3000:] if proc.stderr is not None else ""
                raise AssertionError(f"receiver exited with {proc.returncode}:\n{said}") from None
            if time.monotonic() > deadline:
                raise AssertionError("receiver did not start listening") from None
            time.sleep(0.05)


@dataclass
class ReceiverProc:
    port: int
    dir: Path
    proc: subprocess.Popen[str]
    state_dir: Path | None = None  # --state-dir, when not the default DIR/.replicator

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def state_root(self) -> Path:
        """The folder of the receiver's job state folders."""
        return self.state_dir or self.dir / ".replicator"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def start_receiver(
    directory: Path,
    port: int | None = None,
    log: Path | None = None,
    security: tuple[str, ...] = ("--insecure",),
    state_dir: Path | None = None,
    nofile: int | None = None,
) -> ReceiverProc:
    """A real receiver; its log is appended to ``log``, or to a temporary file
    (``LoggedPopen``: never a pipe, which would block its logging once full). ``security``:
    --insecure, or e.g. ("--tls-dir", DIR, "--allow", "sender:vm1"). ``nofile``: its
    limit of open files (soft and hard)."""
    port = port or free_port()
    state = ("--state-dir", str(state_dir)) if state_dir is not None else ()
    proc = LoggedPopen(
        [*REPLICATOR, "receive", "--listen", f"127.0.0.1:{port}", "--dir", str(directory),
         *state, *security],
        log=log,
        stdout=subprocess.DEVNULL,
        env=ENV,
        preexec_fn=None if nofile is None else lambda: _limit_files(nofile),
    )  # fmt: skip
    wait_port(port, proc)
    return ReceiverProc(port, directory, proc, state_dir)


def _limit_files(nofile: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


def send_once(
    receiver: ReceiverProc,
    job: str,
    state: Path,
    *volumes: Path,
    extra: tuple[str, ...] = (),
    security: tuple[str, ...] = ("--insecure",),
) -> dict[str, Any]:
    out = replicator(
        "send", "--to", receiver.address, "--job", job, "--state-dir", str(state),
        "--once", "--json", *security, *extra, *map(str, volumes),
    )  # fmt: skip
    assert out.returncode == 0, f"send failed ({out.returncode}): {out.stderr[-3000:]}"
    summary: dict[str, Any] = json.loads(out.stdout)
    return summary


def forced_failover(
    tmp_path: Path, state: Path | None = None, size: str = "64M", target: Path | None = None
) -> tuple[Path, Path, Path, Path]:
    """One `send --once` of a ``size`` raw disk (job ``vm``) to a receiver on ``target``
    (default ``tmp_path/target``), the receiver stopped, `failover --force` at rest (it must
    answer generation 2); returns (disk, state, target, replica)."""
    disk, target = tmp_path / "disk.img", target or tmp_path / "target"
    state = state or tmp_path / "state"
    qemu_img("create", "-q", "-f", "raw", str(disk), size)
    qemu_io("raw", disk, "write -P 0x11 0 8M")
    rcv = start_receiver(target)
    try:
        send_once(rcv, "vm", state, disk)
    finally:
        assert rcv.stop() == 0
    out = replicator("failover", "--dir", str(target), "--job", "vm", "--force", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["generation"] == 2, out.stdout
    return disk, state, target, target / "vm" / disk.name


def start_send(
    address: str, job: str, state: Path, *volumes: Path, extra: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    """A continuous ``send`` (``extra``: ``--interval`` and the like) to the receiver at
    ``address``, insecure; its stderr (``LoggedPopen``) for ``wait_for``'s message."""
    return LoggedPopen(
        [*REPLICATOR, "send", "--to", address, "--job", job, "--state-dir", str(state),
         "--insecure", *extra, *map(str, volumes)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip


def receiver_fixture(tmp_path: Path) -> Iterator[ReceiverProc]:
    rcv = start_receiver(tmp_path / "target")
    try:
        yield rcv
    finally:
        rcv.stop()


def wait_for(
    done: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 90
) -> None:
    """Poll ``done`` until it holds; fail with ``proc``'s stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"exited {proc.returncode} waiting for {what}: {err[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def status_json(state_dir: Path | None = None, directory: Path | None = None) -> dict[str, Any]:
    """What `replicator status [--state-dir S] [--dir D] --json` prints, got in this
    process by the command's own code (``status_snapshot``) and through JSON as the
    command prints it. For polls: a `replicator status` process costs ~0.3 s of CPU (its
    imports) and ~0.6 s, and a test polling it every 0.1-0.2 s kept a core busy that the
    processes under test and the other workers needed. Tests of the command itself run
    it. Raises ReplicatorError where the command exits with an error."""
    from replicator.cli.status_cmd import status_snapshot

    answer: dict[str, Any] = json.loads(
        json.dumps(status_snapshot(state_dir, directory), sort_keys=True)
    )
    return answer


def sender_job(state: Path) -> dict[str, Any]:
    """A sender's job as ``status --json`` shows it ({} when that fails: not started yet)."""
    try:
        job: dict[str, Any] = status_json(state_dir=state)["jobs"][0]
    except (ReplicatorError, OSError):
        return {}
    return job


def sender_errors(state: Path) -> dict[str, int]:
    """A running sender's error counts by kind (``status --json``); {} before it has one."""
    errors: dict[str, int] = sender_job(state).get("errors", {})
    return errors


class LiveNbdSender:
    """A continuous `send --capture nbd` of one 64 MiB raw image (``disk.raw`` under
    ``tmp_path``), job vm1, to ``receiver``; made once its first sync is done and its
    export serves (``until``: "export", once it serves; "start", at once; ``fresh=False``:
    the image is kept; ``loud``: info events logged too)."""

    def __init__(
        self,
        tmp_path: Path,
        receiver: ReceiverProc,
        *extra: str,
        state: Path | None = None,
        security: tuple[str, ...] = ("--insecure",),
        fresh: bool = True,
        until: str = "sync",
        loud: bool = False,
        log: Path | None = None,
    ) -> None:
        self.source, self.sock = tmp_path / "disk.raw", tmp_path / "nbd.sock"
        self.log = log  # its stderr goes there (read while it runs), else to a temporary file
        self.state = state or tmp_path / "state"
        if fresh:
            qemu_img("create", "-q", "-f", "raw", str(self.source), "64M")
        self.replica = receiver.dir / "vm1" / "disk.raw"
        self.proc = LoggedPopen(
            [*REPLICATOR, "send", "--to", receiver.address, "--job", "vm1", "--state-dir",
             str(self.state), "--capture", "nbd", "--nbd-socket", str(self.sock), *extra,
             *security, str(self.source)],
            log=log, stdout=subprocess.DEVNULL, env=LOUD_ENV if loud else ENV,
        )  # fmt: skip
        if until == "sync":
            wait_for(lambda: self.sock.exists() and self.caught_up(), self.proc, "the first sync")
        elif until == "export":
            wait_for(self.sock.exists, self.proc, "the export")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk.raw?socket={self.sock}"

    def write(self, *commands: str) -> None:
        """qemu-io commands, as the VM would write: through the export (fails if gone)."""
        qemu_io("raw", self.uri, *commands, "flush")

    def caught_up(self) -> bool:
        return (
            self.replica.exists()
            and qemu_compare("raw", self.source, self.replica, shared=True).returncode == 0
        )

    def stop(self) -> tuple[int, str]:
        """SIGTERM (if it still runs): its exit code and stderr."""
        code, err = stop_and_read(self.proc)
        return code, err if self.log is None else self.log.read_text(errors="replace")


def stop_and_read(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    """SIGTERM ``proc`` if it still runs; its exit code and stderr (a pipe read to the end,
    or a ``LoggedPopen``'s file once it exited)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=timeout)[1]
    return proc.returncode, err or ""


def logs_after_failure(**procs: subprocess.Popen[str]) -> str:
    """SIGTERM each process still running and return the end of each one's stderr,
    for an assertion message: a failure that needs load to show up is diagnosed from it."""
    parts = []
    for name, proc in procs.items():
        try:
            err = stop_and_read(proc)[1]
        except (subprocess.TimeoutExpired, ValueError) as exc:
            err = f"(no log: {exc!r})"
        parts.append(f"--- {name} (exit {proc.returncode}) ---\n{err[-6000:]}")
    return "\n".join(parts)


def is_mounted(mnt: Path) -> bool:
    return any(
        line.split()[1] == str(mnt) for line in Path("/proc/mounts").read_text().splitlines()
    )


@pytest.fixture(name="folder")
def fuse_folder(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A VM folder with its domain XML, and an empty mount point (unmounted at the end):
    import it as ``folder`` into a FUSE test module."""
    source, mnt = tmp_path / "vm", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    (source / "vm.xml").write_text("<domain><name>vm</name></domain>\n")
    yield source, mnt
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def start_fuse_sender(
    receiver: ReceiverProc,
    tmp_path: Path,
    source: Path,
    mnt: Path,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen[str]:
    """A continuous `send --capture fuse` of ``source`` (job fvm), once its mount is up
    (its stderr: ``LoggedPopen``)."""
    proc = LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "fvm", "--state-dir",
         str(tmp_path / "state"), "--capture", "fuse", "--mount", str(mnt), "--insecure",
         *extra, str(source)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not is_mounted(mnt):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "mount did not appear"
        time.sleep(0.05)
    return proc


def idle_qemu_writer(fmt: str, path: Path) -> subprocess.Popen[bytes]:
    """An idle ``qemu-io`` with ``path`` open for writing, as a running VM has its disk:
    returned once the kernel shows its locks (/proc fdinfo, not our code). Kill it."""
    require_tool("qemu-io")
    proc = subprocess.Popen(["qemu-io", "-f", fmt, "-c", "sleep 60000", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while not _holds_a_lock(proc.pid, path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"qemu-io could not open {path} for writing")
        time.sleep(0.05)
    return proc


def _holds_a_lock(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open with a lock on it (/proc fdinfo)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if Path(os.readlink(fd)) != path:
                continue
            info = (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text()
        except OSError:
            continue
        if "lock:" in info:
            return True
    return False


def peak_traced(work: Callable[[], object]) -> int:
    """The most memory Python allocations held while ``work`` ran (tracemalloc's peak)."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class _Receives(Protocol):
    async def recv(self, timeout: float | None = None) -> Message: ...


async def answer_to_hello(conn: _Receives, timeout: float = 30) -> Message:
    """The receiver's answer to the Hello just sent on ``conn`` (a Welcome, Refuse or
    Error), past the Pings a receiver sends while it opens the job
    (``receiver.pinging_meanwhile``: every second; a loaded machine reaches it). A sender
    takes those without answering: the protocol has no Pong before the Welcome."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await conn.recv(timeout=max(0.1, deadline - time.monotonic()))
        if not isinstance(msg, Ping):
            return msg
