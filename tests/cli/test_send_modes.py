"""Continuous scan mode, hooks, and interruption, as an operator runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from replicator.engine.errors import ExitCode
from tests.tools import ENV, REPLICATOR, LoggedPopen, ReceiverProc, b3, send_once


def _wait_same(source: Path, replica: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (replica.exists() and b3(replica) == b3(source)):
        assert time.monotonic() < deadline, f"{replica} did not converge"
        time.sleep(0.1)


def test_continuous_mode_follows_changes_and_stops_cleanly(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * 1024 * 1024))
    proc = LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "cont", "--state-dir",
         str(tmp_path / "state"), "--interval", "0.3", "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        replica = receiver.dir / "cont" / "disk.img"
        _wait_same(disk, replica)
        with disk.open("r+b") as f:
            f.seek(1024 * 1024)
            f.write(os.urandom(65536))
        _wait_same(disk, replica)  # the next cycle picked the change up
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0, proc.stderr.read() if proc.stderr else rc


def test_hooks_run_around_the_scan(tmp_path: Path, receiver: ReceiverProc) -> None:
    """In order, once each (their failures: tests/cli/test_quiesce_hooks.py)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x05" * 65536)
    log = tmp_path / "hooks.log"
    hooks = ("--pre-hook", f"echo freeze >> {log}", "--post-hook", f"echo thaw >> {log}")
    send_once(receiver, "hooked", tmp_path / "state", disk, extra=hooks)
    assert log.read_text().split() == ["freeze", "thaw"]


def test_sigint_mid_sync_exits_130_and_the_next_run_resumes(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk = tmp_path / "disk.img"
    block = os.urandom(1024 * 1024)
    with disk.open("wb") as f:
        for i in range(160):
            f.write(block[i:] + block[:i])
    state = tmp_path / "state"
    proc = LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "intr", "--state-dir",
         str(state), "--once", "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    time.sleep(0.6)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    if rc != 0:  # (a fast machine may finish first; then there is nothing to interrupt)
        assert rc == ExitCode.INTERRUPTED, proc.stderr.read() if proc.stderr else rc
        assert "interrupted" in (proc.stderr.read() if proc.stderr else "")
    send_once(receiver, "intr", state, disk)
    assert b3(receiver.dir / "intr" / "disk.img") == b3(disk)
