"""A power cut right after a role changed hands: what was answered must survive it.

A witness that granted a promotion, and a target that said it promoted its replicas, have
told someone to act on it: the target starts the VM, the old source must stop. Were the
grant or the promotion lost with the power, the next answer could contradict the first: a
second target granted the same generation, or the old source's records written into the
replicas a VM already runs from. The machine that answered loses its power at once after
the answer, on real ext4, XFS and btrfs (``tests/crashdisk.py``: what no fsync covered is
gone, names and metadata included), and comes back. And a failback (the old source's
image brought to the promoted replica's state), cut in its middle and at once after it
said done.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from replicator.engine.witness_client import BuiltinWitness
from replicator.transport.wan import LinkProfile
from tests.cli.test_network_faults import ProxyThread
from tests.cli.test_witness import start_witness
from tests.crashdisk import CrashDisk, power_cut
from tests.tools import (
    ENV,
    REPLICATOR,
    b3,
    forced_failover,
    one_line_error,
    qemu_io,
    replicator,
    send_once,
    start_receiver,
)

MiB = 1 << 20
PROMOTED = 40 * MiB  # what the promoted VM wrote at 8 MiB, for the failback to move
SLOW = LinkProfile(rate=8 * MiB)  # the first failback's link: seconds, not a race to win
QUIET = 0.2  # what a promotion asks the source to have been silent for


def _disk(tmp_path: Path, fstype: str) -> CrashDisk:
    disk = CrashDisk(tmp_path / "fs.img", tmp_path / "fs", fstype=fstype)  # not disk.img
    disk.make(64 * MiB)
    return disk


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_a_witness_grant_survives_a_power_cut(tmp_path: Path, fstype: str) -> None:
    disk = _disk(tmp_path, fstype)
    procs: list[subprocess.Popen[str]] = []
    try:
        witness, address = start_witness(disk.mountpoint / "witness")
        procs.append(witness)
        host, port = address.rsplit(":", 1)

        def ask(who: str) -> tuple[bool, str]:
            client = BuiltinWitness(host, int(port), who=who, tls=None)
            decision = asyncio.run(client.may_promote("vm1", 1, QUIET))
            return decision.granted, decision.reason

        source = BuiltinWitness(host, int(port), who="source", tls=None)
        assert asyncio.run(source.renew("vm1", 1)).ok
        time.sleep(QUIET + 0.1)
        assert ask("target-a") == (True, "")
        witness.kill()  # the power goes as the answer leaves
        witness.wait(timeout=10)
        power_cut(disk)
        back, _ = start_witness(disk.mountpoint / "witness", int(port))
        procs.append(back)
        time.sleep(QUIET + 0.1)  # it counts the source's silence from its own start
        granted, reason = ask("target-b")
        assert not granted and "granted to 'target-a'" in reason, reason
        renewal = asyncio.run(source.renew("vm1", 1))
        assert not renewal.ok and renewal.promoted_to == 2
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
        disk.unmount()


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_a_failover_survives_a_power_cut(tmp_path: Path, fstype: str) -> None:
    disk = _disk(tmp_path, fstype)
    try:
        source, state, target, _ = forced_failover(
            tmp_path, size="16M", target=disk.mountpoint / "target"
        )
        power_cut(disk)  # at once after the answer: the VM is starting on the target
        qemu_io("raw", source, "write -P 0x22 1M 1M")  # the old source comes back
        receiver = start_receiver(target)
        try:
            stale = replicator(
                "send", "--to", receiver.address, "--job", "vm", "--state-dir", str(state),
                "--once", "--insecure", str(source),
            )  # fmt: skip
            assert stale.returncode == ExitCode.SPLIT_BRAIN, stale.stderr
            assert "generation 2" in one_line_error(stale.stderr)
        finally:
            assert receiver.stop() == 0
        again = replicator("failover", "--dir", str(target), "--job", "vm", "--force", "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["already_promoted"] is True
    finally:
        disk.unmount()


def _failback(address: str, state: Path, source: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*REPLICATOR, "failback", "--from", address, "--job", "vm", "--state-dir", str(state),
         "--json", "--insecure", str(source)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip


@pytest.mark.parametrize("crash_disks", ["ext4-lazytime", "xfs", "btrfs"], indirect=True)
def test_a_failback_survives_power_cuts_of_the_old_source(
    tmp_path: Path, crash_disks: tuple[CrashDisk, CrashDisk]
) -> None:
    """The old source's machine (its image on one file system, the sender's state on the
    other) loses power in the middle of a failback, and again at once after a failback said
    it was done. The first cut leaves the image half restored, which the failback's own
    record says: run again, it finishes. After the second, the image must be the promoted
    replica, as the failback's answer (and the sender's manifests) said: the next `send`
    starts from a local basis, so an image short of the restored bytes would stay short."""
    images, states = crash_disks
    source, state, target, replica = forced_failover(
        images.mountpoint, state=states.mountpoint / "state", target=tmp_path / "target"
    )
    promoted = random.Random(13).randbytes(PROMOTED)  # incompressible: the slow link shows
    with replica.open("r+b") as f:  # the promoted VM's writes: much to move
        f.seek(8 * MiB)
        f.write(promoted)
    qemu_io("raw", source, "write -P 0x44 60M 2M")  # the old source's, never shipped
    os.sync()  # all of the above on disk: only the failback is at stake
    receiver = start_receiver(target)
    proxy = ProxyThread(("127.0.0.1", int(receiver.address.rsplit(":", 1)[1])))
    try:
        proxy.call(lambda: setattr(proxy.wan, "profile", SLOW))  # ~5 s for the whole restore
        first = _failback(f"127.0.0.1:{proxy.address[1]}", state, source)
        deadline = time.monotonic() + 30
        while not _restored_some(source, promoted):  # mid-failback: the first restored bytes
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the failback restored nothing in 30 s"
            time.sleep(0.002)
        first.kill()  # the power goes
        first.wait(timeout=30)
        assert not _restored_all(source, promoted), "the failback was not cut in its middle"
        power_cut(images, states)
        refused = replicator(
            "send", "--to", receiver.address, "--job", "vm", "--state-dir", str(state),
            "--once", "--insecure", str(source),
        )  # fmt: skip
        assert refused.returncode == ExitCode.SPLIT_BRAIN, refused.stderr
        second = _failback(receiver.address, state, source)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err[-3000:]
        assert json.loads(out)["resumed"] is True
        power_cut(images, states)  # at once after the answer
        assert b3(source) == b3(replica), "the failback said done; the image is not the replica"
        qemu_io("raw", source, "write -P 0x55 1M 64k")  # the VM runs here again
        resumed = send_once(receiver, "vm", state, source)
        assert resumed["basis"] == "local"
        assert b3(source) == b3(replica)
    finally:
        proxy.close()
        receiver.stop()


def _probes(source: Path, promoted: bytes) -> list[bool]:
    """For 4 KiB at each MiB of the promoted VM's writes: whether ``source`` holds it.
    Cheap (a few dozen preads), so the poll sees the first restored extent at once."""
    fd = os.open(source, os.O_RDONLY)
    try:
        return [
            os.pread(fd, 4096, 8 * MiB + at) == promoted[at : at + 4096]
            for at in range(0, len(promoted), MiB)
        ]
    finally:
        os.close(fd)


def _restored_some(source: Path, promoted: bytes) -> bool:
    return any(_probes(source, promoted))


def _restored_all(source: Path, promoted: bytes) -> bool:
    return all(_probes(source, promoted))
