"""Live NBD capture with a small journal and the receiver away: the VM's writes never fail.

The sender's journal is capped at 8 MiB and the receiver is down while qemu-io writes
three times that through the NBD shim. Every write must succeed; the sender tracks the
extents past the cap. When the receiver comes back, the backlog ships, the tracked
extents resync as one epoch, and the replica equals the source (qemu-img compare).
Meanwhile the replica never holds a state past its last consistency point.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from replicator.engine import replica_state
from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    b3,
    free_port,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    sender_job,
    start_receiver,
    wait_for,
)

MiB = 1024 * 1024


def _events(text: str) -> list[str]:
    return [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]


def _nbd_sender(disk: Path, state: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    """A 64 MiB raw ``disk`` served by an NBD sender with an 8 MiB journal, job "ovf"; the
    sender, once its socket is up, and the export's URI."""
    sock = state.parent / "nbd.sock"
    qemu_img("create", "-q", "-f", "raw", str(disk), "64M")
    sender = LoggedPopen(
        [*REPLICATOR, "send", "--to", f"127.0.0.1:{port}", "--job", "ovf", "--state-dir",
         str(state), "--capture", "nbd", "--nbd-socket", str(sock), "--journal-max", "8M",
         "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not sock.exists():
        if sender.poll() is not None or time.monotonic() > deadline:
            sender.kill()
            raise AssertionError(f"no NBD socket: {sender.communicate()[1][-3000:]}")
        time.sleep(0.05)
    return sender, f"nbd+unix:///disk.img?socket={sock}"


@pytest.mark.tools
def test_writes_past_the_journal_cap_succeed_and_resync(tmp_path: Path) -> None:
    disk, state, target = tmp_path / "disk.img", tmp_path / "state", tmp_path / "target"
    port = free_port()
    receiver = start_receiver(target, port)
    sender, uri = _nbd_sender(disk, state, port)
    try:
        qemu_io("raw", uri, "write -P 1 0 1M", "flush")
        replica = target / "ovf" / "disk.img"

        def applied() -> bool:  # that much reaches the replica: its last consistency point
            if not replica.exists():
                return False
            with replica.open("rb") as f:
                if f.read(MiB) != b"\x01" * MiB:
                    return False
            out = replicator("status", "--dir", str(target), "--json")
            jobs = json.loads(out.stdout)["jobs"] if out.returncode == 0 else []
            point = jobs[0]["consistency_point"] if jobs else {}
            return bool(point.get("consistent")) and point.get("lsn", 0) > 0

        # (a fixed 1 s was the first sync as well, on a loaded machine: not always enough)
        wait_for(applied, sender, "the first write to be applied")
        receiver.stop()
        point = replica_state.load(target / ".replicator" / "ovf", "ovf")
        assert point is not None and point.consistent
        # 24 MiB with the receiver away, 8 MiB of journal: must all succeed;
        # the first larger than half the journal: tracked at once, nothing journaled
        writes = ["write -P 2 0 6M", *(f"write -P {i + 3} {i * 2 + 6}M 2M" for i in range(9))]
        qemu_io("raw", uri, *writes, "flush")
        assert replica.read_bytes()[: 2 * MiB] == b"\x01" * MiB + bytes(MiB)  # unchanged
        time.sleep(1.5)
        # acknowledged writes the replica lacks, in no journal: the lag counts them (it
        # read 0.0 s, the metric too: an RPO alert would never have fired)
        job = sender_job(state)
        assert job["state"] == "overflow" and job["lag"]["seconds"] >= 1.5, job
        receiver = start_receiver(target, port)
        deadline = time.monotonic() + 90
        while qemu_compare("raw", disk, replica, shared=True).returncode != 0:
            assert sender.poll() is None, sender.stderr.read() if sender.stderr else ""
            assert time.monotonic() < deadline, "the replica did not catch up"
            time.sleep(0.2)
        assert b3(disk) == b3(replica)
        while (job := sender_job(state))["lag"]["seconds"] >= 1.0:  # and it says so
            assert time.monotonic() < deadline, f"the lag stays after the resync: {job}"
            time.sleep(0.2)
        qemu_io("raw", uri, "write -P 99 40M 64k", "flush")  # and it goes on as usual
        while qemu_compare("raw", disk, replica, shared=True).returncode != 0:
            assert time.monotonic() < deadline, "writes after the resync did not replicate"
            time.sleep(0.2)
    finally:
        if sender.poll() is None:
            sender.send_signal(signal.SIGTERM)
        rc = sender.wait(timeout=60)
        receiver.stop()
    err = sender.stderr.read() if sender.stderr else ""
    assert rc == 0, err[-3000:]
    events = _events(err)
    assert "nbd.journal_overflow" in events and "sender.overflow_resynced" in events


def _is_mounted(mnt: Path) -> bool:
    return any(
        line.split()[1] == str(mnt) for line in Path("/proc/mounts").read_text().splitlines()
    )


def test_a_fuse_folder_keeps_working_past_the_journal_cap(tmp_path: Path) -> None:
    """The same promise through the FUSE filter: writes, renames and removals with a full
    journal succeed; the replica stays at its consistency point, then the folder resyncs."""
    import os

    from tests.killcycles import tree_digest

    source, mnt, state = tmp_path / "vm", tmp_path / "mnt", tmp_path / "state"
    source.mkdir()
    mnt.mkdir()
    (source / "vm.xml").write_text("<domain/>\n")
    (source / "disks").mkdir()
    (source / "disks" / "a.img").write_bytes(os.urandom(2 * MiB))
    port = free_port()
    target = tmp_path / "target"
    receiver = start_receiver(target, port)
    sender = LoggedPopen(
        [*REPLICATOR, "send", "--to", f"127.0.0.1:{port}", "--job", "fovf", "--state-dir",
         str(state), "--capture", "fuse", "--mount", str(mnt), "--journal-max", "4M",
         "--insecure", str(source)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    replica = target / "fovf"
    try:
        deadline = time.monotonic() + 60
        while not _is_mounted(mnt) or tree_digest(replica) != tree_digest(source):
            assert sender.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        receiver.stop()
        before = tree_digest(replica)
        # 12 MiB of writes and a reshuffled folder with a 4 MiB journal, receiver away
        with (mnt / "disks" / "a.img").open("r+b") as f:
            for i in range(24):
                f.seek((i * 331 * 4096) % (2 * MiB))
                f.write(os.urandom(512 * 1024))
        (mnt / "disks" / "b.img").write_bytes(os.urandom(3 * MiB))
        os.rename(mnt / "disks" / "a.img", mnt / "disks" / "c.img")
        (mnt / "snap").mkdir()
        (mnt / "snap" / "s1.xml").write_text("<snapshot/>")
        os.unlink(mnt / "vm.xml")
        (mnt / "vm.xml").write_text("<domain><memory>2</memory></domain>\n")
        assert tree_digest(replica) == before  # nothing applied meanwhile
        receiver = start_receiver(target, port)
        deadline = time.monotonic() + 90
        while tree_digest(replica) != tree_digest(source):
            assert sender.poll() is None, sender.stderr.read() if sender.stderr else ""
            assert time.monotonic() < deadline, "the replica folder did not catch up"
            time.sleep(0.2)
        (mnt / "after.txt").write_text("and it goes on")  # journaled as usual again
        while tree_digest(replica) != tree_digest(source):
            assert time.monotonic() < deadline, "changes after the resync did not replicate"
            time.sleep(0.2)
    finally:
        if sender.poll() is None:
            sender.send_signal(signal.SIGTERM)
        rc = sender.wait(timeout=60)
        if _is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        receiver.stop()
    err = sender.stderr.read() if sender.stderr else ""
    assert rc == 0, err[-3000:]
    events = _events(err)
    assert "fuse.journal_overflow" in events and "sender.overflow_resynced" in events


@pytest.mark.tools
def test_a_planned_failover_during_an_overflow_is_refused_at_once(tmp_path: Path) -> None:
    """Changes past the cap are tracked, not journaled: no final point can hold them until
    they are resynced, so the source refuses a planned failover at once (exit 6, nothing
    promoted) and hands over once it has caught up."""
    disk, state, target = tmp_path / "disk.img", tmp_path / "state", tmp_path / "target"
    port = free_port()
    receiver = start_receiver(target, port)
    sender, uri = _nbd_sender(disk, state, port)
    failover = (*REPLICATOR, "failover", "--dir", str(target), "--job", "ovf", "--planned")
    try:
        rate = (*REPLICATOR, "rate", "--state-dir", str(state))
        subprocess.run([*rate, "0"], check=True, env=ENV, capture_output=True)
        qemu_io("raw", uri, *(f"write -P {i + 2} {i * 2}M 2M" for i in range(12)), "flush")
        asked = time.monotonic()
        out = subprocess.run(
            [*failover, "--timeout", "60"], capture_output=True, text=True, env=ENV, timeout=90
        )
        assert time.monotonic() - asked < 30, "refused only when the timeout ran out"
        assert out.returncode == 6, out.stderr
        assert "the source refused the planned failover" in out.stderr
        assert sender.poll() is None
        subprocess.run([*rate, "unlimited"], check=True, env=ENV, capture_output=True)
        replica = target / "ovf" / "disk.img"
        deadline = time.monotonic() + 90
        while qemu_compare("raw", disk, replica, shared=True).returncode != 0:
            assert sender.poll() is None, sender.stderr.read() if sender.stderr else ""
            assert time.monotonic() < deadline, "the replica did not catch up"
            time.sleep(0.2)
        out = subprocess.run(
            [*failover, "--timeout", "60"], capture_output=True, text=True, env=ENV, timeout=90
        )
        assert out.returncode == 0, out.stderr
        assert sender.wait(timeout=30) == 12  # handed over
        assert b3(disk) == b3(replica)
    finally:
        if sender.poll() is None:
            sender.send_signal(signal.SIGTERM)
            sender.wait(timeout=30)
        receiver.stop()
