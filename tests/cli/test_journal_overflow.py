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
    b3,
    free_port,
    qemu_compare,
    qemu_img,
    qemu_io,
    start_receiver,
)

MiB = 1024 * 1024


def _events(text: str) -> list[str]:
    return [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]


@pytest.mark.tools
def test_writes_past_the_journal_cap_succeed_and_resync(tmp_path: Path) -> None:
    disk, sock, state = tmp_path / "disk.img", tmp_path / "nbd.sock", tmp_path / "state"
    qemu_img("create", "-q", "-f", "raw", str(disk), "64M")
    port = free_port()
    target = tmp_path / "target"
    receiver = start_receiver(target, port)
    sender = subprocess.Popen(
        [*REPLICATOR, "send", "--to", f"127.0.0.1:{port}", "--job", "ovf", "--state-dir",
         str(state), "--capture", "nbd", "--nbd-socket", str(sock), "--journal-max", "8M",
         "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert sender.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        uri = f"nbd+unix:///disk.img?socket={sock}"
        qemu_io("raw", uri, "write -P 1 0 1M", "flush")
        time.sleep(1)  # that much reaches the replica: its last consistency point
        receiver.stop()
        point = replica_state.load(target / ".replicator" / "ovf", "ovf")
        assert point is not None and point.consistent
        # 24 MiB with the receiver away, 8 MiB of journal: must all succeed
        qemu_io("raw", uri, *(f"write -P {i + 2} {i * 2}M 2M" for i in range(12)), "flush")
        replica = target / "ovf" / "disk.img"
        assert replica.read_bytes()[: 2 * MiB] == b"\x01" * MiB + bytes(MiB)  # unchanged
        receiver = start_receiver(target, port)
        deadline = time.monotonic() + 90
        while qemu_compare("raw", disk, replica, shared=True).returncode != 0:
            assert sender.poll() is None, sender.stderr.read() if sender.stderr else ""
            assert time.monotonic() < deadline, "the replica did not catch up"
            time.sleep(0.2)
        assert b3(disk) == b3(replica)
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
