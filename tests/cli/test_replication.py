"""`replicator send` / `receive` / `verify` as a user runs them, on disks made by qemu-img."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    ReceiverProc,
    b3,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    send_once,
    status_json,
)

MiB = 1024 * 1024
FORMATS = {"vpc": "disk0.vhd", "vhdx": "disk0.vhdx", "qcow2": "disk0.qcow2", "raw": "disk0.img"}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_disk_replicates_then_only_changes_move(
    tmp_path: Path, receiver: ReceiverProc, fmt: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    disk = src / FORMATS[fmt]
    qemu_img("create", "-q", "-f", fmt, str(disk), "256M")
    qemu_io(fmt, disk, "write -P 0x5a 0 8M", "write -P 0xa5 100M 4M", "write -z 120M 1M")
    state = tmp_path / "state"

    first = send_once(receiver, "vm1", state, disk)
    replica = receiver.dir / "vm1" / disk.name
    assert qemu_compare(fmt, disk, replica).returncode == 0
    assert b3(disk) == b3(replica)
    assert first["bytes_changed"] >= 12 * 1024 * 1024

    qemu_io(fmt, disk, "write -P 0x11 64M 64k", "write -P 0x22 200M 128k")
    second = send_once(receiver, "vm1", state, disk)
    assert b3(disk) == b3(replica)
    assert qemu_compare(fmt, disk, replica).returncode == 0
    assert 192 * 1024 <= second["bytes_changed"] <= 2 * 1024 * 1024  # changes + image metadata
    assert second["basis"] == "local"

    check = replicator(
        "verify", "--to", receiver.address, "--job", "vm1", "--state-dir", str(state),
        "--insecure", str(disk),
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "identical" in check.stdout


def test_vm_with_two_disks_and_its_xml(tmp_path: Path, receiver: ReceiverProc) -> None:
    src = tmp_path / "vm"
    src.mkdir()
    d0, d1, xml = src / "os.qcow2", src / "data.vhd", src / "vm.xml"
    qemu_img("create", "-q", "-f", "qcow2", str(d0), "64M")
    qemu_img("create", "-q", "-f", "vpc", str(d1), "64M")
    qemu_io("qcow2", d0, "write -P 1 0 2M")
    qemu_io("vpc", d1, "write -P 2 1M 2M")
    xml.write_text("<domain><name>vm</name><memory>1024</memory></domain>\n")
    state = tmp_path / "state"
    send_once(receiver, "vm", state, d0, d1, xml)
    xml.write_text("<domain><name>vm</name><memory>2048</memory></domain>\n")
    summary = send_once(receiver, "vm", state, d0, d1, xml)
    assert summary["files_changed"] == 1
    target = receiver.dir / "vm"
    assert (target / "vm.xml").read_text() == xml.read_text()
    assert qemu_compare("qcow2", d0, target / "os.qcow2").returncode == 0
    assert qemu_compare("vpc", d1, target / "data.vhd").returncode == 0


def test_two_jobs_into_one_receiver_at_once(tmp_path: Path, receiver: ReceiverProc) -> None:
    disks = []
    for job in ("alpha", "beta"):
        disk = tmp_path / job / "disk.img"
        disk.parent.mkdir()
        with disk.open("wb") as f:
            f.write(os.urandom(24 * 1024 * 1024))
        disks.append((job, disk))
    results: dict[str, Any] = {}

    def run(job: str, disk: Path) -> None:
        results[job] = send_once(receiver, job, disk.parent / "state", disk)

    threads = [threading.Thread(target=run, args=jd) for jd in disks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == {"alpha", "beta"}
    for job, disk in disks:
        assert b3(receiver.dir / job / "disk.img") == b3(disk)


def test_resize_and_sparse_replica(tmp_path: Path, receiver: ReceiverProc) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(512 * 1024 * 1024)
        f.seek(300 * 1024 * 1024)
        f.write(b"\x42" * 65536)
    state = tmp_path / "state"
    send_once(receiver, "sparse", state, disk)
    replica = receiver.dir / "sparse" / "disk.img"
    assert replica.stat().st_size == disk.stat().st_size
    assert replica.stat().st_blocks * 512 < 16 * 1024 * 1024  # holes stayed holes
    qemu_img("resize", "-q", "-f", "raw", str(disk), "600M")
    with disk.open("r+b") as f:
        f.seek(590 * 1024 * 1024)
        f.write(b"\x43" * 4096)
    send_once(receiver, "sparse", state, disk)
    assert replica.stat().st_size == 600 * 1024 * 1024
    assert b3(replica) == b3(disk)
    with disk.open("r+b") as f:
        f.truncate(100 * 1024 * 1024)
    send_once(receiver, "sparse", state, disk)
    assert replica.stat().st_size == 100 * 1024 * 1024


def test_seeded_replica_gets_a_differential_sync(tmp_path: Path, receiver: ReceiverProc) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(32 * 1024 * 1024))
    seed = receiver.dir / "seeded" / "disk.img"
    seed.parent.mkdir(parents=True)
    seed.write_bytes(disk.read_bytes())  # seeded offline, e.g. from a backup
    with disk.open("r+b") as f:
        f.seek(5 * 1024 * 1024)
        f.write(os.urandom(65536))
    summary = send_once(receiver, "seeded", tmp_path / "state", disk)
    assert summary["basis"] == "remote"
    assert summary["bytes_changed"] == 65536
    assert b3(seed) == b3(disk)


def test_verify_finds_and_repairs_damage(tmp_path: Path, receiver: ReceiverProc) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(8 * 1024 * 1024))
    state = tmp_path / "state"
    send_once(receiver, "v", state, disk)
    replica = receiver.dir / "v" / "disk.img"
    with replica.open("r+b") as f:  # bit rot on the target
        f.seek(3 * 1024 * 1024 + 17)
        f.write(b"\xff\x00\xff")
    args = ("--to", receiver.address, "--job", "v", "--state-dir", str(state), "--insecure")
    bad = replicator("verify", *args, "--json", str(disk))
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert report["identical"] is False
    assert report["volumes"][0]["extents"] == [[3 * 1024 * 1024, 65536]]
    fixed = replicator("verify", *args, "--repair", str(disk))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert b3(replica) == b3(disk)


def test_verify_repair_makes_a_removed_replica_anew_with_the_sources_mode(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A replica removed on the target comes back from `verify --repair` as a send makes
    it: a disk with the source's mode (the receiver makes new files 0600, and the next
    send does not chmod what its manifests say it already did), a configuration file
    whole with its mode."""
    disk, xml = tmp_path / "disk.img", tmp_path / "vm.xml"
    disk.write_bytes(os.urandom(2 * 1024 * 1024))
    xml.write_text("<domain><name>vm</name></domain>\n")
    disk.chmod(0o640)
    xml.chmod(0o604)
    state = tmp_path / "state"
    send_once(receiver, "gone", state, disk, xml)
    replicas = receiver.dir / "gone"
    for name in (disk.name, xml.name):
        (replicas / name).unlink()
    args = ("--to", receiver.address, "--job", "gone", "--state-dir", str(state), "--insecure")
    fixed = replicator("verify", *args, "--repair", str(disk), str(xml))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    for source in (disk, xml):
        replica = replicas / source.name
        assert b3(replica) == b3(source)
        assert stat.S_IMODE(replica.stat().st_mode) == stat.S_IMODE(source.stat().st_mode)
    assert send_once(receiver, "gone", state, disk, xml)["records"] == 1  # the epoch alone
    assert stat.S_IMODE((replicas / disk.name).stat().st_mode) == 0o640


def test_a_volume_given_again_after_a_cycle_without_it_comes_out_equal(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A volume left out of a cycle is no longer in the sender's manifests, while its
    replica stays on the target. Given again, it is new to the sender, whose basis says
    zeros where the new image has holes: the old replica's data there stayed, and the
    epoch was reported durable with the replica differing."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for disk in (a, b):
        qemu_img("create", "-q", "-f", "raw", str(disk), "1M")
    qemu_io("raw", b, "write -P 0x61 0 64k", "write -P 0x62 512k 64k")
    state = tmp_path / "state"
    send_once(receiver, "again", state, a, b)
    send_once(receiver, "again", state, a)  # b left out for a cycle
    b.unlink()  # made anew: holes where the old one had data
    qemu_img("create", "-q", "-f", "raw", str(b), "1M")
    qemu_io("raw", b, "write -P 0x63 256k 64k")
    send_once(receiver, "again", state, a, b)
    replica = receiver.dir / "again" / b.name
    assert qemu_compare("raw", b, replica).returncode == 0
    assert b3(replica) == b3(b)
    args = ("--to", receiver.address, "--job", "again", "--state-dir", str(state), "--insecure")
    assert replicator("verify", *args, str(a), str(b)).returncode == 0


def test_a_volume_given_again_survives_its_sender_killed_after_the_emptying_went(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """The volume's RESIZE 0 has reached the receiver, its data is on the way (a slow
    link), the sender is killed: nothing is reported durable, the replica keeps its last
    consistency point untouched, and the next run brings it equal."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    qemu_img("create", "-q", "-f", "raw", str(a), "1M")
    b.write_bytes(os.urandom(4 * MiB))
    state = tmp_path / "state"
    send_once(receiver, "cut", state, a, b)
    send_once(receiver, "cut", state, a)  # b left out for a cycle
    replica = receiver.dir / "cut" / b.name
    before, point = b3(replica), _point(receiver, "cut")
    b.unlink()  # made anew: a hole where the old one had its data, then 12 MiB of data
    with b.open("wb") as f:
        f.truncate(4 * MiB)
        f.seek(4 * MiB)
        f.write(os.urandom(12 * MiB))
    slow = LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "cut", "--state-dir",
         str(state), "--once", "--insecure", "--rate", "1MB/s", "--burst", "64K", str(a), str(b)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while _received(receiver, "cut") <= point["lsn"]:  # the epoch's first records
            assert slow.poll() is None, slow.stderr.read() if slow.stderr else ""
            assert time.monotonic() < deadline, "nothing of the new cycle was received"
            time.sleep(0.05)
    finally:
        slow.kill()
        slow.wait(timeout=30)
    assert _point(receiver, "cut") == point  # no new consistency point
    assert b3(replica) == before  # and nothing of the cut epoch applied
    summary = send_once(receiver, "cut", state, a, b)
    assert summary["lsn"] > point["lsn"]
    assert b3(replica) == b3(b)
    assert qemu_compare("raw", b, replica).returncode == 0


def _received(receiver: ReceiverProc, job: str) -> int:
    (found,) = [j for j in status_json(directory=receiver.dir)["jobs"] if j["job"] == job]
    received: int = found["lsn"]["received"]
    return received


def _point(receiver: ReceiverProc, job: str) -> dict[str, Any]:
    (found,) = [j for j in status_json(directory=receiver.dir)["jobs"] if j["job"] == job]
    point: dict[str, Any] = found["consistency_point"]
    return point


def test_verify_repair_of_an_identical_replica_leaves_it_a_consistency_point(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A repairing session raises the receiver's point floor (it compares), so it ends
    with an epoch even when nothing differed; else the replica stayed "not consistent"
    (and failover refused it) until the next send."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * 1024 * 1024))
    state = tmp_path / "state"
    send_once(receiver, "same", state, disk)
    before = _point(receiver, "same")
    args = ("--to", receiver.address, "--job", "same", "--state-dir", str(state), "--insecure")
    fixed = replicator("verify", *args, "--repair", str(disk))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    after = _point(receiver, "same")
    assert after["consistent"] is True and after["floor_lsn"] is None
    assert after["lsn"] > before["lsn"]
    assert send_once(receiver, "same", state, disk)["basis"] == "local"


def test_a_large_disk_is_hashed_in_helper_processes(tmp_path: Path, receiver: ReceiverProc) -> None:
    """Past engine/read_plan.HELPER_MIN_SIZE a scan with a basis hashes the image in
    helper processes, started before the command's imports (engine/early_hashing.py) and
    taken by the scan; the replica still ends up equal, changes only moved."""
    disk = tmp_path / "big.img"
    with disk.open("wb") as f:  # allocated throughout, so every extent is hashed
        for _ in range(160):
            f.write(os.urandom(1024 * 1024))
    state = tmp_path / "state"
    send_once(receiver, "big", state, disk)
    qemu_io("raw", disk, "write -P 0x33 5M 64k", "write -z 90M 1M", "write -P 0x44 159M 4k")
    out = replicator(
        "-v", "--log-format", "json", "send", "--to", receiver.address, "--job", "big",
        "--state-dir", str(state), "--once", "--json", "--insecure", str(disk),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    events = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    hashing = [e for e in events if e["event"] == "scan.hashing_in_helpers"]
    assert [e["early"] for e in hashing] == [True], out.stderr[-3000:]
    assert not any(e["event"].startswith("scan.helper") and e["event"] != "scan.hashing_in_helpers"
                   for e in events)  # fmt: skip
    second = json.loads(out.stdout)
    assert 64 * 1024 + 4096 <= second["bytes_changed"] <= 2 * 1024 * 1024
    replica = receiver.dir / "big" / disk.name
    assert qemu_compare("raw", disk, replica).returncode == 0
    assert b3(disk) == b3(replica)
