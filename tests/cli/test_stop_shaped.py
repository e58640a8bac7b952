"""Stopping a shaped sender (SIGTERM) is prompt: at a low rate it does not finish its
cycle first, and paused at rate 0 (a schedule at 0, or `replicator rate ... 0`) it does
not hang on a Goodbye queued behind a held bulk frame. What the receiver acknowledged
stays acknowledged; the rest stays in the journal, and the next run ships it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.tools import ENV, REPLICATOR, LoggedPopen, b3, replicator, send_once, start_receiver

pytestmark = pytest.mark.serial  # measures how long a stop takes

MiB = 1024 * 1024
STOP_WITHIN = 5.0  # seconds from SIGTERM to exit


def _job(state: Path) -> dict[str, Any] | None:
    """The running sender's own status of its job; None until it answers (a sender that
    holds its state folder but has not opened its control socket yet is shown from its
    files, without traffic: CI once read that and found no "bytes")."""
    out = replicator("status", "--state-dir", str(state), "--json")
    if out.returncode != 0 or "not running" in out.stdout:
        return None
    status = json.loads(out.stdout)
    jobs = status["jobs"]
    return dict(jobs[0]) if jobs and status.get("source") == "process" else None


def _wait(sender: subprocess.Popen[str], state: Path, ready: str) -> dict[str, Any]:
    """The sender's status once ``ready`` holds: "wire" (bytes shipped) or "journaled"."""
    deadline = time.monotonic() + 30
    while True:
        job = _job(state)
        if job is not None:
            moved = job["bytes"]["wire"] if ready == "wire" else job["lsn"]["journaled"]
            if moved:
                return job
        assert time.monotonic() < deadline and sender.poll() is None, "sender did not start"
        time.sleep(0.2)


def _stop(sender: subprocess.Popen[str]) -> tuple[int, float, str]:
    started = time.monotonic()
    sender.send_signal(signal.SIGTERM)
    try:
        _, err = sender.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        sender.kill()
        _, err = sender.communicate()
        raise AssertionError("the sender did not stop within 60 s of SIGTERM") from None
    return sender.returncode, time.monotonic() - started, err


@pytest.mark.parametrize("pause", ["none", "schedule", "rate"])
def test_sigterm_on_a_shaped_sender_stops_promptly(tmp_path: Path, pause: str) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(8 * MiB))  # incompressible: 32 s of work at 2 Mbit
    state = tmp_path / "state"
    rcv = start_receiver(tmp_path / "target")
    shaping = ("--schedule", "* 0") if pause == "schedule" else ("--rate", "2Mbit")
    sender = LoggedPopen(
        [*REPLICATOR, "send", "--to", rcv.address, "--job", "j", "--state-dir", str(state),
         "--insecure", "--interval", "60", *shaping, str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        _wait(sender, state, "journaled" if pause == "schedule" else "wire")
        if pause == "rate":
            paused = replicator("rate", "--state-dir", str(state), "0", "--json")
            assert paused.returncode == 0, paused.stderr
        time.sleep(1.0)  # a bulk frame is now held by the bucket
        before = _job(state)
        assert before is not None and before["lag"]["records"]
        code, took, err = _stop(sender)
        assert code == 0, err[-3000:]
        assert took < STOP_WITHIN, f"stop took {took:.1f} s"
        assert "Traceback" not in err
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    try:
        # the rest waits in the journal: the next run (unlimited) ships it, replica equal
        summary = send_once(rcv, "j", state, disk)
        assert summary["basis"] != "full", summary  # continued from the journal, not redone
        assert b3(tmp_path / "target" / "j" / disk.name) == b3(disk)
    finally:
        assert rcv.stop() == 0
