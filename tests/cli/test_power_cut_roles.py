"""A power cut right after a role changed hands: what was answered must survive it.

A witness that granted a promotion, and a target that said it promoted its replicas, have
told someone to act on it: the target starts the VM, the old source must stop. Were the
grant or the promotion lost with the power, the next answer could contradict the first: a
second target granted the same generation, or the old source's records written into the
replicas a VM already runs from. The machine that answered loses its power at once after
the answer, on real ext4 (``tests/crashdisk.py``: what no fsync covered is gone, names and
metadata included), and comes back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

from replicator.engine.errors import ExitCode
from replicator.engine.witness_client import BuiltinWitness
from tests.cli.test_witness import start_witness
from tests.crashdisk import CrashDisk, power_cut
from tests.tools import forced_failover, one_line_error, qemu_io, replicator, start_receiver

MiB = 1 << 20
QUIET = 0.2  # what a promotion asks the source to have been silent for


def _disk(tmp_path: Path) -> CrashDisk:
    disk = CrashDisk(tmp_path / "ext4.img", tmp_path / "ext4")  # not the helpers' disk.img
    disk.make(64 * MiB)
    return disk


def test_a_witness_grant_survives_a_power_cut(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
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


def test_a_failover_survives_a_power_cut(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
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
