"""A receiver that runs but is stuck (SIGSTOP: the kernel still takes its connections and
buffers what is sent, nobody reads) is a receiver away for a while, not another service,
and never holds a sender that is asked to stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.tools import (
    ENV,
    REPLICATOR,
    LiveNbdSender,
    LoggedPopen,
    b3,
    qemu_compare,
    replicator,
    send_once,
    sender_job,
    start_receiver,
    stop_and_read,
    wait_for,
)

MiB = 1 << 20
STOP_WITHIN = 4.0  # seconds from SIGTERM to exit with a stalled receiver (7-35 s before)


def _continuous(address: str, state: Path, disk: Path) -> subprocess.Popen[str]:
    return LoggedPopen(
        [*REPLICATOR, "send", "--to", address, "--job", "vm", "--state-dir", str(state),
         "--interval", "1", "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip


def _take_all(listener: socket.socket, taken: list[socket.socket]) -> None:
    with contextlib.suppress(OSError):  # closed by the test
        while True:
            taken.append(listener.accept()[0])


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):  # either side closed
        while data := src.recv(1 << 16):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _relay(held: socket.socket, port: int) -> socket.socket:
    """Join ``held`` (a connection taken and not answered yet) to the receiver now
    listening on ``port``: what the sender sent there reaches it, and its answers come
    back. Returns the connection to the receiver."""
    upstream = socket.create_connection(("127.0.0.1", port), timeout=60)
    upstream.settimeout(None)
    for src, dst in ((held, upstream), (upstream, held)):
        threading.Thread(target=_pump, args=(src, dst), daemon=True).start()
    return upstream


def _converged(disk: Path, replica: Path) -> bool:
    return replica.exists() and qemu_compare("raw", disk, replica, shared=True).returncode == 0


def test_a_stopping_sender_is_not_held_by_a_stopped_receiver(tmp_path: Path) -> None:
    """Its Goodbye went into a socket nobody read: SIGTERM waited for as long as the
    receiver stayed stopped (171 s seen), with no log line."""
    disk, state = tmp_path / "disk.img", tmp_path / "state"
    disk.write_bytes(os.urandom(32 * MiB))
    receiver = start_receiver(tmp_path / "target")
    sender = _continuous(receiver.address, state, disk)
    try:
        wait_for(lambda: _converged(disk, receiver.dir / "vm" / disk.name), sender, "a sync")
        os.kill(receiver.proc.pid, signal.SIGSTOP)
        with disk.open("r+b") as f:  # more than the socket buffers take
            f.write(os.urandom(28 * MiB))
        time.sleep(3)  # a cycle is shipping into the full buffers
        rc, err = stop_and_read(sender, timeout=60)  # raised TimeoutExpired
        assert rc == 0, err[-3000:]
    finally:
        os.kill(receiver.proc.pid, signal.SIGCONT)
        if sender.poll() is None:
            sender.kill()
        receiver.stop()


def _timed_stop(proc: subprocess.Popen[str]) -> tuple[int, float, str]:
    started = time.monotonic()
    rc, err = stop_and_read(proc)
    return rc, time.monotonic() - started, err


def _backlog_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "sender.stopped_with_backlog" in line]
    assert len(lines) == 1, err[-3000:]
    assert '"records": 0,' not in lines[0], lines[0]
    # journaled records are shipped by the next run; a cycle's records copied around the
    # journal (direct.intent) are sent again by it
    assert "the next run ships them" in lines[0] or "next run sends them again" in lines[0]
    assert "said nothing and took none of our bytes" in lines[0], lines[0]
    return lines[0]


@pytest.mark.serial  # measures how long a stop takes
def test_a_stop_gives_up_on_a_stalled_receiver_at_once_and_says_what_it_left(
    tmp_path: Path,
) -> None:
    """SIGTERM with the receiver stopped took 7-9 s (2 s for what was sent to be applied,
    2 s for the Goodbye, up to 5 s for the receiver to close its side), saying nothing of
    what it left. A receiver that takes none of our bytes and says nothing for a second
    is not waited for; what it had not applied is shipped by the next run."""
    disk, state = tmp_path / "disk.img", tmp_path / "state"
    disk.write_bytes(os.urandom(32 * MiB))
    receiver = start_receiver(tmp_path / "target")
    sender = _continuous(receiver.address, state, disk)
    replica = receiver.dir / "vm" / disk.name
    try:
        wait_for(lambda: _converged(disk, replica), sender, "a sync")
        os.kill(receiver.proc.pid, signal.SIGSTOP)
        with disk.open("r+b") as f:  # more than the socket buffers take
            f.write(os.urandom(28 * MiB))
        time.sleep(3)  # a cycle is shipping into the full buffers
        rc, took, err = _timed_stop(sender)
    finally:
        os.kill(receiver.proc.pid, signal.SIGCONT)
        if sender.poll() is None:
            sender.kill()
    try:
        assert rc == 0, err[-3000:]
        assert took < STOP_WITHIN, f"stop took {took:.1f} s"
        _backlog_line(err)
        summary = send_once(receiver, "vm", state, disk)  # the next run: nothing lost
        assert summary["basis"] != "full", summary
        assert b3(replica) == b3(disk)
    finally:
        receiver.stop()


@pytest.mark.serial  # measures how long a stop takes
def test_a_live_sender_does_not_wait_30_s_for_a_stalled_receiver(tmp_path: Path) -> None:
    """An NBD sender's stop waited up to 30 s for its last writes to be applied, then 5 s
    for the receiver to close, with a stopped receiver (and logged an empty error)."""
    receiver = start_receiver(tmp_path / "target")
    sender = LiveNbdSender(tmp_path, receiver)
    os.kill(receiver.proc.pid, signal.SIGSTOP)
    try:
        sender.write("write -P 0x5a 0 16M")  # journaled and acknowledged to the writer
        time.sleep(1)
        rc, took, err = _timed_stop(sender.proc)
    finally:
        os.kill(receiver.proc.pid, signal.SIGCONT)
        if sender.proc.poll() is None:
            sender.proc.kill()
    try:
        assert rc == 0, err[-3000:]
        assert took < STOP_WITHIN, f"stop took {took:.1f} s"
        _backlog_line(err)
        again = LiveNbdSender(tmp_path, receiver, fresh=False)  # caught up, or it raises
        assert again.stop()[0] == 0
        assert qemu_compare("raw", sender.source, sender.replica).returncode == 0
    finally:
        receiver.stop()


def test_a_receiver_that_answers_nothing_is_waited_for_not_given_up(tmp_path: Path) -> None:
    """After a sync, the receiver's port taken by something that accepts and says nothing
    (as a stopped receiver's kernel does): the continuous sender said "not a replicator
    receiver, check --to" and exited 7 after three tries, ending replication."""
    disk, state = tmp_path / "disk.img", tmp_path / "state"
    disk.write_bytes(os.urandom(4 * MiB))
    target = tmp_path / "target"
    receiver = start_receiver(target)
    port = receiver.port
    sender = _continuous(receiver.address, state, disk)
    silent = socket.socket()
    taken: list[socket.socket] = []  # held open, never answered
    relayed: list[socket.socket] = []
    try:
        wait_for(lambda: _converged(disk, target / "vm" / disk.name), sender, "a sync")
        assert receiver.stop() == 0
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind(("127.0.0.1", port))
        silent.listen(16)
        threading.Thread(target=_take_all, args=(silent, taken), daemon=True).start()
        # it gave up after the third such try
        wait_for(lambda: len(taken) >= 4, sender, "a fourth try", timeout=120)
        job = sender_job(state)
        assert job["state"] == "connecting" and job["errors"].get("connect", 0) >= 2, job
        assert "answered nothing" in job["last_error"], job
        with contextlib.suppress(OSError):
            silent.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        silent.close()
        for held in taken[:3]:
            held.close()
        with disk.open("r+b") as f:
            f.write(os.urandom(MiB))
        receiver = start_receiver(target, port)
        # the fourth try, waiting for an answer (5 s), is answered by the receiver back:
        # else it fails, and the next try comes 16 s later (the doubling back-off)
        relayed.append(_relay(taken[3], port))
        wait_for(lambda: _converged(disk, target / "vm" / disk.name), sender, "the catch-up")
        assert b3(disk) == b3(target / "vm" / disk.name)
    finally:
        silent.close()
        rc, err = stop_and_read(sender)
        receiver.stop()
        for sock in taken + relayed:
            sock.close()
    assert rc == 0, err[-3000:]


def test_verify_ships_what_the_sender_journaled_before_it_compares(tmp_path: Path) -> None:
    """Writes journaled and acknowledged while the receiver was stopped, the sender then
    killed: verify compared while that backlog was on its way, said "differs" (exit 1),
    and "identical" when run again."""
    receiver = start_receiver(tmp_path / "target")
    sender = LiveNbdSender(tmp_path, receiver)
    os.kill(receiver.proc.pid, signal.SIGSTOP)
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(48 * MiB))  # incompressible: it takes long to ship
    try:
        sender.write(f"write -s {noise} 0 48M")
    finally:
        sender.proc.kill()
        sender.proc.wait(timeout=30)
        os.kill(receiver.proc.pid, signal.SIGCONT)
    try:
        out = replicator(
            "verify", "--to", receiver.address, "--job", "vm1", "--state-dir",
            str(sender.state), "--insecure", str(sender.source),
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    finally:
        receiver.stop()
    assert qemu_compare("raw", sender.source, sender.replica).returncode == 0
