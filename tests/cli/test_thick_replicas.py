"""A replica holds the blocks its source holds: thick stays thick, sparse stays sparse.

Bytes alone are not the whole disk: a thick-provisioned (preallocated) disk promises its
guest that a write never meets a full file system, and a replica that is sparse where the
source is allocated breaks that promise after a failover. So zeros the source keeps
allocated travel as ZERO (zeroed in place on the replica) and holes as TRIM (punched):
journal/records.py. Allocation is compared with ``filefrag`` (FIEMAP): SEEK_DATA and
``qemu-img map`` call fallocated (unwritten) ranges holes on ext4.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from tests.tools import (
    LiveNbdSender,
    ReceiverProc,
    allocated,
    b3,
    forced_failover,
    nbdsh,
    one_line_error,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    require_tool,
    send_once,
    start_receiver,
    tmpfs,
)

MiB = 1 << 20


def _same_disk(source: Path, replica: Path) -> None:
    out = qemu_compare("raw", source, replica, shared=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert allocated(replica) == allocated(source)


def _allocation_converges(source: Path, replica: Path, timeout: float = 30) -> None:
    """The replica comes to hold the source's bytes and allocation. Both waited for: a
    write into a range already allocated on both changes no allocation, so the allocation
    alone may match before that write is applied."""
    deadline = time.monotonic() + timeout
    while allocated(replica) != allocated(source) or b3(replica) != b3(source):
        if time.monotonic() > deadline:
            _same_disk(source, replica)  # fails, saying how they differ
        time.sleep(0.1)
    _same_disk(source, replica)


@pytest.mark.parametrize("prealloc", ["full", "falloc"])
def test_a_scan_keeps_a_preallocated_disk_thick_and_its_holes_holes(
    tmp_path: Path, receiver: ReceiverProc, prealloc: str
) -> None:
    """A first sync and a later scan: written zeros (``full``) and fallocated blocks
    (``falloc``, holes to SEEK_DATA) stay allocated on the replica; a range the source
    punched, and one it zeroed in place, follow it. 160 MiB: hashed in helper processes
    (engine/extent_hasher.py), whose runs of zeros come without being read here."""
    disk = tmp_path / "disk.img"
    qemu_img("create", "-q", "-f", "raw", "-o", f"preallocation={prealloc}", str(disk), "160M")
    qemu_io("raw", disk, "write -P 0x5a 1M 2M", "discard 8M 4M")  # data, and a hole
    assert allocated(disk) == [(0, 8 * MiB), (12 * MiB, 160 * MiB)]
    state, replica = tmp_path / "state", receiver.dir / "vm" / disk.name
    send_once(receiver, "vm", state, disk)
    _same_disk(disk, replica)
    assert replica.stat().st_blocks * 512 >= 156 * MiB

    # zeroed in place over data (qemu-io: FALLOC_FL_ZERO_RANGE), data punched, a hole filled
    qemu_io("raw", disk, "write -z 1M 1M", "discard 2M 1M", "write -P 0x33 9M 64k")
    send_once(receiver, "vm", state, disk)
    _same_disk(disk, replica)
    assert allocated(disk) == [(0, 2 * MiB), (3 * MiB, 8 * MiB), (9 * MiB, 9 * MiB + 65536),
                               (12 * MiB, 160 * MiB)]  # fmt: skip


def test_a_sparse_disk_stays_sparse(tmp_path: Path, receiver: ReceiverProc) -> None:
    """The other side of the rule: a thin disk's replica takes no more space than it."""
    disk = tmp_path / "disk.img"
    qemu_img("create", "-q", "-f", "raw", str(disk), "1G")
    qemu_io("raw", disk, "write -P 0x11 0 1M", "write -P 0x22 700M 3M", "write -z 5M 1M")
    send_once(receiver, "vm", tmp_path / "state", disk)
    replica = receiver.dir / "vm" / disk.name
    _same_disk(disk, replica)
    assert replica.stat().st_blocks * 512 <= disk.stat().st_blocks * 512 + 128 * 1024


def test_verify_repair_gives_back_holes_and_allocated_zeros(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """Damage on the target where the source has fallocated zeros and where it has a
    hole: ``verify --repair`` puts back the bytes and the allocation (ZERO, TRIM), not
    written zeros over both."""
    disk = tmp_path / "disk.img"
    qemu_img("create", "-q", "-f", "raw", "-o", "preallocation=falloc", str(disk), "8M")
    qemu_io("raw", disk, "write -P 0x5a 0 2M", "discard 4M 2M")
    state, replica = tmp_path / "state", receiver.dir / "v" / disk.name
    send_once(receiver, "v", state, disk)
    with replica.open("r+b") as f:  # bit rot on the target, in both kinds of zeros
        for at in (3 * MiB + 17, 5 * MiB + 17):
            f.seek(at)
            f.write(b"\xff\x00\xff")
    args = ("--to", receiver.address, "--job", "v", "--state-dir", str(state), "--insecure")
    fixed = replicator("verify", *args, "--repair", str(disk))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    _same_disk(disk, replica)
    assert allocated(replica) == [(0, 4 * MiB), (6 * MiB, 8 * MiB)]


def test_failback_zeroes_in_place_keeping_the_old_sources_blocks(tmp_path: Path) -> None:
    """Extents the promoted VM zeroed (written zeros, a discard) are zeroed on the old
    source without being carried, and keep the blocks they had there: the target's
    manifest does not say what it holds allocated, and a hole punched here would make
    the old source thinner than it was (engine/failback.py)."""
    disk, state, target, replica = forced_failover(tmp_path)  # 8 MiB of data, then holes
    assert allocated(disk) == [(0, 8 * MiB)]
    qemu_io("raw", replica, "write -P 0 1M 1M", "discard 3M 1M")
    rcv = start_receiver(target)
    try:
        out = replicator(
            "failback", "--from", rcv.address, "--job", "vm", "--state-dir", str(state),
            "--json", "--insecure", str(disk),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["bytes_zeroed"] == 2 * MiB
    finally:
        assert rcv.stop() == 0
    assert qemu_compare("raw", disk, replica).returncode == 0
    assert allocated(disk) == [(0, 8 * MiB)]


def test_nbd_zeroes_keep_the_allocation_the_source_keeps(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """Through the NBD shim: WRITE_ZEROES with NO_HOLE (qemu-io ``write -z``, nbdsh's
    ``CMD_FLAG_NO_HOLE``) keeps the range allocated on source and replica; one that may
    trim (``write -z -u``) and a TRIM (``discard``) punch it on both."""
    require_tool("nbdsh")
    live = LiveNbdSender(tmp_path, receiver)
    try:
        live.write("write -P 0x77 0 16M")
        _allocation_converges(live.source, live.replica)
        live.write("write -z 1M 1M", "write -z -u 3M 1M", "discard 5M 1M")
        nbdsh(
            f"h.connect_uri({live.uri!r})\n"
            "h.zero(1 << 20, 7 << 20, flags=nbd.CMD_FLAG_NO_HOLE)\n"
            "h.zero(1 << 20, 9 << 20)\n"  # may trim: punched
            "h.flush()\n"
        )
        # a change of bytes last: once it is on the replica, so is everything before it
        live.write("write -P 0x78 15M 64k")
        _allocation_converges(live.source, live.replica)
        assert allocated(live.source) == [(0, 3 * MiB), (4 * MiB, 5 * MiB), (6 * MiB, 9 * MiB),
                                          (10 * MiB, 16 * MiB)]  # fmt: skip
    except BaseException:
        print(live.stop()[1][-3000:])
        raise
    code, err = live.stop()
    assert code == 0, err


def test_a_thick_disk_the_target_cannot_hold_is_refused_as_disk_full(tmp_path: Path) -> None:
    """The target needs the space the source holds allocated: a 32 MiB thick disk with 2 MiB
    of data does not fit a 16 MiB target, and the sync says so (exit 6, the disk-full
    message naming the replicas' folder) instead of leaving a thin replica behind that a
    failed-over guest would fill. On tmpfs: no ZERO_RANGE, a hole allocated again."""
    disk = tmp_path / "disk.img"
    qemu_img("create", "-q", "-f", "raw", "-o", "preallocation=full", str(disk), "32M")
    qemu_io("raw", disk, "write -P 0x5a 0 2M")
    with tmpfs(tmp_path / "small", "16m") as small:
        rcv = start_receiver(small)
        try:
            out = replicator(
                "send", "--to", rcv.address, "--job", "thick", "--state-dir",
                str(tmp_path / "state"), "--once", "--insecure", str(disk),
            )  # fmt: skip
            assert out.returncode == ExitCode.REFUSED, out.stderr
            line = one_line_error(out.stderr)
            assert re.search(
                rf"disk is full \(\d+ MiB free for {re.escape(str(small / 'thick'))}\);", line
            ), line
            assert rcv.proc.poll() is None  # still serving
        finally:
            assert rcv.stop() == 0
