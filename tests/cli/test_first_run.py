"""What a new admin sees: start, progress, cycle and stop lines; inputs checked before any
data moves; plain errors for a wrong --to, an unknown job, a busy job; readable -h."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator.engine.errors import ExitCode
from tests.tools import (
    ENV,
    LOUD_ENV,
    REPLICATOR,
    LoggedPopen,
    ReceiverProc,
    b3,
    free_port,
    one_line_error,
    qemu_img,
    replicator,
    send_once,
)

# the default level (info), progress lines at every report (docs/OPERATIONS.md)
FAST_PROGRESS = {**LOUD_ENV, "REPLICATOR_PROGRESS_PERIOD": "0.000001"}


def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log lines of a run (tests run with REPLICATOR_LOG_FORMAT=json)."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def named(stderr: str, event: str) -> list[dict[str, Any]]:
    return [e for e in events(stderr) if e["event"] == event]


def _wait_same(source: Path, replica: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (replica.exists() and b3(replica) == b3(source)):
        assert time.monotonic() < deadline, f"{replica} did not converge"
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_continuous_send_says_what_it_does(tmp_path: Path, receiver: ReceiverProc) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(16 << 20))  # four scan batches: progress between them
    proc = LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "cont", "--state-dir",
         str(tmp_path / "state"), "--interval", "0.3", "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, env=FAST_PROGRESS,
    )  # fmt: skip
    try:
        _wait_same(disk, receiver.dir / "cont" / "disk.img")
        time.sleep(0.8)  # a cycle or two more
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    who = {"job": "cont", "peer": receiver.address}
    (start,) = named(err, "sender.started")
    assert start["capture"] == "scan" and start["volumes"] == ["disk.img"]
    assert start["level"] == "info"
    progress = named(err, "progress")
    assert progress and progress[0]["what"] == "sync" and progress[0]["total"] == 16 << 20
    assert all(0 < p["done"] < 16 << 20 for p in progress)
    cycles = named(err, "sender.cycle")
    assert len(cycles) >= 2 and cycles[0]["changed"] == 16 << 20 and cycles[1]["changed"] == 0
    assert "changed 16.0 MiB" in cycles[0]["text"]
    assert [c["epoch"] for c in cycles] == list(range(1, len(cycles) + 1))
    (connected,) = named(err, "sender.connected")
    (stopped,) = named(err, "sender.stopped")
    assert stopped["last_epoch"] == cycles[-1]["epoch"]
    (basis,) = named(err, "sender.basis")  # logged deep in the engine, with no job given
    for line in [start, *progress, *cycles, connected, basis, stopped]:
        assert {k: line.get(k) for k in who} == who, line
    # routine lines are info: -q keeps warnings and errors only
    assert not [e for e in events(err) if e["event"].startswith("sender.") and e["level"] != "info"]


def _mounted(mnt: Path) -> bool:
    return any(
        line.split()[1] == str(mnt) for line in Path("/proc/mounts").read_text().splitlines()
    )


@pytest.mark.parametrize("capture", ["nbd", "fuse"])
def test_live_initial_sync_shows_progress(
    tmp_path: Path, receiver: ReceiverProc, capture: str
) -> None:
    folder, mnt, sock = tmp_path / "vm", tmp_path / "mnt", tmp_path / "nbd.sock"
    folder.mkdir()
    mnt.mkdir()
    disk = folder / "vm.img"
    disk.write_bytes(os.urandom(12 << 20))
    how = (
        ["--nbd-socket", str(sock), str(disk)]
        if capture == "nbd"
        else ["--mount", str(mnt), str(folder)]
    )
    proc = LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "live", "--state-dir",
         str(tmp_path / "state"), "--capture", capture, "--insecure", *how],
        stdout=subprocess.DEVNULL, env=FAST_PROGRESS,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (sock.exists() if capture == "nbd" else _mounted(mnt)):  # serving
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        code, err = _stop(proc)
        if _mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert code == 0, err
    (start,) = named(err, "sender.started")
    assert start["capture"] == capture and start["job"] == "live"
    progress = named(err, "progress")
    assert progress and {p["what"] for p in progress} == {"initial sync"}
    assert all(p["job"] == "live" and p["total"] == 12 << 20 for p in progress)
    assert named(err, "sender.cycle")[0]["changed"] == 12 << 20
    assert named(err, "sender.stopped")


def _vhdx(tmp_path: Path) -> Path:
    path = tmp_path / "d.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(path), "16M")
    return path


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("mount missing", ExitCode.CONFIG, "mount point"),
        ("mount not empty", ExitCode.CONFIG, "is not empty"),
        ("fuse folder mistyped", ExitCode.CONFIG, "does not exist"),
        ("vhdx over nbd", ExitCode.CONFIG, "VHDX images cannot be captured over NBD"),
        ("nbd socket with scan", ExitCode.USAGE, "did you mean --capture nbd?"),
        ("mount with scan", ExitCode.USAGE, "did you mean --capture fuse?"),
        ("bad address", ExitCode.USAGE, "--to wants HOST:PORT"),
    ],
)
def test_inputs_are_checked_before_any_data_moves(
    tmp_path: Path, case: str, code: ExitCode, words: str
) -> None:
    """Nothing listens at --to: a check made after connecting would never be reached (a
    continuous sender retries forever), so each must come first; no state is made."""
    folder = tmp_path / "vm"
    folder.mkdir()
    (folder / "disk.img").write_bytes(b"\1" * 65536)
    mount = tmp_path / "mnt"
    disk = str(folder / "disk.img")
    state = tmp_path / "state"
    to = f"127.0.0.1:{free_port()}"
    capture: list[str] = {
        "mount missing": ["--capture", "fuse", "--mount", str(mount), str(folder)],
        "mount not empty": ["--capture", "fuse", "--mount", str(folder), str(tmp_path / "vm2")],
        "fuse folder mistyped": ["--capture", "fuse", "--mount", str(mount), str(tmp_path / "mv")],
        "nbd socket with scan": ["--nbd-socket", str(tmp_path / "s.sock"), disk],
        "mount with scan": ["--mount", str(mount), disk],
        "bad address": [disk],
    }.get(case, [])
    if case == "mount not empty":
        (tmp_path / "vm2").mkdir()
    if case == "vhdx over nbd":
        capture = [
            "--capture",
            "nbd",
            "--nbd-socket",
            str(tmp_path / "s.sock"),
            str(_vhdx(tmp_path)),
        ]
    if case == "bad address":
        to = "nowhere"
    out = replicator(
        "send", "--to", to, "--job", "j", "--state-dir", str(state), "--insecure", *capture,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == code, out.stderr
    assert words in one_line_error(out.stderr)
    assert not state.exists()
    (failed,) = named(out.stderr, "command.failed")  # JSON logs: the end is logged too
    assert failed["exit_code"] == code and words in failed["error"]


class _FakeServer:
    """A TCP server that is not a receiver: answers like a web server, or says nothing."""

    def __init__(self, reply: bytes | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)  # held open: silence, not a closed connection
            if self.reply is not None:
                conn.recv(100)
                conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture(params=["http", "silent"])
def not_a_receiver(request: pytest.FixtureRequest) -> Iterator[tuple[str, _FakeServer]]:
    reply = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
    server = _FakeServer(reply if request.param == "http" else None)
    try:
        yield request.param, server
    finally:
        server.close()


def test_to_a_service_that_is_not_a_receiver(
    tmp_path: Path, not_a_receiver: tuple[str, _FakeServer]
) -> None:
    kind, server = not_a_receiver
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x" * 4096)
    started = time.monotonic()
    out = replicator(
        "send", "--to", f"127.0.0.1:{server.port}", "--job", "j", "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), str(disk), timeout=60,
    )  # fmt: skip
    took = time.monotonic() - started
    assert out.returncode == ExitCode.PROTOCOL, out.stderr
    error = one_line_error(out.stderr)
    assert f"127.0.0.1:{server.port} is not a replicator receiver" in error
    assert "receive --listen" in error  # what to check
    if kind == "http":
        assert "it speaks HTTP" in error and took < 5
    else:
        assert "sent nothing within 5 s" in error and took < 12  # not the 30 s of a lost peer


def test_sigterm_before_reaching_the_receiver_is_not_a_success(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x" * 4096)
    proc = subprocess.Popen(
        [*REPLICATOR, "send", "--to", f"127.0.0.1:{free_port()}", "--job", "j", "--insecure",
         "--state-dir", str(tmp_path / "s"), str(disk)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # until its first failed attempt is logged
        lines.append(line)
        if '"sender.connect_failed"' in line:
            break
    code, rest = _stop(proc)
    err = "".join(lines) + rest
    assert code == ExitCode.CONNECT, err
    error = one_line_error(err)
    assert "stopped without having reached the receiver" in error
    assert "cannot connect" in error  # the last attempt's reason


def test_verify_of_an_unknown_job_changes_nothing(tmp_path: Path, receiver: ReceiverProc) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(1 << 20))
    send_once(receiver, "known", tmp_path / "sk", disk)
    state = tmp_path / "sv"
    before = sorted(p.name for p in receiver.dir.iterdir())
    out = replicator(
        "verify", "--to", receiver.address, "--job", "nosuch", "--insecure",
        "--state-dir", str(state), str(disk),
    )  # fmt: skip
    assert out.returncode == ExitCode.REFUSED, out.stderr
    assert "unknown job 'nosuch' on the receiver (jobs there: known)" in one_line_error(out.stderr)
    assert not state.exists()  # no sender state made for it ...
    assert sorted(p.name for p in receiver.dir.iterdir()) == before  # ... nor a replica folder
    assert not (receiver.dir / ".replicator" / "nosuch").exists()  # ... nor receiver state


def test_verify_of_a_replica_deleted_on_the_target_says_what_makes_it(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A replica deleted on the target: verify's next: line said only that a send ships
    the difference, and the plain send it pointed to is refused ("deleted outside
    replication", exit 6) until --resync."""
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(1 << 20))
    state = tmp_path / "s"
    send_once(receiver, "gone", state, disk)
    (receiver.dir / "gone" / disk.name).unlink()
    args = ("--to", receiver.address, "--job", "gone", "--insecure", "--state-dir", str(state))
    out = replicator("verify", *args, str(disk))
    assert out.returncode == ExitCode.DIFFERENT, out.stderr
    assert "d.img: replica missing" in out.stdout
    assert "`replicator send --resync`" in out.stdout and "deleted there" in out.stdout
    # what it says holds: a plain send is refused, verify --repair makes the replica
    plain = replicator("send", *args, "--once", str(disk))
    assert plain.returncode == ExitCode.REFUSED, plain.stderr
    assert replicator("verify", *args, "--repair", str(disk)).returncode == 0
    assert (receiver.dir / "gone" / disk.name).read_bytes() == disk.read_bytes()


def test_verify_shows_progress_and_quiet_hides_it(tmp_path: Path, receiver: ReceiverProc) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(16 << 20))
    send_once(receiver, "v", tmp_path / "s", disk)
    args = ("verify", "--to", receiver.address, "--job", "v", "--insecure", "--state-dir",
            str(tmp_path / "s"), str(disk))  # fmt: skip
    out = subprocess.run(
        [*REPLICATOR, *args], capture_output=True, text=True, env=FAST_PROGRESS, timeout=120
    )
    assert out.returncode == 0 and "identical" in out.stdout, out.stderr
    progress = named(out.stderr, "progress")
    assert progress and all(p["what"] == "verify" and p["total"] == 16 << 20 for p in progress)
    assert all(p["job"] == "v" and p["peer"] == receiver.address for p in progress)
    quiet = subprocess.run(
        [*REPLICATOR, "-q", *args], capture_output=True, text=True, env=FAST_PROGRESS, timeout=120
    )  # -q on the command line, not from REPLICATOR_QUIET
    assert quiet.returncode == 0 and "identical" in quiet.stdout
    assert not [e for e in events(quiet.stderr) if e["level"] in ("info", "debug")]


def test_summary_in_plain_words_and_modes_follow_the_source(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * (4 << 20) + os.urandom(1 << 20))
    disk.chmod(0o644)
    xml = tmp_path / "vm.xml"
    xml.write_text("<domain/>")
    xml.chmod(0o640)
    args = ("send", "--to", receiver.address, "--job", "w", "--state-dir", str(tmp_path / "s"),
            "--once", "--insecure", str(disk), str(xml))  # fmt: skip
    first = replicator(*args)
    assert first.returncode == 0, first.stderr
    assert "compression" not in first.stdout and "basis" not in first.stdout
    assert "sent " in first.stdout and " on the wire" in first.stdout
    assert "compared against the replica (first sync from this state folder)" in first.stdout
    with disk.open("r+b") as f:
        f.write(b"\7" * 65536)
    second = replicator(*args)
    assert "changed 64.0 KiB in 1 extents" in second.stdout, second.stdout
    assert "compared against this sender's record of the last sync" in second.stdout
    replica = receiver.dir / "w"
    assert (replica / "d.img").stat().st_mode & 0o777 == 0o644
    assert (replica / "vm.xml").stat().st_mode & 0o777 == 0o640
    summary = send_once(receiver, "w", tmp_path / "s", disk, xml)  # --json keys stay
    assert {"basis", "compression_ratio", "payload_bytes", "wire_bytes"} <= summary.keys()


def test_replica_of_a_private_source_stays_private(tmp_path: Path, receiver: ReceiverProc) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(65536))
    disk.chmod(0o600)
    send_once(receiver, "p", tmp_path / "s", disk)
    assert (receiver.dir / "p" / "d.img").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("width", [80, 120])
def test_help_is_readable(width: int) -> None:
    out = subprocess.run(
        [*REPLICATOR, "send", "-h"], capture_output=True, text=True, timeout=60,
        env={**ENV, "COLUMNS": str(width)},
    )  # fmt: skip
    assert out.returncode == 0
    text = out.stdout
    assert max(len(line) for line in text.splitlines()) <= width
    assert "<bool>" not in text and "<str>" not in text and "…" not in text
    assert "--to HOST:PORT" in text and "--interval SECONDS" in text
    assert "[OPTIONS] {VOLUME...}" in text.splitlines()[0]  # one or more, as the docs say
    assert "/var/lib/replicator/send/JOB as root" in text  # not cut off
    assert "[default: 60.0" in text
    assert "--once / --no-once" in text and "[default: no-" not in text  # no noise on flags


COMMANDS = ("send", "receive", "verify", "status", "keygen", "failover", "demote", "failback",
            "witness", "rate", "discover", "check-config", "bench", "journal inspect")  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_value_in_help_is_named_for_what_to_give(command: str) -> None:
    """Not typer's TEXT or NUMBER: an admin reads SECONDS, HOST:PORT, CMD; and an argument
    that takes several says so (VOLUME...), as docs/OPERATIONS.md writes it."""
    out = subprocess.run(
        [*REPLICATOR, *command.split(), "-h"], capture_output=True, text=True, timeout=60,
        env={**ENV, "COLUMNS": "100"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    generic = re.findall(r"^\s+(-\S+ (?:TEXT|NUMBER|VALUE))\b", out.stdout, re.MULTILINE)
    assert not generic, generic
    usage = out.stdout.splitlines()[0]
    if command in ("send", "verify", "failback"):
        assert usage.endswith("{VOLUME...}"), usage
    if command == "discover":
        assert usage.endswith("{PATH...}"), usage


def test_verify_while_the_sender_runs_says_what_to_do(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(1 << 20))
    state = tmp_path / "s"
    proc = LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "busy", "--state-dir",
         str(state), "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        _wait_same(disk, receiver.dir / "busy" / "d.img")
        out = replicator(
            "verify", "--to", receiver.address, "--job", "busy", "--insecure",
            "--state-dir", str(state), str(disk),
        )  # fmt: skip
        # as the README writes it, without the sender's --state-dir: the image is taken
        # (it said "one sender per image: stop the other one, or replicate a copy")
        plain = replicator("verify", "--to", receiver.address, "--job", "busy", "--insecure",
                           str(disk))  # fmt: skip
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    assert out.returncode == ExitCode.CONFIG, out.stderr
    error = one_line_error(out.stderr)
    assert "already runs with state folder" in error
    assert "verify needs the job to itself" in error and "own --state-dir" not in error
    assert plain.returncode == ExitCode.CONFIG, plain.stderr
    error = one_line_error(plain.stderr)
    assert "already being replicated by another replicator sender" in error
    assert "verify needs the job to itself" in error and "replicate a copy" not in error


def _stderr_on_a_terminal(*args: str) -> tuple[int, str]:
    """Run replicator with stderr on a pseudo-terminal; what it showed there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*REPLICATOR, *args], stdout=subprocess.DEVNULL, stderr=slave,
        env={**LOUD_ENV, "TERM": "xterm", "COLUMNS": "100"},
    )  # fmt: skip
    os.close(slave)
    shown = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc.wait(timeout=60), shown.decode(errors="replace")


def test_a_terminal_gets_a_progress_bar_unless_quiet(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(16 << 20))
    args = ("send", "--to", receiver.address, "--job", "tty", "--state-dir",
            str(tmp_path / "s"), "--once", "--insecure", str(disk))  # fmt: skip
    code, shown = _stderr_on_a_terminal(*args)
    assert code == 0, shown
    assert "sync" in shown and "16.0/16.0 MiB" in shown  # the bar, at its end
    assert '"event": "progress"' not in shown  # a bar, not lines
    code, shown = _stderr_on_a_terminal("-q", *args)
    assert code == 0, shown
    assert "MiB" not in shown and "sync" not in shown


def test_a_send_once_says_what_it_does_at_start(tmp_path: Path, receiver: ReceiverProc) -> None:
    """`sender.started` is listed "at start" for every sender; `--once` logged none."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    out = subprocess.run(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "one", "--state-dir",
         str(tmp_path / "state"), "--once", "--insecure", str(disk)],
        capture_output=True, text=True, env=FAST_PROGRESS, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (start,) = named(out.stderr, "sender.started")
    assert start["capture"] == "scan" and start["volumes"] == ["disk.img"]


def test_the_summary_never_says_lz4_saved_everything() -> None:
    """Some bytes always cross the wire: 19.1 KiB sent for 4.3 MiB of records said "lz4
    saved 100%"; rounded down it says 99%."""
    from replicator.cli.send import wire_words
    from replicator.engine.sender import Summary

    words = wire_words(Summary("vm1", payload_bytes=4_522_775, wire_bytes=19_031))
    assert "lz4 saved 99% of 4.3 MiB" in words, words
    assert "saved 50%" in wire_words(Summary("vm1", payload_bytes=1000, wire_bytes=500))
