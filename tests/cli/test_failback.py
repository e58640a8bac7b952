"""Planned failover and failback without a full resync, as an admin would run them: real
receiver and sender processes, qemu-io writing through the NBD shim and on the images,
qemu-img compare and blake3 on both sides."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from replicator.engine.at_rest import sender_at_rest
from replicator.engine.errors import ExitCode
from replicator.engine.failback_state import MARKER_FILE, save_marker
from tests.faultfs import FaultFS
from tests.tools import (
    ENV,
    LOUD_ENV,
    REPLICATOR,
    LoggedPopen,
    ReceiverProc,
    b3,
    forced_failover,
    idle_qemu_writer,
    one_line_error,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    require_tool,
    send_once,
    start_receiver,
    start_send,
)

MiB = 1024 * 1024
KiB = 1024
EXTENT = 64 * KiB


def _live(rcv: ReceiverProc, state: Path, sock: Path, disk: Path) -> subprocess.Popen[str]:
    proc = LoggedPopen(
        [*REPLICATOR, "send", "--to", rcv.address, "--job", "vm", "--state-dir", str(state),
         "--capture", "nbd", "--nbd-socket", str(sock), "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "NBD socket did not appear"
        time.sleep(0.02)
    return proc


def _nbd_write(sock: Path, offset: int, pattern: int) -> bool:
    """One 64 KiB write and a flush through the NBD shim; True when acknowledged."""
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} 64k", "-c", "flush",
         f"nbd+unix:///disk.img?socket={sock}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return out.returncode == 0 and "error" not in (out.stdout + out.stderr).lower()


class Workload(threading.Thread):
    """Writes 64 KiB blocks at distinct offsets through NBD until stopped; remembers which
    writes were acknowledged (offset -> pattern)."""

    def __init__(self, sock: Path, first: int = 0) -> None:
        super().__init__(daemon=True)
        self.sock, self.next = sock, first
        self.acked: dict[int, int] = {}
        self.failed = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set() and self.next < 16 * MiB:
            pattern = (self.next // EXTENT) % 250 + 1
            if _nbd_write(self.sock, self.next, pattern):
                self.acked[self.next] = pattern
            else:
                self.failed += 1
                time.sleep(0.02)
            self.next += EXTENT


def _pattern_at(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(EXTENT)


def _failback(rcv: ReceiverProc, state: Path, disk: Path) -> subprocess.CompletedProcess[str]:
    return replicator(
        "failback", "--from", rcv.address, "--job", "vm", "--state-dir", str(state), "--json",
        "--insecure", str(disk),
    )  # fmt: skip


def _identical(disk: Path, replica: Path) -> None:
    assert qemu_compare("raw", disk, replica).returncode == 0
    assert b3(disk) == b3(replica)


def test_planned_failover_under_an_nbd_workload_loses_nothing(tmp_path: Path) -> None:
    require_tool("qemu-io")
    disk, sock, state = tmp_path / "disk.img", tmp_path / "nbd.sock", tmp_path / "state"
    qemu_img("create", "-q", "-f", "raw", str(disk), "64M")
    rcv = start_receiver(tmp_path / "target")
    replica = tmp_path / "target" / "vm" / disk.name
    sender = _live(rcv, state, sock, disk)
    work = Workload(sock)
    try:
        work.start()
        time.sleep(1.0)  # the workload runs: some writes replicated, some in flight
        out = replicator(
            "failover", "--dir", str(tmp_path / "target"), "--job", "vm", "--planned",
            "--timeout", "20", "--json",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        _, err = sender.communicate(timeout=30)
        assert sender.returncode == ExitCode.HANDED_OVER, err[-3000:]
        assert "handed over" in one_line_error(err)
        time.sleep(0.3)  # writes after the handover find no NBD server: none is acknowledged
        work.halt.set()
        work.join(timeout=30)
    finally:
        work.halt.set()
        if sender.poll() is None:
            sender.kill()
        assert rcv.stop() == 0
    assert result["planned"] is True and result["generation"] == 2
    assert 0 < result["rto_seconds"] < 10
    assert len(work.acked) >= 3 and work.failed >= 1  # writes on both sides of the handover
    # every acknowledged write is in the promoted replica; it equals the source exactly
    for offset, pattern in work.acked.items():
        assert _pattern_at(replica, offset) == bytes([pattern]) * EXTENT, offset
    _identical(disk, replica)
    assert not sock.exists()  # the source's capture has stopped
    # the source may not send again until it takes the job back
    again = replicator(
        "send", "--to", rcv.address, "--job", "vm", "--state-dir", str(state), "--once",
        "--insecure", str(disk),
    )  # fmt: skip
    assert again.returncode == ExitCode.SPLIT_BRAIN
    line = one_line_error(again.stderr)
    assert "handed over" in line and "replicator failback" in line
    assert sender_at_rest(state)["jobs"][0]["state"] == "handed_over"  # what `status` shows

    # the VM runs on the target and writes 2 MiB; failback moves just that
    qemu_io("raw", replica, "write -P 0x61 40M 2M")
    rcv = start_receiver(tmp_path / "target")
    try:
        back = _failback(rcv, state, disk)
        assert back.returncode == 0, back.stderr
        moved = json.loads(back.stdout)["bytes_moved"]
        assert moved == 2 * MiB
        _identical(disk, replica)
        summary = send_once(rcv, "vm", state, disk)  # the original direction, no resync
        assert summary["basis"] == "local" and summary["bytes_changed"] == 0
    finally:
        assert rcv.stop() == 0


def test_planned_failover_of_a_scanning_sender_takes_a_last_scan(tmp_path: Path) -> None:
    disk, state, target = tmp_path / "disk.img", tmp_path / "state", tmp_path / "target"
    qemu_img("create", "-q", "-f", "raw", str(disk), "16M")
    rcv = start_receiver(target)
    sender = LoggedPopen(
        [*REPLICATOR, "send", "--to", rcv.address, "--job", "vm", "--state-dir", str(state),
         "--interval", "300", "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        replica = target / "vm" / disk.name
        deadline = time.monotonic() + 30
        while not replica.exists():  # the first scan is in
            assert sender.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        qemu_io("raw", disk, "write -P 0x77 1M 1M")  # only the last scan can carry it
        out = replicator("failover", "--dir", str(target), "--job", "vm", "--planned", "--json")
        assert out.returncode == 0, out.stderr
        _, err = sender.communicate(timeout=30)
        assert sender.returncode == ExitCode.HANDED_OVER, err[-3000:]
    finally:
        if sender.poll() is None:
            sender.kill()
        assert rcv.stop() == 0
    assert json.loads(out.stdout)["rto_seconds"] < 10  # not the 300 s interval
    _identical(disk, replica)


def test_planned_failover_without_a_connected_sender_promotes_nothing(tmp_path: Path) -> None:
    disk, state = tmp_path / "disk.img", tmp_path / "state"
    qemu_img("create", "-q", "-f", "raw", str(disk), "8M")
    target = tmp_path / "target"
    rcv = start_receiver(target)
    try:
        send_once(rcv, "vm", state, disk)
        started = time.monotonic()
        out = replicator(
            "failover", "--dir", str(target), "--job", "vm", "--planned", "--timeout", "1",
        )  # fmt: skip
        assert out.returncode == ExitCode.CONNECT, out.stderr
        line = one_line_error(out.stderr)
        assert "no sender is connected" in line and "--force" in line
        assert time.monotonic() - started < 15
        assert not (target / ".replicator" / "vm" / "promoted.state").exists()
        # nothing to fail back from: refused before anything here changes
        before = b3(disk)
        no = _failback(rcv, state, disk)
        assert no.returncode == ExitCode.REFUSED and "not promoted" in one_line_error(no.stderr)
        assert b3(disk) == before and not (state / MARKER_FILE).exists()
    finally:
        assert rcv.stop() == 0
    at_rest = replicator("failover", "--dir", str(target), "--job", "vm", "--planned")
    assert at_rest.returncode == ExitCode.CONNECT and "--force" in one_line_error(at_rest.stderr)


def _unplanned(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A live sender SIGKILLed mid-workload, `failover --force` on the target; returns
    (disk, state, target, replica)."""
    disk, sock, state = tmp_path / "disk.img", tmp_path / "nbd.sock", tmp_path / "state"
    target = tmp_path / "target"
    qemu_img("create", "-q", "-f", "raw", str(disk), "64M")
    qemu_io("raw", disk, "write -P 0x11 0 8M")  # data both sides start with
    rcv = start_receiver(target)
    sender = _live(rcv, state, sock, disk)
    work = Workload(sock, first=0)
    try:
        work.start()
        time.sleep(0.6)
        sender.send_signal(signal.SIGKILL)
        sender.wait(timeout=10)
        work.halt.set()
        work.join(timeout=30)
    finally:
        work.halt.set()
        if sender.poll() is None:
            sender.kill()
        assert rcv.stop() == 0
    out = replicator("failover", "--dir", str(target), "--job", "vm", "--force", "--json")
    assert out.returncode == 0, out.stderr
    return disk, state, target, target / "vm" / disk.name


def test_failback_after_a_forced_failover_moves_only_what_changed(tmp_path: Path) -> None:
    require_tool("qemu-io")
    disk, state, target, replica = _unplanned(tmp_path)
    # the promoted VM writes 3 MiB; the old source wrote 2 MiB that never reached the target
    qemu_io("raw", replica, "write -P 0x33 20M 1M", "write -P 0x34 30M 2M")
    qemu_io("raw", disk, "write -P 0x44 48M 2M")
    expected = b3(replica)
    stale = tmp_path / "stale"  # a copy of the old source, to count what differs
    stale.write_bytes(disk.read_bytes())
    rcv = start_receiver(target)
    try:
        out = _failback(rcv, state, disk)
        assert out.returncode == 0, out.stderr
        result: dict[str, Any] = json.loads(out.stdout)
        _identical(disk, replica)
        assert b3(disk) == expected  # the promoted side's data won
        # what differed: the 3 MiB written on the target, the 2 MiB here (zeros on the
        # target: zeroed without being carried) and what the killed sender never shipped
        # (its workload wrote the first 16 MiB at most)
        assert 3 * MiB <= result["bytes_moved"] <= 3 * MiB + 16 * MiB
        assert result["bytes_zeroed"] == 2 * MiB
        assert result["bytes_moved"] + result["bytes_zeroed"] == _differing(stale, replica)
        assert result["bytes_moved"] <= 0.35 * result["bytes_compared"]
        # killed after the receiver's hand-back, before our record of it went: a rerun
        # sees the receiver at the hand-back point and only removes the record
        save_marker(state, "handing-back", generation=result["generation"], lsn=result["lsn"])
        rerun = _failback(rcv, state, disk)
        assert rerun.returncode == 0, rerun.stderr
        assert json.loads(rerun.stdout)["already_done"] is True
        assert not (state / MARKER_FILE).exists()
        # the original direction resumes from a local basis: only the new write moves
        qemu_io("raw", disk, "write -P 0x55 60M 64k")
        summary = send_once(rcv, "vm", state, disk)
        assert summary["basis"] == "local"
        assert summary["bytes_changed"] == 64 * KiB and summary["payload_bytes"] < 256 * KiB
        _identical(disk, replica)
    finally:
        assert rcv.stop() == 0


def _differing(a: Path, b: Path) -> int:
    """Bytes in 64 KiB extents that differ between two files of one size."""
    total = 0
    with a.open("rb") as fa, b.open("rb") as fb:
        while chunk := fa.read(EXTENT):
            if chunk != fb.read(EXTENT):
                total += len(chunk)
    return total


def test_an_interrupted_failback_is_refused_by_send_and_resumes(tmp_path: Path) -> None:
    require_tool("qemu-io")
    disk, state, target, replica = _unplanned(tmp_path)
    qemu_io("raw", replica, "write -P 0x66 8M 48M")  # much to move: time to interrupt it
    rcv = start_receiver(target)
    try:
        proc = LoggedPopen(
            [*REPLICATOR, "failback", "--from", rcv.address, "--job", "vm", "--state-dir",
             str(state), "--insecure", str(disk)],
            stdout=subprocess.DEVNULL, env=ENV,
        )  # fmt: skip
        marker, new = state / MARKER_FILE, bytes([0x66]) * EXTENT
        deadline = time.monotonic() + 30
        while _pattern_at(disk, 8 * MiB) != new:  # the first changed extent arrived
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert marker.exists()
        arrived = sum(_pattern_at(disk, o) == new for o in range(8 * MiB, 56 * MiB, EXTENT))
        assert 0 < arrived < 48 * MiB // EXTENT  # half old, half new
        refused = replicator(
            "send", "--to", rcv.address, "--job", "vm", "--state-dir", str(state), "--once",
            "--insecure", str(disk),
        )  # fmt: skip
        assert refused.returncode == ExitCode.SPLIT_BRAIN
        line = one_line_error(refused.stderr)
        assert "failback is under way" in line and "replicator failback" in line
        assert sender_at_rest(state)["jobs"][0]["state"] == "failback_incomplete"
        again = _failback(rcv, state, disk)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["resumed"] is True
        assert not marker.exists()
        _identical(disk, replica)
        summary = send_once(rcv, "vm", state, disk)
        assert summary["basis"] == "local" and summary["bytes_changed"] == 0
    finally:
        assert rcv.stop() == 0


class ReplicaWriter(threading.Thread):
    """The target's VM still running: rewrites one extent of the replica every half
    millisecond with content it never wrote before (a counter), until stopped."""

    def __init__(self, replica: Path, offset: int) -> None:
        super().__init__(daemon=True)
        self.replica, self.offset = replica, offset
        self.writes = 0
        self.halt = threading.Event()

    def run(self) -> None:
        fd = os.open(self.replica, os.O_WRONLY)
        try:
            while not self.halt.is_set():
                self.writes += 1
                os.pwrite(fd, struct.pack("<Q", self.writes) * (EXTENT // 8), self.offset)
                time.sleep(0.0005)
        finally:
            os.close(fd)


def test_a_replica_that_changes_during_the_failback_stops_it(tmp_path: Path) -> None:
    require_tool("qemu-io")
    disk, state, target, replica = forced_failover(tmp_path, size="256M")
    qemu_io("raw", replica, "write -P 0x22 16M 8M")  # what the promoted VM wrote
    # the VM is still running there: one extent keeps changing. Failback reads it after
    # the receiver hashed the replica and this side hashed its whole disk (256 MiB: tens
    # of milliseconds at least), while the writer replaces it every half millisecond
    writer = ReplicaWriter(replica, 200 * MiB)
    rcv = start_receiver(target)
    try:
        writer.start()
        while writer.writes < 20:
            time.sleep(0.01)
        out = _failback(rcv, state, disk)
        assert out.returncode == ExitCode.REFUSED, out.stderr[-3000:]
        line = one_line_error(out.stderr)
        assert "changed during the failback" in line and "is the VM still running" in line
        assert "stop the VM on the target" in line and "replicator failback" in line
        assert writer.is_alive()  # it was still changing the replica when failback stopped
        # the volumes may be half restored: send still refuses them
        assert (state / MARKER_FILE).exists()
        refused = replicator(
            "send", "--to", rcv.address, "--job", "vm", "--state-dir", str(state), "--once",
            "--insecure", str(disk),
        )  # fmt: skip
        assert refused.returncode == ExitCode.SPLIT_BRAIN
        assert "failback is under way" in one_line_error(refused.stderr)
        assert sender_at_rest(state)["jobs"][0]["state"] == "failback_incomplete"
        # the VM stops: the same failback finishes, both sides are identical
        writer.halt.set()
        writer.join(timeout=10)
        again = _failback(rcv, state, disk)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["resumed"] is True
        assert not (state / MARKER_FILE).exists()
        _identical(disk, replica)
        summary = send_once(rcv, "vm", state, disk)
        assert summary["basis"] == "local" and summary["bytes_changed"] == 0
    finally:
        writer.halt.set()
        assert rcv.stop() == 0


@pytest.mark.parametrize(
    ("op", "err", "kill"),
    [
        pytest.param("create", errno.EIO, True, id="sigkilled-at-the-record"),
        pytest.param("write", errno.ENOSPC, False, id="enospc-on-the-record"),
        pytest.param("fsync", errno.EIO, False, id="eio-on-its-fsync", marks=pytest.mark.long),
    ],
)
def test_a_sender_stopped_before_recording_the_handover_is_refused(
    tmp_path: Path, op: str, err: int, kill: bool
) -> None:
    """Planned failover: the receiver has promoted, and the sender's `handed-over` record
    (failback.state) never becomes durable: faultfs fails it exactly there, and the sender
    is SIGKILLed at that point (``kill``) or ends by itself, saying what happened. Started
    again it is refused by the promoted receiver; the promoted replica does not change."""
    disk, target = tmp_path / "disk.img", tmp_path / "target"
    qemu_img("create", "-q", "-f", "raw", str(disk), "16M")
    qemu_io("raw", disk, "write -P 0x11 0 2M")
    replica = target / "vm" / disk.name
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        state = fs.mountpoint / "state"
        rcv = start_receiver(target)
        sender = start_send(rcv.address, "vm", state, disk, extra=("--interval", "300"))
        try:
            deadline = time.monotonic() + 30
            while not replica.exists():  # the first scan is in
                assert sender.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            qemu_io("raw", disk, "write -P 0x22 4M 1M")  # only the last scan carries it
            rule = fs.add(op, err, path="*failback.state*")
            out = replicator("failover", "--dir", str(target), "--job", "vm", "--planned")
            assert out.returncode == 0, out.stderr  # promoted
            fs.wait_for_hit(rule)
            if kill:
                sender.send_signal(signal.SIGKILL)
            _, stderr = sender.communicate(timeout=30)
            if kill:  # (unless it had already ended on the error)
                assert sender.returncode in (-signal.SIGKILL, ExitCode.STORAGE), stderr[-3000:]
            else:  # it says what happened, and what not to do
                assert sender.returncode == ExitCode.STORAGE, stderr[-3000:]
                line = one_line_error(stderr)
                assert "the target promoted its replicas" in line and "could not record" in line
                assert "do not start the VM here" in line and "replicator failback" in line
        finally:
            if sender.poll() is None:
                sender.kill()
        fs.clear()
        assert not (state / MARKER_FILE).exists()  # nothing says "handed over" here
        _identical(disk, replica)  # the last scan is in the promoted replica
        before = b3(replica)
        try:
            again = replicator(
                "send", "--to", rcv.address, "--job", "vm", "--state-dir", str(state),
                "--once", "--insecure", str(disk),
            )  # fmt: skip
            assert again.returncode == ExitCode.SPLIT_BRAIN, again.stderr[-3000:]
            line = one_line_error(again.stderr)
            assert "split brain" in line and "promoted by failover" in line
            assert "generation 2" in line and "generation 1" in line and "failback" in line
            assert b3(replica) == before
            # the way back works from this state too
            back = _failback(rcv, state, disk)
            assert back.returncode == 0, back.stderr
            assert json.loads(back.stdout)["bytes_moved"] == 0
            summary = send_once(rcv, "vm", state, disk)
            assert summary["basis"] == "local" and summary["bytes_changed"] == 0
        finally:
            assert rcv.stop() == 0


@pytest.mark.parametrize(
    ("op", "err", "after"),
    [
        pytest.param("write", errno.ENOSPC, 0, id="enospc-before-the-first-byte"),
        pytest.param("write", errno.ENOSPC, 1, id="enospc-at-the-handback"),
        pytest.param("fsync", errno.EIO, 0, id="eio-before-the-first-byte", marks=pytest.mark.long),
        pytest.param("fsync", errno.EIO, 1, id="eio-at-the-handback", marks=pytest.mark.long),
    ],
)
def test_failback_changes_nothing_it_could_not_record(
    tmp_path: Path, op: str, err: int, after: int
) -> None:
    """failback.state's writes fail (faultfs: real ENOSPC/EIO on the sender's state
    folder): before the first volume byte changes (``after`` 0: the "failback" record)
    the volumes stay exactly as they were; before the receiver is told to take the job
    back (1: the "handing-back" record) the target stays promoted and `send` refuses.
    Either way the error says so, and the same failback finishes once the disk is fine."""
    require_tool("qemu-io")
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        disk, state, target, replica = forced_failover(tmp_path, fs.mountpoint / "state")
        qemu_io("raw", replica, "write -P 0x22 16M 8M")  # what the promoted VM wrote
        before = b3(disk)
        rcv = start_receiver(target)
        try:
            rule = fs.add(op, err, path="*failback.state*", after=after)
            out = _failback(rcv, state, disk)
            assert fs.hits()[str(rule)] >= 1
            assert out.returncode == ExitCode.STORAGE, out.stderr[-3000:]
            line = one_line_error(out.stderr)
            assert "cannot record the failback's progress" in line and MARKER_FILE in line
            assert "run the same `replicator failback` again" in line
            promoted = json.loads(replicator("status", "--dir", str(target), "--json").stdout)
            assert promoted["jobs"][0]["promoted"] is True  # the target was not told
            if after == 0:
                assert "nothing was changed here or on the target" in line
                assert b3(disk) == before and not (state / MARKER_FILE).exists()
            else:  # the volumes are the replica's, the record still says "failback"
                assert "which stays promoted" in line
                assert b3(disk) == b3(replica)
                assert sender_at_rest(state)["jobs"][0]["state"] == "failback_incomplete"
                refused = replicator(
                    "send", "--to", rcv.address, "--job", "vm", "--state-dir", str(state),
                    "--once", "--insecure", str(disk),
                )  # fmt: skip
                assert refused.returncode == ExitCode.SPLIT_BRAIN
            fs.clear()
            again = _failback(rcv, state, disk)
            assert again.returncode == 0, again.stderr
            assert not (state / MARKER_FILE).exists()
            _identical(disk, replica)
            summary = send_once(rcv, "vm", state, disk)
            assert summary["basis"] == "local" and summary["bytes_changed"] == 0
        finally:
            assert rcv.stop() == 0


@pytest.mark.parametrize(
    ("op", "err", "path"),
    [
        pytest.param("write", errno.ENOSPC, "*applied.state*", id="enospc-applied-state"),
        pytest.param("unlink", errno.EIO, "*promoted.state*", id="eio-promoted-state"),
    ],
)
def test_a_target_that_cannot_record_the_handback_stays_promoted_and_says_run_failback(
    tmp_path: Path, op: str, err: int, path: str
) -> None:
    """The receiver's own writes of the hand-back fail (faultfs under its --dir: the
    applied point, or the removal of the promotion): the target stays promoted and the
    failback exits 6. Its message gave a send's advice ("run send again"), which `send`
    refuses then; it now says to run the same failback again, which finishes it."""
    require_tool("qemu-io")
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        disk, state, target, replica = forced_failover(tmp_path, target=fs.mountpoint)
        qemu_io("raw", replica, "write -P 0x22 16M 8M")  # what the promoted VM wrote
        rcv = start_receiver(target, log=tmp_path / "receiver.log")
        try:
            rule = fs.add(op, err, path=path, times=1)
            out = _failback(rcv, state, disk)
            assert fs.hits()[str(rule)] == 1
            assert out.returncode == ExitCode.REFUSED, out.stderr[-3000:]
            line = one_line_error(out.stderr)
            assert "receiver refused (storage)" in line and os.strerror(err) in line, line
            assert "run the same `replicator failback` again" in line, line
            assert "run send again" not in line, line
            promoted = json.loads(replicator("status", "--dir", str(target), "--json").stdout)
            assert promoted["jobs"][0]["promoted"] is True
            assert b3(disk) == b3(replica)  # the volumes are the replica's already
            again = _failback(rcv, state, disk)
            assert again.returncode == 0, again.stderr[-3000:]
            assert not (state / MARKER_FILE).exists()
            _identical(disk, replica)
            summary = send_once(rcv, "vm", state, disk)
            assert summary["bytes_changed"] == 0
        finally:
            assert rcv.stop() == 0


def test_failback_names_configuration_files_that_differ_on_the_target(tmp_path: Path) -> None:
    """Disks come back from the promoted side, configuration files do not (failover
    pointed the domain XML at the replicas; the next send ships this side's copy over the
    target's). A file changed on the target is named, so its changes are not lost
    unannounced; one that did not change is not."""
    target, state = tmp_path / "target", tmp_path / "state"
    disk, xml, notes = tmp_path / "disk.img", tmp_path / "vm.xml", tmp_path / "notes.txt"
    qemu_img("create", "-q", "-f", "raw", str(disk), "8M")
    xml.write_text("<domain><name>vm</name><memory>512</memory></domain>\n")
    notes.write_text("owner: ops\n")
    rcv = start_receiver(target)
    try:
        send_once(rcv, "vm", state, disk, xml, notes)
    finally:
        assert rcv.stop() == 0
    promoted = replicator("failover", "--dir", str(target), "--job", "vm", "--force")
    assert promoted.returncode == 0, promoted.stderr
    changed = "<domain><name>vm</name><memory>4096</memory></domain>\n"
    (target / "vm" / xml.name).write_text(changed)  # the admin grew the VM on the target
    rcv = start_receiver(target)
    try:
        out = replicator(
            "failback", "--from", rcv.address, "--job", "vm", "--state-dir", str(state),
            "--insecure", str(disk), str(xml), str(notes),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        lines = [line for line in out.stdout.splitlines() if line.startswith("  note: ")]
        assert lines == [
            "  note: vm.xml differs on the target (changed there, or pointed at the replicas "
            "by failover) and is not brought back: the next send replaces it with this "
            "host's copy; copy what you want to keep from the target's first"
        ]
        assert xml.read_text() != changed  # as said: not brought back
        send_once(rcv, "vm", state, disk, xml, notes)
        assert (target / "vm" / xml.name).read_text() == xml.read_text()
    finally:
        assert rcv.stop() == 0


def _two_disks_failed_over(tmp_path: Path) -> tuple[Path, Path, Path, Path, Path]:
    """Job `vm` of a small disk `a.img` and a larger `b.img` sent once, then `failover
    --force`, and the promoted VM writes both; returns (a, b, state, target, replicas)."""
    a, b, state, target = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "st", tmp_path / "t"
    qemu_img("create", "-q", "-f", "raw", str(a), "16M")
    qemu_img("create", "-q", "-f", "raw", str(b), "256M")
    qemu_io("raw", a, "write -P 0x11 0 4M")
    qemu_io("raw", b, "write -P 0x12 0 256M")  # all data: hashing it takes a while
    rcv = start_receiver(target)
    try:
        send_once(rcv, "vm", state, a, b)
    finally:
        assert rcv.stop() == 0
    out = replicator("failover", "--dir", str(target), "--job", "vm", "--force")
    assert out.returncode == 0, out.stderr
    replicas = target / "vm"
    qemu_io("raw", replicas / "a.img", "write -P 0x21 1M 64k")
    qemu_io("raw", replicas / "b.img", "write -P 0x22 100M 1M")
    return a, b, state, target, replicas


def _failback_of(rcv: ReceiverProc, state: Path, *disks: Path) -> list[str]:
    return [
        *REPLICATOR, "failback", "--from", rcv.address, "--job", "vm", "--state-dir",
        str(state), "--insecure", *map(str, disks),
    ]  # fmt: skip


def test_a_failback_not_given_a_changed_replica_hands_nothing_back(tmp_path: Path) -> None:
    """Given only some of the job's disks, failback handed the whole job back, and the next
    `send` of all of them replaced the promoted VM's writes to the others with the source's
    old copy, both sides then identical and nobody told."""
    require_tool("qemu-io")
    a, b, state, target, replicas = _two_disks_failed_over(tmp_path)
    wanted = b3(replicas / "b.img")
    rcv = start_receiver(target)
    try:
        out = subprocess.run(
            _failback_of(rcv, state, a), capture_output=True, text=True, env=ENV, timeout=120
        )
        assert out.returncode == ExitCode.REFUSED, out.stderr[-3000:]
        line = one_line_error(out.stderr)
        assert "'b.img' changed while the job was promoted" in line, line
        assert "every volume of the job" in line, line
        status = replicator("status", "--dir", str(target), "--json")
        assert json.loads(status.stdout)["jobs"][0]["promoted"] is True  # nothing handed back
        out = subprocess.run(
            _failback_of(rcv, state, a, b), capture_output=True, text=True, env=ENV, timeout=120
        )
        assert out.returncode == 0, out.stderr[-3000:]
        _identical(a, replicas / "a.img")
        _identical(b, replicas / "b.img")
        assert b3(b) == wanted
        assert send_once(rcv, "vm", state, a, b)["bytes_changed"] == 0
        assert b3(replicas / "b.img") == wanted  # the promoted VM's writes kept
    finally:
        assert rcv.stop() == 0


def test_a_write_the_failback_never_reads_still_stops_it(tmp_path: Path) -> None:
    """The VM still running on the target writes, during the failback, into an extent both
    sides held the same when it was compared: failback never reads it, so only its reads'
    checks could not see it. It handed back, and the next `send` said durable with the
    replica differing from the source."""
    require_tool("qemu-io")
    a, b, state, target, replicas = _two_disks_failed_over(tmp_path)
    rcv = start_receiver(target)
    try:
        proc = subprocess.Popen(  # with its info lines: when a.img is done
            _failback_of(rcv, state, a, b), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=LOUD_ENV,
        )  # fmt: skip
        assert proc.stderr is not None
        for line in proc.stderr:  # a.img is restored; b.img (256 MiB) is being hashed
            if '"failback.volume"' in line and '"a.img"' in line:
                fd = os.open(replicas / "a.img", os.O_WRONLY)
                try:
                    os.pwrite(fd, b"\x31" * EXTENT, 8 * MiB)
                finally:
                    os.close(fd)
                break
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == ExitCode.REFUSED, rest[-3000:]
        assert "changed during the failback" in one_line_error(rest)
        assert (state / MARKER_FILE).exists()  # send refuses the half-restored volumes
        again = _failback(rcv, state, a)
        assert again.returncode == ExitCode.REFUSED  # b.img left out: refused too
        out = subprocess.run(
            _failback_of(rcv, state, a, b), capture_output=True, text=True, env=ENV, timeout=120
        )
        assert out.returncode == 0, out.stderr[-3000:]
        _identical(a, replicas / "a.img")
        _identical(b, replicas / "b.img")
        assert _pattern_at(a, 8 * MiB) == b"\x31" * EXTENT
    finally:
        assert rcv.stop() == 0


def test_a_failback_under_a_vm_still_running_on_the_source_changes_nothing(
    tmp_path: Path,
) -> None:
    """The docs say to keep the source's VM stopped; one left running (QEMU's write lock
    on its disk) had its disk rewritten under it, and failback said done: the VM went on
    from a disk it no longer knew, and the next send shipped the mix."""
    disk, state, target, replica = forced_failover(tmp_path)
    qemu_io("raw", replica, "write -P 0x33 1M 1M")  # the promoted VM writes
    before = b3(disk)
    rcv = start_receiver(target)
    try:
        vm = idle_qemu_writer("raw", disk)
        try:
            out = _failback(rcv, state, disk)
        finally:
            vm.kill()
            vm.wait()
        assert out.returncode == ExitCode.CONFIG, out.stderr
        error = one_line_error(out.stderr)
        assert "is open for writing by another program" in error, error
        assert "stop the VM on this host" in error and "nothing was changed" in error
        assert b3(disk) == before and not (state / MARKER_FILE).exists()
        again = _failback(rcv, state, disk)  # the VM stopped: as usual
        assert again.returncode == 0, again.stderr
        _identical(disk, replica)
    finally:
        assert rcv.stop() == 0


def test_a_failback_beside_a_running_sender_is_told_to_stop_it_not_to_change_state_dir(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """Refused by the sender's claim, it was told "or give this one its own --state-dir":
    a failback must run with the sender's own state folder, never with another."""
    disk, state = tmp_path / "disk.img", tmp_path / "state"
    qemu_img("create", "-q", "-f", "raw", str(disk), "4M")
    sender = start_send(receiver.address, "vm", state, disk, extra=("--interval", "5"))
    try:
        deadline = time.monotonic() + 60
        while not (state / "sender.json").exists():
            assert sender.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # it holds its images too
        mine = _failback(receiver, state, disk)
        plain = replicator("failback", "--from", receiver.address, "--job", "vm", "--insecure",
                           str(disk))  # fmt: skip
    finally:
        sender.send_signal(signal.SIGTERM)
        sender.communicate(timeout=60)
    for out in (mine, plain):
        assert out.returncode == ExitCode.CONFIG, out.stderr
        error = one_line_error(out.stderr)
        assert "failback needs the job to itself" in error, error
        assert "its own --state-dir" not in error and "replicate a copy" not in error, error
