"""A receiver whose disk fills up refuses with a clear message, keeps serving, and resumes."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from replicator.engine.sender_state import journal_cap
from replicator.engine.statedir import state_reserve
from tests.killcycles import tree_digest
from tests.tools import (
    ENV,
    REPLICATOR,
    LiveNbdSender,
    LoggedPopen,
    b3,
    is_mounted,
    one_line_error,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    send_once,
    sender_errors,
    start_receiver,
    tmpfs,
    wait_for,
)

MiB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs the test mounts itself (root, as in CI)."""
    with tmpfs(tmp_path / "small", "16m") as mnt:
        yield mnt


def test_disk_full_is_refused_then_resumes_after_space_is_freed(
    tmp_path: Path, small_disk: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(40 * 1024 * 1024))
    receiver = start_receiver(small_disk)
    try:
        state = tmp_path / "state"
        out = replicator(
            "send", "--to", receiver.address, "--job", "full", "--state-dir", str(state),
            "--once", "--insecure", str(disk),
        )  # fmt: skip
        assert out.returncode == ExitCode.REFUSED, out.stderr
        line = one_line_error(out.stderr)
        # which file system: the replicas' and the state's share the tmpfs here
        where = re.escape(str(small_disk / "full"))
        assert re.search(rf"disk is full \(\d+ MiB free for {where}\);", line), line
        assert receiver.proc.poll() is None  # still serving
        # the job's status says so, once: not the sender's frames that were on their way
        # ("Records out of turn"), counted as a protocol error
        status = replicator("status", "--dir", str(small_disk), "--json")
        (job,) = json.loads(status.stdout)["jobs"]
        assert job["errors"] == {"storage": 1}, job
        assert "disk is full" in job["last_error"], job
        subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
        send_once(receiver, "full", state, disk)
        assert b3(small_disk / "full" / "disk.img") == b3(disk)
    finally:
        receiver.stop()


def test_a_sender_with_a_small_state_disk_sends_an_epoch_larger_than_it(
    tmp_path: Path, small_disk: Path
) -> None:
    """A state folder on a 16 MiB file system: an epoch larger than it is sent through
    a journal capped at half the free space (it waits at the cap for acks) rather than
    running the file system out of space, which failed the send (exit 9) until space was
    freed. Filled by another program up to the room the state folder's own files need to
    be rewritten (``state_reserve``), it still sends, within the segment files the
    journal already has: the journal leaves that room alone. (It was filled to the last
    byte here, and then whether the journal's next file or a manifest save met ENOSPC
    first was a race. A file system filled during a run is told as exit 9:
    test_a_live_sender_whose_state_disk_is_filled_by_another_says_so.)"""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(8 * MiB) + bytes(24 * MiB))
    receiver = start_receiver(tmp_path / "target")
    replica = tmp_path / "target" / "vm1" / "disk.img"
    try:
        state = small_disk / "state"
        send_once(receiver, "vm1", state, disk)  # the first sync skips the journal
        with disk.open("r+b") as f:
            f.write(os.urandom(24 * MiB))  # more than the 16 MiB file system holds
        out = replicator(
            "send", "--to", receiver.address, "--job", "vm1", "--state-dir", str(state),
            "--once", "--insecure", str(disk),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert "sender.journal_capped" in out.stderr
        assert b3(replica) == b3(disk)
        fs = os.statvfs(small_disk)
        with (small_disk / "filler").open("wb") as f:  # another program fills it
            f.write(bytes(fs.f_bavail * fs.f_frsize - state_reserve(state)))
        with disk.open("r+b") as f:
            f.write(os.urandom(8 * MiB))
        send_once(receiver, "vm1", state, disk)  # within the journal's files, reused
        assert b3(replica) == b3(disk)
    finally:
        receiver.stop()


def test_the_journal_cap_leaves_the_state_files_room_to_be_rewritten(small_disk: Path) -> None:
    """The journal may take half the free space, but not the room the state folder's own
    files need to be replaced (their sizes again, and some slack): with just that room
    free, the cap is what the journal already holds."""
    state = small_disk / "state"
    (state / "journal").mkdir(parents=True)
    (state / "journal" / f"{1:020d}.seg").write_bytes(bytes(3 * MiB))
    (state / "manifests.state").write_bytes(bytes(MiB))
    reserve = state_reserve(state)
    assert reserve > MiB
    fs = os.statvfs(small_disk)
    with (small_disk / "filler").open("wb") as f:  # 2 MiB free beyond the reserve
        f.write(bytes(fs.f_bavail * fs.f_frsize - reserve - 2 * MiB))
    assert journal_cap(state, 1 << 30) == 4 * MiB  # what it holds and half of the rest
    with (small_disk / "filler").open("ab") as f:
        f.write(bytes(2 * MiB))
    assert journal_cap(state, 1 << 30) == 3 * MiB  # nothing of the reserve


@pytest.mark.parametrize("capture", ["scan", "nbd", "fuse"])
def test_a_continuous_sender_outlives_a_full_target_and_resumes_once_space_is_freed(
    tmp_path: Path, small_disk: Path, capture: str
) -> None:
    """A receiver whose disk fills up refuses (storage). The source must not pay for the
    target's disk: a continuous sender keeps running (a live one keeps serving its VM's
    writes), says why in its status, and retries; once space is freed, the replica
    catches up with nothing restarted. (It used to exit 6, which took the NBD export or
    the FUSE folder away from the VM using them.)"""
    receiver = start_receiver(small_disk, log=tmp_path / "receiver.log")
    state, job = tmp_path / "state", "vm1"
    common = ["send", "--to", receiver.address, "--job", job, "--state-dir", str(state),
              "--insecure"]  # fmt: skip
    source, sock, mnt = tmp_path / "vm", tmp_path / "nbd.sock", tmp_path / "mnt"
    if capture == "fuse":
        source.mkdir()
        mnt.mkdir()
        (source / "vm.xml").write_text("<domain/>\n")
        extra = ["--capture", "fuse", "--mount", str(mnt), str(source)]
        replica, written = small_disk / job, mnt / "disk.img"
    else:
        source = tmp_path / "disk.img"
        qemu_img("create", "-q", "-f", "raw", str(source), "32M")
        extra = ["--interval", "0.5", str(source)]
        if capture == "nbd":
            extra = ["--capture", "nbd", "--nbd-socket", str(sock), str(source)]
        replica, written = small_disk / job / "disk.img", source

    def write(pattern: int) -> None:  # as the VM would: through the capture
        if capture == "nbd":
            uri = f"nbd+unix:///disk.img?socket={sock}"
            qemu_io("raw", uri, f"write -P {pattern} 0 24M", "flush")
        elif capture == "fuse":
            with written.open("wb") as f:
                f.write(bytes([pattern]) * 24 * MiB)
                os.fsync(f.fileno())
        else:
            qemu_io("raw", written, f"write -P {pattern} 0 24M")

    def same() -> bool:
        if capture == "fuse":
            return tree_digest(replica) == tree_digest(source)
        return (
            replica.exists() and qemu_compare("raw", source, replica, shared=True).returncode == 0
        )

    def serving() -> bool:  # the VM could use it
        return {"scan": True, "nbd": sock.exists(), "fuse": is_mounted(mnt)}[capture]

    sender = LoggedPopen([*REPLICATOR, *common, *extra], stdout=subprocess.DEVNULL, env=ENV)
    try:
        wait_for(lambda: same() and serving(), sender, "the first sync")
        write(7)  # 24 MiB into a 16 MiB file system
        wait_for(lambda: "storage" in sender_errors(state), sender, "a storage refusal")
        write(8)  # the source still takes writes, after the refusal
        assert sender.poll() is None
        subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
        wait_for(same, sender, "the replica to catch up once space was freed")
        assert b3(replica if capture != "fuse" else replica / "disk.img") == b3(written)
    finally:
        if sender.poll() is None:
            sender.send_signal(signal.SIGTERM)
        rc = sender.wait(timeout=60)
        receiver.stop()
    err = sender.stderr.read() if sender.stderr else ""
    assert rc == 0, err[-3000:]
    assert "sender.receiver_storage" in err


def test_a_live_senders_small_state_disk_never_fails_its_vms_writes(
    tmp_path: Path, small_disk: Path
) -> None:
    """The state folder's file system holds 16 MiB, far less than the live journal's
    16 GiB default cap, and the receiver stops answering while the VM writes 24 MiB. The
    journal used to run its file system out of space: the VM's write failed (EIO), the
    export went away and the sender exited 70 ("unexpected error"). The journal now
    stops at half the free space, so the writes go on (tracked past the cap), and the
    replica catches up once the receiver answers again."""
    receiver = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    sender = LiveNbdSender(tmp_path, receiver, state=small_disk / "state")
    try:
        receiver.proc.send_signal(signal.SIGSTOP)  # it stops answering
        sender.write(*(f"write -P {i + 1} {i * 4}M 4M" for i in range(6)))
        assert sender.proc.poll() is None
        receiver.proc.send_signal(signal.SIGCONT)
        wait_for(sender.caught_up, sender.proc, "the replica to catch up")
        assert b3(sender.replica) == b3(sender.source)
    finally:
        receiver.proc.send_signal(signal.SIGCONT)
        rc, err = sender.stop()
        receiver.stop()
    assert rc == 0, err[-3000:]
    assert "sender.journal_capped" in err and "nbd.journal_overflow" in err


def test_a_live_sender_whose_state_disk_is_filled_by_another_says_so(
    tmp_path: Path, small_disk: Path
) -> None:
    """Another program fills the state folder's file system under a running live sender:
    the journal cannot grow and the capture must stop (the journal is its promise to the
    VM's writes). It exits 9 naming the full file system and what to do, not 70
    "unexpected error" as it did, and the next start compares and catches up."""
    receiver = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    sender = LiveNbdSender(tmp_path, receiver, state=small_disk / "state")
    try:
        receiver.proc.send_signal(signal.SIGSTOP)
        with (small_disk / "filler").open("wb") as f:  # all but a little of what is free
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            f.write(bytes(max(0, free - 512 * 1024)))
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 9 0 4M", sender.uri],
                       capture_output=True, timeout=60)  # fmt: skip
        sender.proc.wait(timeout=60)
        rc, err = sender.stop()
        assert rc == ExitCode.STORAGE, err[-3000:]
        line = one_line_error(err)
        assert "is full" in line and "unexpected" not in line, line
    finally:
        receiver.proc.send_signal(signal.SIGCONT)
        if sender.proc.poll() is None:
            sender.proc.kill()
    (small_disk / "filler").unlink()
    send_once(receiver, "vm1", sender.state, sender.source)
    receiver.stop()
    compared = qemu_compare("raw", sender.source, sender.replica)
    assert compared.returncode == 0, compared.stdout


def test_a_new_job_on_a_full_state_disk_is_refused_naming_it(
    tmp_path: Path, small_disk: Path
) -> None:
    """The receiver's state file system is full before a new job's first session: the
    job cannot even be opened (its journal has no room). The sender is told which file
    system is full and how much room is left, not a bare "[Errno 28]"; once there is
    room, the same command goes through."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    receiver = start_receiver(tmp_path / "target", state_dir=small_disk / "state")
    try:
        with (small_disk / "filler").open("wb") as f:
            f.write(bytes(os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize))
        state = tmp_path / "state"
        out = replicator(
            "send", "--to", receiver.address, "--job", "vm1", "--state-dir", str(state),
            "--once", "--insecure", str(disk),
        )  # fmt: skip
        assert out.returncode == ExitCode.REFUSED, out.stderr
        line = one_line_error(out.stderr)
        assert "cannot open job 'vm1'" in line, line
        where = re.escape(str(small_disk / "state"))
        assert re.search(rf"disk is full \(.*\d+ MiB free for {where}/vm1\)", line), line
        (small_disk / "filler").unlink()
        send_once(receiver, "vm1", state, disk)
        assert b3(tmp_path / "target" / "vm1" / "disk.img") == b3(disk)
    finally:
        receiver.stop()


def test_a_receivers_state_disk_smaller_than_two_segments_never_runs_out_of_space(
    tmp_path: Path,
) -> None:
    """The receiver's state folder on a 100 MiB file system (less than two 64 MiB journal
    segments), a VM writing epochs of 64 MiB (two 32 MiB records and a flush) through a
    live NBD sender, the receiver killed now and then mid-stream. Credit is kept within
    the journal's room, so the journal never meets ENOSPC and the replica catches up.
    It met it several times a run, each a failed session and a torn record: credit was
    granted past the frames read but not yet written, a restart's Welcome granted the
    whole window whatever the room, an epoch whose barrier was read but not yet synced
    counted as nothing to apply (so its credit was not kept within the room at all), and
    the applied records of a segment still active at the last apply held their room
    until the next apply, which the epoch arriving could not complete without it."""
    rng = random.Random(7)
    log = tmp_path / "receiver.log"
    with tmpfs(tmp_path / "small", "100m") as small:
        receiver = start_receiver(tmp_path / "target", log=log, state_dir=small / "state")
        sender = LiveNbdSender(tmp_path, receiver)
        try:
            for i in range(8):
                writer = subprocess.Popen(
                    ["qemu-io", "-f", "raw", "-c", f"write -P {i + 1} 0 64M", "-c", "flush",
                     sender.uri], stdout=subprocess.DEVNULL,
                )  # fmt: skip
                if i % 2:
                    time.sleep(rng.uniform(0.2, 1.2))
                    receiver.proc.kill()
                    receiver.proc.wait(timeout=30)
                    receiver = start_receiver(
                        receiver.dir, receiver.port, log=log, state_dir=small / "state"
                    )
                assert writer.wait(timeout=120) == 0
            wait_for(sender.caught_up, sender.proc, "the replica to catch up", timeout=120)
            assert b3(sender.replica) == b3(sender.source)
        finally:
            rc, err = sender.stop()
            receiver.stop()
    assert rc == 0, err[-3000:]
    failed = [line for line in log.read_text().splitlines() if "No space" in line]
    assert not failed, "\n".join(failed[:5])
