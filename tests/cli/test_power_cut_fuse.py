"""The source machine loses power under FUSE capture: what the VM fsynced is still there.

The VM's folder and the sender's state folder are on a faultfs mount that keeps only what
an fsync covered when the power goes (file data: ``tests/faultfs/volatile.py``; names:
``volatile_names.py``), or on two real file systems (ext4, XFS, btrfs:
``tests/crashdisk.py``). Through the capture mount a writer puts tagged blocks into a disk
image, fsyncs it now and then, and now and then makes a new file, fsyncs it and its
folder. After each cut (the sender killed with the machine, the dead capture mount
detached) the folder must hold every block write an fsync covered and every new file
whose folder was fsynced (FUSE.md: an fsync through the mount answers once the journal
and the real file are durable); the sender then starts again on what is left, and at the
end the replica folder is the source folder.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.crashdisk import CrashDisk, cut_took_back
from tests.faultfs import FaultFS, powered, rebooted
from tests.killcycles import (
    BLOCK,
    block_tags,
    digest_or_none,
    flushed_writes_kept,
    seeded,
    tagged,
    tree_digest,
    writeback,
)
from tests.tools import ENV, REPLICATOR, start_receiver

JOB = "pf"
BLOCKS = 256  # a 1 MiB disk image
CYCLES = 5


class _Writer:
    """Tagged block writes through the capture mount, an fsync after one in ten; a new
    file, fsynced with its folder, after one in fifty. Stops at the first error (the
    power went); what it was told was durable is in ``flushed`` and ``files``."""

    def __init__(self, capture: Path, seed: int) -> None:
        self.capture = capture
        self.rng = random.Random(seed)
        self.index = 0
        self.log: list[tuple[int, int]] = []  # (write number, block), completed
        self.flushed = 0
        self.files: dict[str, bytes] = {}  # made durable with their folder's fsync
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)
        assert not self._thread.is_alive(), "the writer hangs on the dead mount"

    def _loop(self) -> None:
        try:
            fd = os.open(self.capture / "disk.img", os.O_RDWR)
        except OSError:
            return
        try:
            while not self._stop.is_set():
                self.index += 1
                block = self.rng.randrange(BLOCKS)
                os.pwrite(fd, tagged(self.index), block * BLOCK)
                self.log.append((self.index, block))
                if self.rng.random() < 0.1:
                    os.fsync(fd)
                    self.flushed = self.index
                if self.rng.random() < 0.02:
                    self._new_file()
                time.sleep(0.001)
        except OSError:
            pass  # the power went: nothing more is promised
        finally:
            with contextlib.suppress(OSError):  # the mount may be dead by now
                os.close(fd)

    def _new_file(self) -> None:
        name = f"new-{self.index}"
        data = self.rng.randbytes(self.rng.randrange(1, 20_000))
        fd = os.open(self.capture / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        folder = os.open(self.capture, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        self.files[name] = data


def _mounted(path: Path) -> bool:
    return any(
        line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines()
    )


def _start_sender(
    receiver_address: str, state: Path, capture: Path, vm: Path, log: Path
) -> subprocess.Popen[str]:
    with log.open("a") as err:
        proc = subprocess.Popen(
            [*REPLICATOR, "send", "--to", receiver_address, "--job", JOB, "--state-dir",
             str(state), "--capture", "fuse", "--mount", str(capture), "--insecure", str(vm)],
            stdout=subprocess.DEVNULL, stderr=err, text=True, env=ENV,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            if _mounted(capture) and (capture / "disk.img").exists():
                return proc
        except OSError:
            pass  # the last run's dead mount, until the sender has detached it
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "the FUSE capture did not come up"
        time.sleep(0.02)


def _fuse_power_cycles(
    tmp_path: Path, disks: tuple[CrashDisk, CrashDisk] | None = None
) -> tuple[int, int, int]:
    """Power cuts under FUSE capture; with ``disks``, on real file systems (the VM's
    folder on one, the sender's state on the other) instead of faultfs. How many cuts
    took back changes (faultfs: how many changes), how many covered fsynced writes, and
    how many files were made durable with their folder."""
    rng = seeded("power-cut")
    capture = tmp_path / "capture"
    capture.mkdir()
    log = tmp_path / "sender.log"
    fs: FaultFS | None = None
    if disks is None:
        real, disk_mnt = tmp_path / "source-disk", tmp_path / "disk"
        (real / "vm").mkdir(parents=True)  # the disk as it is before the machine first starts
        fs = powered(real, disk_mnt)
        vm, state, kept = disk_mnt / "vm", disk_mnt / "state", real / "vm"
    else:
        vm, state = disks[0].mountpoint / "vm", disks[1].mountpoint / "state"
        vm.mkdir()
        kept = vm
    (kept / "disk.img").write_bytes(bytes(BLOCKS * BLOCK))
    (kept / "vm.xml").write_text("<domain/>\n")
    if disks is not None:
        os.sync()  # the machine's first start finds them on its disk
    receiver = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    sender = _start_sender(receiver.address, state, capture, vm, log)
    writer = _Writer(capture, rng.randrange(1 << 32))
    durable, checked = [0] * BLOCKS, 0
    undone = flushes = 0
    try:
        for _ in range(CYCLES):
            writer.start()
            time.sleep(rng.uniform(0.3, 1.0))
            if fs is not None:
                cut = fs.power_cut(writeback(rng))
                undone += cut["changes_undone"] + cut["names_undone"]
            sender.kill()  # with a real disk: the power goes, nothing more reaches it
            sender.wait(timeout=30)
            subprocess.run(["umount", "-l", str(capture)], check=False, capture_output=True)
            writer.join()
            if fs is not None:
                fs.stop()
            else:
                assert disks is not None
                undone += cut_took_back(*disks)
            tags = block_tags(kept / "disk.img", BLOCKS)
            lost = flushed_writes_kept(tags, durable, writer.log[checked:], writer.flushed)
            assert not lost, f"after a power cut: {lost}"
            flushes += bool(writer.log[checked:]) and writer.flushed >= writer.log[checked][0]
            for name, data in writer.files.items():
                path = kept / name
                assert path.exists(), f"{name} was fsynced with its folder, and is gone"
                assert path.read_bytes() == data, f"{name} lost data it had fsynced"
            durable, checked = tags or durable, len(writer.log)
            if fs is not None:
                fs = rebooted(fs)  # the machine is back, with what its disk kept
            sender = _start_sender(receiver.address, state, capture, vm, log)
        deadline = time.monotonic() + 90
        while digest_or_none(receiver.dir / JOB) != tree_digest(kept):
            assert sender.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the replica folder did not catch up"
            time.sleep(0.1)
    except BaseException:
        print(log.read_text(errors="replace")[-5000:] if log.exists() else "")
        raise
    finally:
        if sender.poll() is None:
            sender.terminate()
            sender.wait(timeout=60)
        if _mounted(capture):
            subprocess.run(["umount", "-l", str(capture)], check=False)
        receiver.stop()
        if fs is not None:
            fs.stop()
    print(f"{CYCLES} power cuts: {undone} took back changes, {flushes} with fsynced writes")
    return undone, flushes, len(writer.files)


@pytest.mark.tools
@pytest.mark.timeout(300)
def test_fsynced_writes_survive_power_cuts_under_fuse_capture(tmp_path: Path) -> None:
    undone, flushes, files = _fuse_power_cycles(tmp_path)
    assert undone > 0 and flushes > 0 and files


@pytest.mark.tools
@pytest.mark.timeout(300)
@pytest.mark.parametrize("crash_disks", ["ext4-lazytime", "xfs", "btrfs"], indirect=True)
def test_fsynced_writes_survive_real_power_cuts_under_fuse_capture(
    tmp_path: Path, crash_disks: tuple[CrashDisk, CrashDisk]
) -> None:
    undone, flushes, files = _fuse_power_cycles(tmp_path, crash_disks)
    assert undone > 0 and flushes > 0 and files
