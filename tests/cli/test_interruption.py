"""SIGKILL either side in the middle of a large sync: the replica converges, little is resent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    ReceiverProc,
    b3,
    distinct_random_disk,
    processes,
    qemu_compare,
    qemu_io,
    replicator,
    running,
    send_once,
    start_receiver,
    start_send,
    stop_and_read,
)

SIZE = 192 * 1024 * 1024


def _dir_bytes(path: Path) -> int:
    """Bytes allocated to the files under ``path`` (a first sync is written in place: the
    replica's size is set first, its blocks fill as data arrives)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _start_send(receiver: ReceiverProc, state: Path, disk: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "big", "--state-dir", str(state),
         "--once", "--json", "--insecure", str(disk)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip


def _wait_received(receiver: ReceiverProc, at_least: int, proc: subprocess.Popen[str]) -> None:
    job = receiver.dir / "big"  # the replica (the receive journal is bypassed: first sync)
    deadline = time.monotonic() + 60
    while _dir_bytes(job) < at_least:
        assert proc.poll() is None, "sender finished before it could be interrupted"
        assert time.monotonic() < deadline, "sync did not progress"
        time.sleep(0.02)


def test_sigkill_sender_mid_sync_then_resume(tmp_path: Path, receiver: ReceiverProc) -> None:
    disk = tmp_path / "disk.img"
    distinct_random_disk(disk, SIZE)
    state = tmp_path / "state"
    proc = _start_send(receiver, state, disk)
    _wait_received(receiver, SIZE // 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary = send_once(receiver, "big", state, disk)
    assert b3(receiver.dir / "big" / "disk.img") == b3(disk)
    # the resumed run sends what the receiver lacked, not the whole disk again
    assert summary["payload_bytes"] < SIZE * 0.85, summary


def test_sigkill_receiver_mid_sync_then_resume(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    distinct_random_disk(disk, SIZE)
    target = tmp_path / "target"
    receiver = start_receiver(target)
    state = tmp_path / "state"
    proc = _start_send(receiver, state, disk)
    _wait_received(receiver, SIZE // 3, proc)
    receiver.stop(signal.SIGKILL)
    rc = proc.wait(timeout=120)
    assert rc == 4, proc.stderr.read() if proc.stderr else rc  # connection lost, resumable
    receiver = start_receiver(target, receiver.port)
    try:
        summary = send_once(receiver, "big", state, disk)
        assert b3(target / "big" / "disk.img") == b3(disk)
        assert summary["payload_bytes"] < SIZE * 0.85, summary
    finally:
        receiver.stop()


def _catches(pid: int, sig: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (sig - 1) & 1)


def test_ctrl_c_while_the_program_is_still_starting(tmp_path: Path) -> None:
    """Used to print a KeyboardInterrupt traceback (or die silently) during the imports."""
    import shutil

    script = shutil.which("replicator", path=str(Path(REPLICATOR[0]).parent))
    assert script is not None
    interrupted = 0
    for command in ([*REPLICATOR, "receive", "--help"], [script, "--version"]):
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV
        )
        # the entry point catches SIGTERM first thing (Python itself does not), long before
        # typer and the engine are imported: interrupt right then
        deadline = time.monotonic() + 20
        while not _catches(proc.pid, signal.SIGTERM) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        err = proc.stderr.read() if proc.stderr else ""
        if rc == 0:
            continue  # a very fast machine finished first
        assert rc == 130, err
        assert "Traceback" not in err and "interrupted" in err, err
        interrupted += 1
    assert interrupted  # the imports take far longer than reaching the entry point


def _helpers_of(pid: int) -> list[int]:
    """The hashing helpers (engine/hashing_helper.py) that process ``pid`` started."""
    helper = b"replicator.engine.hashing_helper"
    return [p.pid for p in processes() if p.ppid == pid and helper in p.argv]


def test_a_sender_killed_while_helpers_hash_leaves_none_behind(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """SIGKILL the sender while its helpers hash: they go with it (their next write hits
    the closed pipe), and the next send brings the replica up to date."""
    disk = tmp_path / "big.img"
    with disk.open("wb") as f:
        for _ in range(256):
            f.write(os.urandom(1024 * 1024))
    state = tmp_path / "state"
    send_once(receiver, "big", state, disk)
    args = [
        *REPLICATOR, "send", "--to", receiver.address, "--job", "big", "--state-dir",
        str(state), "--once", "--json", "--insecure", str(disk),
    ]  # fmt: skip
    helpers: list[int] = []
    for attempt in range(8):  # each try changes the disk and kills the send once it hashes
        qemu_io("raw", disk, f"write -P {0x40 + attempt} {attempt * 7}M 64k")
        sender = LoggedPopen(args, env=ENV, stdout=subprocess.DEVNULL)
        while sender.poll() is None and not helpers:
            helpers = _helpers_of(sender.pid)
            time.sleep(0.002)
        if helpers:
            sender.kill()
            sender.wait()
            break
        sender.wait()
    assert helpers, "no scan ever ran its hashing helpers"
    deadline = time.monotonic() + 5
    while any(map(running, helpers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [pid for pid in helpers if running(pid)]
    assert not alive, f"helpers outlived their sender: {alive}"
    send_once(receiver, "big", state, disk)
    replica = receiver.dir / "big" / disk.name
    assert qemu_compare("raw", disk, replica).returncode == 0
    assert b3(disk) == b3(replica)


def test_sighup_stops_a_sender_and_a_receiver_as_sigterm_does_and_says_so(
    tmp_path: Path,
) -> None:
    """A closed terminal, or `kill -HUP` meant as "reload", ended both at once (the
    default action) with no line in their logs and no graceful finish."""
    receiver = start_receiver(tmp_path / "replicas")
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * 1024 * 1024))
    state = tmp_path / "state"
    sender = LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "hup", "--state-dir",
         str(state), "--interval", "0.2", "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    replica = receiver.dir / "hup" / disk.name
    try:
        deadline = time.monotonic() + 60
        while not (replica.exists() and b3(replica) == b3(disk)):
            assert sender.poll() is None and time.monotonic() < deadline, "no first sync"
            time.sleep(0.1)
        logs = []
        for proc in (sender, receiver.proc):
            proc.send_signal(signal.SIGHUP)
            assert proc.wait(timeout=60) == 0  # the default action: -SIGHUP, at once
            logs.append(proc.stderr.read() if proc.stderr else "")
            assert '"event": "signal.hangup"' in logs[-1], logs[-1]
            assert "stopping as for SIGTERM" in logs[-1]
    finally:  # neither left running when an assertion failed
        for proc in (sender, receiver.proc):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    # the sender's graceful end, not a kill: it said so in its state folder
    assert json.loads((state / "sender.json").read_text())["ended"] > 0


def test_a_first_sync_stopped_midway_does_not_say_its_records_stay_in_the_journal(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A first sync goes around the sender's journal (docs/ARCHITECTURE.md, "Initial sync").
    Stopped midway, its `sender.stopped_with_backlog` said "they stay in the journal: the
    next run ships them", of records no journal held (`journal inspect`, `status`: none):
    it now says the next run sends them again, as it does."""
    disk, state = tmp_path / "disk.img", tmp_path / "state"
    distinct_random_disk(disk, 16 * 1024 * 1024)
    sender = start_send(receiver.address, "big", state, disk, extra=("--rate", "16Mbit"))
    try:
        _wait_received(receiver, 2 * 1024 * 1024, sender)  # about 8 s at that rate
        rc, err = stop_and_read(sender)
    finally:
        if sender.poll() is None:
            sender.kill()
    assert rc == 0, err[-3000:]
    lines = [line for line in err.splitlines() if "sender.stopped_with_backlog" in line]
    assert len(lines) == 1, err[-3000:]
    left = json.loads(lines[0])
    assert left["records"] > 0, left
    assert "stay in the journal" not in left["next"] and "in no journal" in left["next"], left
    assert "journaled" not in left["why"], left
    status = json.loads(replicator("status", "--state-dir", str(state), "--json").stdout)
    assert status["jobs"][0]["journal"]["records"] == 0, status  # what it said is true
    send_once(receiver, "big", state, disk)  # and the next run sends them
    assert b3(receiver.dir / "big" / disk.name) == b3(disk)
