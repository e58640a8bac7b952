"""The cases that used to break "durable means durable", run as a user would.

Each one: a fault, a clear error (never exit 0 and "durable" for a replica that differs),
then the fault goes away and the next plain `send --once` makes the replica equal the
source, checked with cmp-equivalent bytes and blake3.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from replicator.journal.segment import HEADER_BYTES
from tests.tools import (
    ReceiverProc,
    b3,
    replicator,
    send_once,
    start_receiver,
    start_send,
    wait_for,
)
from tests.tools import tmpfs as small_tmpfs

MiB = 1024 * 1024


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs the test mounts itself (root, as in CI)."""
    with small_tmpfs(tmp_path / "small", "40m") as mnt:
        yield mnt


def _send(
    receiver: ReceiverProc, job: str, state: Path, disk: Path
) -> subprocess.CompletedProcess[str]:
    return replicator(
        "send", "--to", receiver.address, "--job", job, "--state-dir", str(state),
        "--once", "--json", "--insecure", str(disk),
    )  # fmt: skip


def _events(stderr: str) -> list[dict[str, object]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_a_first_sync_out_of_space_is_never_reported_durable(tmp_path: Path, tmpfs: Path) -> None:
    """A first sync is written straight into the replica: 48 MiB do not fit in 40."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(48 * MiB))
    receiver = start_receiver(tmpfs)
    try:
        state = tmp_path / "state"
        _refused_for_space_then_converges(receiver, tmpfs, state, disk)
    finally:
        receiver.stop()


def test_replica_write_out_of_space_is_never_reported_durable(tmp_path: Path, tmpfs: Path) -> None:
    """The issue's first case: the journal fits, the replica write does not (a later sync
    goes through the receive journal: 16 MiB of new data there and in the replica)."""
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.write(os.urandom(8 * MiB))
        f.truncate(24 * MiB)  # a sparse tail: the replica holds 8 MiB after the first sync
    receiver = start_receiver(tmpfs)
    try:
        state = tmp_path / "state"
        send_once(receiver, "full", state, disk)
        with disk.open("r+b") as f:
            f.seek(8 * MiB)
            f.write(os.urandom(16 * MiB))  # journal 16 + replica 8 + 16 > 40 MiB
        _refused_for_space_then_converges(receiver, tmpfs, state, disk)
    finally:
        receiver.stop()


def _refused_for_space_then_converges(
    receiver: ReceiverProc, tmpfs: Path, state: Path, disk: Path
) -> None:
    """A send into the full tmpfs is refused (never "durable") and the receiver lives on;
    with room, the next plain send makes the replica equal and verify agrees."""
    out = _send(receiver, "full", state, disk)
    assert out.returncode == ExitCode.REFUSED, out.stderr[-2000:]
    assert "No space left on device" in out.stderr or "disk is full" in out.stderr
    assert receiver.proc.poll() is None
    subprocess.run(["mount", "-o", "remount,size=256m", str(tmpfs)], check=True)
    summary = send_once(receiver, "full", state, disk)
    assert b3(tmpfs / "full" / "disk.img") == b3(disk), summary
    verify = replicator(
        "verify", "--to", receiver.address, "--job", "full", "--state-dir", str(state),
        "--insecure", str(disk),
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_symlink_planted_at_the_replica_is_refused_then_the_replica_converges(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(2 * MiB))
    state = tmp_path / "state"
    send_once(receiver, "planted", state, disk)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not yours")
    replica = receiver.dir / "planted" / "disk.img"
    replica.unlink()
    replica.symlink_to(elsewhere)
    with disk.open("r+b") as f:
        f.write(os.urandom(65536))
    out = _send(receiver, "planted", state, disk)
    assert out.returncode == ExitCode.REFUSED, out.stderr[-2000:]
    assert "diverged" in out.stderr and "not a regular file" in out.stderr
    assert "--resync" in out.stderr  # what to do
    assert elsewhere.read_bytes() == b"not yours"  # nothing written through the link
    replica.unlink()
    out = _send(receiver, "planted", state, disk)  # a replica deleted by hand: the same
    assert out.returncode == ExitCode.REFUSED and "deleted outside" in out.stderr
    summary = send_once(receiver, "planted", state, disk, extra=("--resync",))
    assert summary["basis"] == "remote"
    assert b3(replica) == b3(disk)


def _flip(path: Path, offset: int) -> None:
    """Flip one bit where it lies. Not ``write_bytes``: that truncates the file first, and
    a sender reading it meanwhile saw a segment shorter than its durable size (exit 8 for
    another reason than the flip, once under two suites' load)."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0] ^ 0x01
        f.seek(offset)
        f.write(bytes([byte]))


def test_a_flipped_byte_in_the_receive_journal_does_not_wedge_the_job(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(16 * MiB))
    target = tmp_path / "target"
    receiver = start_receiver(target)
    state = tmp_path / "state"
    try:
        send_once(receiver, "rot", state, disk)  # a first sync: written past the journal
        with disk.open("r+b") as f:
            f.write(os.urandom(4 * MiB))
        send_once(receiver, "rot", state, disk)  # through the journal: records stay there
    finally:
        receiver.stop()
    segments = sorted((target / ".replicator" / "rot" / "journal").glob("*.seg"))
    newest = segments[-1]
    _flip(newest, newest.stat().st_size // 2)
    with disk.open("r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
    receiver = start_receiver(target)
    try:
        summary = send_once(receiver, "rot", state, disk)
        assert b3(target / "rot" / "disk.img") == b3(disk), summary
    finally:
        receiver.stop()
    assert receiver.proc.stderr is not None
    events = [e["event"] for e in _events(receiver.proc.stderr.read())]
    assert "journal.damage_cut" in events


def _synced_then_changed(
    tmp_path: Path, receiver: ReceiverProc, job: str, size: int, change: int
) -> tuple[Path, Path]:
    """A disk of ``size`` random bytes sent once (a first sync, past the journal), then its
    first ``change`` bytes rewritten: what the next send journals. (disk, state dir)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(size))
    state = tmp_path / "state"
    send_once(receiver, job, state, disk)
    with disk.open("r+b") as f:
        f.write(os.urandom(change))
    return disk, state


def test_a_flipped_byte_in_the_sender_journal_is_recovered_by_comparing(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk, state = _synced_then_changed(tmp_path, receiver, "srot", 8 * MiB, 4 * MiB)
    # a continuous sender stopped once the change is applied leaves its records at rest
    # (a `send --once` retires them: nothing would be left to damage). Its scan compares
    # with the replica (--resync) so that it journals them: one from the local manifests
    # ships them without the journal (engine/direct_intent.py)
    proc = start_send(receiver.address, "srot", state, disk, extra=("--interval", "60", "--resync"))
    try:
        replica = receiver.dir / "srot" / "disk.img"
        wait_for(lambda: b3(replica) == b3(disk), proc, "the change applied")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    (segment,) = sorted((state / "journal").glob("*.seg"))
    assert segment.stat().st_size > 4 * MiB  # the change's records, at rest
    _flip(segment, HEADER_BYTES + segment.stat().st_size // 3)
    with disk.open("r+b") as f:
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
    out = _send(receiver, "srot", state, disk)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["basis"] == "remote"
    assert "sender.journal_damaged" in [e["event"] for e in _events(out.stderr)]
    assert b3(receiver.dir / "srot" / "disk.img") == b3(disk)


def test_a_byte_flipped_in_the_sender_journal_while_it_ships_stops_it_with_exit_8(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A record damaged on disk after it was journaled (checked from memory as it was
    appended, and at open). The sender leaves record checksums to a receiver that checks
    each one: the receiver refuses it, the sender's next session checks what was shipped
    unchecked and finds it, and it stops with exit 8 and a hint that a restart recovers
    (its journal is opened with damage cut); the next run cuts, compares, and the replica
    equals the source. Never applied, never a session retried for ever."""
    disk, state = _synced_then_changed(tmp_path, receiver, "live", 64 * MiB, 48 * MiB)
    # --resync: a scan that compares with the replica journals what it ships
    extra = ("--interval", "60", "--rate", "4MB/s", "--resync")
    proc = start_send(receiver.address, "live", state, disk, extra=extra)
    try:

        def journaled() -> bool:  # the cycle's records synced; shipping at 4 MB/s
            return sum(p.stat().st_size for p in (state / "journal").glob("*.seg")) > 48 * MiB

        wait_for(journaled, proc, "the change in the journal")
        newest = max((state / "journal").glob("*.seg"))
        # Not yet read at this rate unless journaling the change took ~11 s. At 8 MB/s it was
        # 5.8 s: the likeliest cause of one failure under the full suite's load (not kept).
        _flip(newest, newest.stat().st_size - 3 * MiB // 2)
        assert proc.wait(timeout=60) == ExitCode.JOURNAL
    finally:
        proc.kill()
        proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "checksum mismatch" in err and "journal inspect" in err, err[-3000:]
    assert "start it again: the journal is cut at the damage" in err, err[-3000:]
    out = _send(receiver, "live", state, disk)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["basis"] == "remote"
    assert b3(receiver.dir / "live" / "disk.img") == b3(disk)


def test_damaged_sender_manifests_fall_back_to_comparing(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """Used to exit 70 (not in the exit-code table), and --resync did not get past it."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    state = tmp_path / "state"
    send_once(receiver, "mrot", state, disk)
    _flip(state / "manifests.state", 40)
    with disk.open("r+b") as f:
        f.write(os.urandom(65536))
    out = _send(receiver, "mrot", state, disk)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["basis"] == "remote"
    assert "sender.state_damaged" in [e["event"] for e in _events(out.stderr)]
    assert b3(receiver.dir / "mrot" / "disk.img") == b3(disk)


def test_damaged_receiver_state_file_is_rebuilt_and_compared(tmp_path: Path) -> None:
    """Rebuilt from the journal, but not trusted as a point: a plain send is refused with
    the way out (tests/cli/test_failover.py has the qcow2 case with status and failover)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    target = tmp_path / "target"
    state = tmp_path / "state"
    receiver = start_receiver(target)
    try:
        send_once(receiver, "arot", state, disk)
    finally:
        receiver.stop()
    _flip(target / ".replicator" / "arot" / "applied.state", 36)
    with disk.open("r+b") as f:
        f.write(os.urandom(65536))
    receiver = start_receiver(target)
    try:
        out = _send(receiver, "arot", state, disk)
        assert out.returncode == ExitCode.REFUSED, out.stderr[-2000:]
        assert "receiver.replica_unknown" not in out.stderr  # the receiver's log, not ours
        assert "the replica is not known" in out.stderr and "--resync" in out.stderr
        send_once(receiver, "arot", state, disk, extra=("--resync",))
        assert b3(target / "arot" / "disk.img") == b3(disk)
        with disk.open("r+b") as f:
            f.seek(MiB)
            f.write(os.urandom(65536))
        assert send_once(receiver, "arot", state, disk)["basis"] == "local"
        assert b3(target / "arot" / "disk.img") == b3(disk)
    finally:
        receiver.stop()


def test_a_deleted_stamps_file_never_lets_an_edited_replica_be_built_upon(
    tmp_path: Path,
) -> None:
    """files.state deleted on the target (with the replica edited meanwhile): the stamps
    that tell the edit are gone. Used to adopt the replica as it was: exit 0, "durable",
    the edit left in place."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    target, state = tmp_path / "target", tmp_path / "state"
    receiver = start_receiver(target)
    try:
        send_once(receiver, "nostamps", state, disk)
    finally:
        receiver.stop()
    with (target / "nostamps" / "disk.img").open("r+b") as f:
        f.seek(MiB)
        f.write(b"guest wrote here")
    (target / ".replicator" / "nostamps" / "files.state").unlink()
    with disk.open("r+b") as f:
        f.seek(2 * MiB)
        f.write(os.urandom(65536))
    receiver = start_receiver(target)
    try:
        out = _send(receiver, "nostamps", state, disk)
        assert out.returncode == ExitCode.REFUSED, out.stderr[-2000:]
        assert "files.state is missing" in out.stderr and "--resync" in out.stderr
        send_once(receiver, "nostamps", state, disk, extra=("--resync",))
        assert b3(target / "nostamps" / "disk.img") == b3(disk)
        assert send_once(receiver, "nostamps", state, disk)["basis"] == "local"
    finally:
        receiver.stop()


def test_an_applied_state_restored_from_a_backup_does_not_clear_lost_stamps(
    tmp_path: Path,
) -> None:
    """The replica edited, then files.state damaged: the send is refused, the replica is
    unknown. The operator puts applied.state back from last night's backup (it says
    nothing of the damage): used to exit 0 with the edit left in the replica."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    target, state = tmp_path / "target", tmp_path / "state"
    job_state = target / ".replicator" / "restored"
    receiver = start_receiver(target)
    try:
        send_once(receiver, "restored", state, disk)
    finally:
        receiver.stop()
    backup = (job_state / "applied.state").read_bytes()
    with (target / "restored" / "disk.img").open("r+b") as f:
        f.seek(2 * MiB)
        f.write(b"guest wrote here")
    _flip(job_state / "files.state", 40)
    with disk.open("r+b") as f:
        f.write(os.urandom(65536))
    receiver = start_receiver(target)
    try:
        out = _send(receiver, "restored", state, disk)
        assert out.returncode == ExitCode.REFUSED, out.stderr[-2000:]
        assert "files.state cannot be read" in out.stderr and "--resync" in out.stderr
    finally:
        receiver.stop()
    (job_state / "applied.state").write_bytes(backup)
    receiver = start_receiver(target)
    try:
        out = _send(receiver, "restored", state, disk)
        assert out.returncode == ExitCode.REFUSED, out.stderr[-2000:]
        assert "files.state cannot be read" in out.stderr and "--resync" in out.stderr
        send_once(receiver, "restored", state, disk, extra=("--resync",))
        assert b3(target / "restored" / "disk.img") == b3(disk)
        assert send_once(receiver, "restored", state, disk)["basis"] == "local"
        assert b3(target / "restored" / "disk.img") == b3(disk)
    finally:
        receiver.stop()


def test_a_damaged_replica_identity_is_refused_naming_the_file(tmp_path: Path) -> None:
    """replica.id damaged: the receiver makes a new identity, and the sender that knew the
    old one refuses to build on the replica. Its message used to name only a wrong --to or
    a replaced job folder, never the file the receiver had logged as damaged."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(2 * MiB))
    target, state = tmp_path / "target", tmp_path / "state"
    receiver = start_receiver(target)
    try:
        send_once(receiver, "ident", state, disk)
    finally:
        receiver.stop()
    _flip(target / ".replicator" / "ident" / "replica.id", 40)
    with disk.open("r+b") as f:
        f.write(os.urandom(65536))
    receiver = start_receiver(target)
    try:
        out = _send(receiver, "ident", state, disk)
        assert out.returncode == ExitCode.SPLIT_BRAIN, out.stderr[-2000:]
        assert "ident/replica.id) was damaged or deleted" in out.stderr
        assert "--resync" in out.stderr
        send_once(receiver, "ident", state, disk, extra=("--resync",))
        assert b3(target / "ident" / "disk.img") == b3(disk)
        assert send_once(receiver, "ident", state, disk)["basis"] == "local"
    finally:
        receiver.stop()


def test_an_older_applied_state_never_replays_records_over_newer_direct_writes(
    tmp_path: Path,
) -> None:
    """Found by the state damage sweep. A comparison of an unknown replica is written
    straight into it, past the receive journal (it never held a point). applied.state put
    back from a copy older than that: its redo applied the journal's older records over
    the comparison's newer bytes, and the next plain send exited 0 with them in place."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    target, state = tmp_path / "target", tmp_path / "state"
    job_state = target / ".replicator" / "older"
    receiver = start_receiver(target)
    try:
        send_once(receiver, "older", state, disk)
    finally:
        receiver.stop()
    oldest = (job_state / "applied.state").read_bytes()
    receiver = start_receiver(target)
    try:
        with disk.open("r+b") as f:
            f.write(b"\x22" * 65536)
        send_once(receiver, "older", state, disk)  # through the receive journal
    finally:
        receiver.stop()
    _flip(job_state / "applied.state", 40)
    with disk.open("r+b") as f:
        f.write(b"\x33" * 65536)
    receiver = start_receiver(target)
    try:
        assert _send(receiver, "older", state, disk).returncode == ExitCode.REFUSED
        send_once(receiver, "older", state, disk, extra=("--resync",))  # past the journal
        with disk.open("r+b") as f:
            f.seek(MiB)
            f.write(os.urandom(65536))
        send_once(receiver, "older", state, disk)  # through the journal again
    finally:
        receiver.stop()
    (job_state / "applied.state").write_bytes(oldest)  # "restored from a backup"
    with disk.open("r+b") as f:
        f.seek(2 * MiB)
        f.write(os.urandom(65536))
    receiver = start_receiver(target)
    try:
        out = _send(receiver, "older", state, disk)
        assert out.returncode == ExitCode.REFUSED, out.stderr[-2000:]
        assert "applied.state) is older than its journal" in out.stderr
        assert "--resync" in out.stderr
        send_once(receiver, "older", state, disk, extra=("--resync",))
        assert b3(target / "older" / "disk.img") == b3(disk)
        assert send_once(receiver, "older", state, disk)["basis"] == "local"
        assert b3(target / "older" / "disk.img") == b3(disk)
    finally:
        receiver.stop()


def test_a_replica_edited_on_the_target_is_never_silently_built_upon(tmp_path: Path) -> None:
    """Used to stay edited while every later send said "durable"; only verify noticed."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    target = tmp_path / "target"
    state = tmp_path / "state"
    receiver = start_receiver(target)
    try:
        send_once(receiver, "edited", state, disk)
    finally:
        receiver.stop()
    replica = target / "edited" / "disk.img"
    with replica.open("r+b") as f:  # the replica VM was started by hand, say
        f.seek(MiB)
        f.write(b"guest wrote here")
    with disk.open("r+b") as f:
        f.seek(2 * MiB)
        f.write(os.urandom(65536))
    receiver = start_receiver(target)
    try:
        out = _send(receiver, "edited", state, disk)
        assert out.returncode == ExitCode.REFUSED, out.stderr[-2000:]
        assert "changed outside replication" in out.stderr and "--resync" in out.stderr
        verify = replicator(
            "verify", "--to", receiver.address, "--job", "edited", "--state-dir", str(state),
            "--insecure", str(disk),
        )  # fmt: skip
        assert verify.returncode == ExitCode.DIFFERENT, verify.stdout + verify.stderr
        # its next: line named only "a send ships it", which is refused here
        said = " ".join(verify.stdout.split())
        assert "a replica written on the target, outside replication, makes a plain send" in said
        assert "until `replicator send --resync`" in said
        assert _send(receiver, "edited", state, disk).returncode == ExitCode.REFUSED  # still
        summary = send_once(receiver, "edited", state, disk, extra=("--resync",))
        assert summary["basis"] == "remote"
        assert b3(replica) == b3(disk)
        send_once(receiver, "edited", state, disk)  # and plain sends work again
    finally:
        receiver.stop()
