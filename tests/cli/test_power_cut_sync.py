"""The receiver's machine loses power during full and differential syncs.

A sync writes the replica straight from the wire (no journal on either side), so what a
power cut leaves depends only on the receiver's fsyncs and the order of its state files.
The receiver's folder is on a faultfs mount that keeps only what an fsync covered when
the power goes, data and names (``tests/faultfs/volatile.py``, ``volatile_names.py``).
After each cut, with the receiver dead and its disk as a reboot would find it, a replica
its state calls a consistency point must be exactly one of the versions of the source
that were sent; then a plain `send --once` brings it level with the source (`qemu-img
compare`), without `--resync`. The same on real file systems (``tests/crashdisk.py``), and
the source machine's power cut during scanned sends, on both.

`make test` runs CYCLES sends each (SOURCE_CYCLES for the source's cuts on faultfs, whose
check that a cut took something back has no more cycles to wait for it), `make test-long`
LONG_CYCLES: the short runs show that the cuts and their checks work, the long ones look
for the rare moment.
"""

from __future__ import annotations

import functools
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from replicator.engine import replica_state
from tests.cli.faults import equal
from tests.crashdisk import CrashDisk, cut_took_back, receiver_disks
from tests.faultfs import FaultFS, powered, rebooted
from tests.killcycles import seeded, wait_written, writeback
from tests.tools import ENV, REPLICATOR, LoggedPopen, b3, qemu_img, start_receiver

MiB = 1 << 20
IMAGE = 48 * MiB
JOB = "pc"
CYCLES = 5
SOURCE_CYCLES = 8
LONG_CYCLES = 50


def _write_random(path: Path, rng: random.Random, regions: int) -> int:
    """Random data over ``regions`` 1-4 MiB stretches of the image, one of them zeroed;
    how many bytes that wrote."""
    written = 0
    with path.open("r+b") as f:
        for i in range(regions):
            length = rng.randrange(1, 5) * MiB
            f.seek(rng.randrange(0, IMAGE - length))
            f.write(bytes(length) if i == 0 else rng.randbytes(length))
            written += length
    return written


def _vm_writes(disk: Path, rng: random.Random) -> None:
    """The VM writes between runs, and half the time flushes them."""
    _write_random(disk, rng, rng.randrange(1, 6))
    if rng.random() < 0.5:
        fd = os.open(disk, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def _cut_during(
    fs: FaultFS, sender: subprocess.Popen[str], after: int, seed: int | None
) -> dict[str, int]:
    """Cut the power once ``after`` more bytes reached the receiver's disk, or as soon as
    the send has ended (then the receiver has said all of it is durable)."""
    start = fs.stats()["bytes_written"] or 0
    deadline = time.monotonic() + 60
    while (fs.stats()["bytes_written"] or 0) - start < after and sender.poll() is None:
        assert time.monotonic() < deadline, "the sync wrote nothing for a minute"
        time.sleep(0.002)
    return fs.power_cut(seed)


def _sender(address: str, state: Path, disk: Path) -> subprocess.Popen[str]:
    return LoggedPopen(
        [*REPLICATOR, "send", "--to", address, "--job", JOB, "--state-dir", str(state),
         "--once", "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip


def _ended(proc: subprocess.Popen[str]) -> bool:
    return proc.poll() is not None


def _synced_level(address: str, state: Path, disk: Path, image: Path, replica: Path) -> None:
    """A plain `send --once` of ``disk`` ends well, and the replica is ``image`` (the
    same file, seen where the power cuts cannot reach)."""
    done = subprocess.run(
        [*REPLICATOR, "send", "--to", address, "--job", JOB, "--state-dir", str(state),
         "--once", "--insecure", str(disk)],
        capture_output=True, text=True, env=ENV, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert equal(image, replica)
    qemu_img("compare", "-q", "-f", "raw", "-F", "raw", str(image), str(replica))


def _receiver_cuts(
    tmp_path: Path, disks: tuple[CrashDisk, CrashDisk] | None = None, cycles: int = CYCLES
) -> tuple[int, int, int]:
    """`send --once` runs, full then differential, each cut by the receiver machine's
    power going mid-send or after it; after each cut a replica its state calls a
    consistency point must be a version that was sent, and a plain send at the end brings
    it level. On faultfs, or with ``disks`` on real file systems (tests/crashdisk.py:
    replicas on one, the receiver's state on the other, their metadata coming back as
    each wrote it, the ctimes the receiver's stamps name included, so a send after a cut
    must not find the replica "changed outside replication"). Returns (cycles, cuts
    mid-send, cuts that took something back: changes undone on faultfs)."""
    rng = seeded("power-cut" if disks is None else "real-power-cut")
    disk, state = tmp_path / "disk.img", tmp_path / "state"
    disk.write_bytes(rng.randbytes(IMAGE))
    log = tmp_path / "receiver.log"
    fs, target, state_dir = receiver_disks(tmp_path, disks)
    receiver = start_receiver(target, log=log, state_dir=state_dir)
    replica = receiver.dir / JOB / "disk.img"
    sent: set[str] = set()  # digests of the source at every send started
    cycle = cut_mid_send = undone = 0
    try:
        # up to 3 times the cycles until what the run is about happened: on faultfs a cut
        # that took something back (on a busy machine the receiver may have synced all it
        # wrote by each cut); on a real disk a cut mid-send (whether it takes anything
        # back is the machine's: the sync's large writes may go past the page cache,
        # engine/write_path.py, and then the disk has them as they are written)
        while cycle < cycles or (not (cut_mid_send if disks else undone) and cycle < 3 * cycles):
            changed = _write_random(disk, rng, rng.randrange(1, 6)) if cycle else IMAGE
            sent.add(b3(disk))
            sender = _sender(receiver.address, state, disk)
            mid_send = rng.random() < 0.67  # else once the send has finished (and said so)
            if fs is not None:
                after = rng.randrange(changed // 20, changed) if mid_send else 1 << 62
                undone += _cut_during(fs, sender, after, writeback(rng))["changes_undone"]
            elif mid_send:  # once the sync writes the replica
                wait_written(replica, functools.partial(_ended, sender))
                time.sleep(rng.uniform(0.0, 0.03))
            else:
                sender.wait(timeout=120)
            receiver.proc.kill()  # on a real disk: the power goes, nothing more reaches it
            receiver.proc.wait(timeout=30)
            rc = sender.wait(timeout=120)  # its machine runs on: it fails, or had finished
            cut_mid_send += rc != 0
            if fs is not None:
                fs = rebooted(fs)
            else:
                assert disks is not None
                undone += cut_took_back(*disks)
            at_rest = replica_state.load(receiver.state_root / JOB, JOB)
            if at_rest is not None and at_rest.consistent and not at_rest.applying:
                assert replica.exists() and b3(replica) in sent, (
                    f"cycle {cycle}: the replica is called a consistency point ({at_rest}) "
                    "but holds no version of the source that was sent"
                )
            receiver = start_receiver(
                receiver.dir, receiver.port, log=log, state_dir=receiver.state_dir
            )
            cycle += 1
        _synced_level(receiver.address, state, disk, disk, replica)
    except BaseException:
        print(log.read_text(errors="replace")[-6000:] if log.exists() else "")
        raise
    finally:
        receiver.stop()
        if fs is not None:
            fs.stop()
    print(f"power cuts: {cut_mid_send} of {cycle} during a send; {undone} took back changes")
    return cycle, cut_mid_send, undone


@pytest.mark.tools
@pytest.mark.timeout(300)
def test_power_cuts_during_full_and_differential_syncs(tmp_path: Path) -> None:
    _, _, undone = _receiver_cuts(tmp_path)
    assert undone > 0


@pytest.mark.long
@pytest.mark.tools
def test_power_cuts_during_50_full_and_differential_syncs(tmp_path: Path) -> None:
    _, _, undone = _receiver_cuts(tmp_path, cycles=LONG_CYCLES)
    assert undone > 0


@pytest.mark.tools
@pytest.mark.timeout(300)
@pytest.mark.parametrize("crash_disks", ["ext4-lazytime", "xfs", "btrfs"], indirect=True)
def test_real_power_cuts_during_syncs(
    tmp_path: Path, crash_disks: tuple[CrashDisk, CrashDisk]
) -> None:
    _, cut_mid_send, _ = _receiver_cuts(tmp_path, crash_disks)
    assert cut_mid_send > 0


@pytest.mark.long
@pytest.mark.tools
@pytest.mark.parametrize("crash_disks", ["ext4-lazytime", "xfs", "btrfs"], indirect=True)
def test_real_power_cuts_during_50_syncs(
    tmp_path: Path, crash_disks: tuple[CrashDisk, CrashDisk]
) -> None:
    _, cut_mid_send, _ = _receiver_cuts(tmp_path, crash_disks, LONG_CYCLES)
    assert cut_mid_send > 0


@pytest.mark.tools
@pytest.mark.timeout(300)
def test_source_power_cuts_during_syncs(tmp_path: Path) -> None:
    """The source machine loses power during `send --once` runs: the image (changed
    between runs, only sometimes fsynced) and the sender's state folder keep what an fsync
    covered. A run after the reboot brings the replica level with the image as it came
    back, whatever the replica got of the writes the image lost."""
    rng = seeded("power-cut")
    real, mnt = tmp_path / "source-disk", tmp_path / "mnt"
    real.mkdir()  # the disk as it is before the machine first starts
    (real / "disk.img").write_bytes(rng.randbytes(IMAGE))
    fs = powered(real, mnt)
    disk, state = mnt / "disk.img", mnt / "state"
    receiver = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    replica = receiver.dir / JOB / "disk.img"
    undone = names = mid_send = 0
    try:
        for cycle in range(SOURCE_CYCLES):
            if cycle:
                _vm_writes(disk, rng)
            sender = _sender(receiver.address, state, disk)
            # somewhere in the scan (it reads the image in 128 KiB requests) and what it
            # ships as it goes, or after the run
            reads = rng.randrange(1, IMAGE // (128 << 10) * 5 // 4)
            deadline = time.monotonic() + 60
            while fs.count("disk.img").get("read", 0) < reads and sender.poll() is None:
                assert time.monotonic() < deadline, "the send read nothing for a minute"
                time.sleep(0.001)
            cut = fs.power_cut(writeback(rng))
            undone, names = undone + cut["changes_undone"], names + cut["names_undone"]
            mid_send += sender.poll() is None
            sender.wait(timeout=30)
            fs = rebooted(fs)
        _synced_level(receiver.address, state, disk, real / "disk.img", replica)
    finally:
        receiver.stop()
        fs.stop()
    print(
        f"source power cuts: {mid_send} of {SOURCE_CYCLES} during a send; {undone} changes and "
        f"{names} names undone"
    )
    assert undone > 0


@pytest.mark.tools
@pytest.mark.timeout(300)
@pytest.mark.parametrize("crash_disks", ["ext4-lazytime", "xfs", "btrfs"], indirect=True)
def test_real_source_power_cuts_during_syncs(
    tmp_path: Path, crash_disks: tuple[CrashDisk, CrashDisk]
) -> None:
    _real_source_cuts(tmp_path, crash_disks, CYCLES)


@pytest.mark.long
@pytest.mark.tools
@pytest.mark.parametrize("crash_disks", ["ext4-lazytime", "xfs", "btrfs"], indirect=True)
def test_real_source_power_cuts_during_50_syncs(
    tmp_path: Path, crash_disks: tuple[CrashDisk, CrashDisk]
) -> None:
    _real_source_cuts(tmp_path, crash_disks, LONG_CYCLES)


def _real_source_cuts(
    tmp_path: Path, crash_disks: tuple[CrashDisk, CrashDisk], cycles: int
) -> None:
    """The source's power cuts on real file systems (tests/crashdisk.py): the image on
    one, the sender's state on the other."""
    rng = seeded("real-source-power-cut")
    images, states = crash_disks
    disk, state = images.mountpoint / "disk.img", states.mountpoint / "state"
    disk.write_bytes(rng.randbytes(IMAGE))
    os.sync()  # the disk as it is before the machine first starts
    receiver = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    replica = receiver.dir / JOB / "disk.img"
    cycle = undone = mid_send = 0
    try:
        # until a cut came mid-send and one took back something (up to 3 times the cycles):
        # half the time the VM flushed its writes, and then only the send's state is at stake
        while cycle < cycles or (not (undone and mid_send) and cycle < 3 * cycles):
            if cycle:
                _vm_writes(disk, rng)
            sender = _sender(receiver.address, state, disk)
            if rng.random() < 0.67:  # somewhere in the scan and what it ships, or after
                time.sleep(rng.uniform(0.0, 0.4))
            else:
                sender.wait(timeout=120)
            mid_send += sender.poll() is None
            sender.kill()  # the power goes: nothing more reaches either disk
            sender.wait(timeout=30)
            undone += cut_took_back(*crash_disks)
            cycle += 1
        _synced_level(receiver.address, state, disk, disk, replica)
    finally:
        receiver.stop()
    print(f"source power cuts: {mid_send} of {cycle} during a send; {undone} took back changes")
    assert undone > 0 and mid_send > 0
