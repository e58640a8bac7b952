"""Bandwidth options as a user runs them: `send --rate` caps the wire, `replicator rate`
changes it on a running sender without reconnecting, bad specs exit 3 quoting the part."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from replicator.engine.errors import ExitCode
from tests.tools import ENV, REPLICATOR, LoggedPopen, b3, replicator, start_receiver

pytestmark = pytest.mark.serial  # measures rates and deadlines: not beside other tests

MiB = 1024 * 1024


def _status(state: Path) -> dict[str, Any]:
    out = replicator("status", "--state-dir", str(state), "--json")
    assert out.returncode == 0, out.stderr
    job: dict[str, Any] = json.loads(out.stdout)["jobs"][0]
    return job


def test_rate_caps_the_wire_and_changes_live(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(24 * MiB))  # incompressible: wire bytes = payload bytes
    state = tmp_path / "state"
    rcv = start_receiver(tmp_path / "target")
    sender = LoggedPopen(
        [*REPLICATOR, "send", "--to", rcv.address, "--job", "j", "--state-dir", str(state),
         "--insecure", "--interval", "0.5", "--rate", "2MB/s", "--burst", "256K", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:  # the sender answers once it runs; wait for its first bytes
            out = replicator("status", "--state-dir", str(state), "--json")
            # the process's own status: a sender that holds its state folder but has not
            # opened its control socket yet is shown from its files, without traffic
            if out.returncode == 0 and json.loads(out.stdout).get("source") == "process":
                job = json.loads(out.stdout)["jobs"][0]
                if job["bytes"]["wire"] > 0:
                    break
            assert time.monotonic() < deadline and sender.poll() is None, sender.stderr
            time.sleep(0.2)
        first, t0 = job["bytes"]["wire"], time.monotonic()
        time.sleep(3)
        job = _status(state)
        rate = (job["bytes"]["wire"] - first) / (time.monotonic() - t0)
        assert job["shaping"]["rate"] == "2 MB/s" or job["shaping"]["rate_bytes_per_second"] == 2e6
        # wire bytes are counted as frames are written: allow one 2 MiB frame of slack
        assert rate < 2e6 * 1.1 + 2 * MiB / 3, rate
        assert rate > 2e6 * 0.5, rate  # and it does move

        # paused: the state says so (not "replicating" while nothing moves), and how to resume
        paused = replicator("rate", "--state-dir", str(state), "0")
        assert paused.returncode == 0, paused.stderr
        assert _status(state)["state"] == "paused"
        text = replicator("status", "--state-dir", str(state))
        assert (
            "state       paused (rate 0: `replicator rate --state-dir DIR RATE` resumes it)"
            in text.stdout.splitlines()
        ), text.stdout
        changed = replicator("rate", "--state-dir", str(state), "unlimited", "--json")
        assert changed.returncode == 0, changed.stderr
        assert json.loads(changed.stdout)["source"] == "manual"
        assert _status(state)["state"] in ("replicating", "lagging")
        deadline = time.monotonic() + 30
        while _status(state)["lsn"]["applied"] < 1 or _status(state)["lag"]["records"]:
            assert time.monotonic() < deadline, "did not catch up once unlimited"
            time.sleep(0.2)
        assert _status(state)["connected"]  # the same connection: no reconnect needed
    finally:
        sender.terminate()
        sender.wait(timeout=60)
        rcv.stop()
    assert b3(tmp_path / "target" / "j" / disk.name) == b3(disk)


def _send_nowhere(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`send --once` of a small disk to a port nothing listens on, with ``args``."""
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x" * 4096)
    return replicator(
        "send", "--to", "127.0.0.1:9", "--job", "j", "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), *args, str(disk),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "quoted"),
    [
        (("--rate", "fast"), "fast"),
        (("--schedule", "mon-fri 08:00-18:00 20Mbit; funday 5M"), "funday"),
        (("--burst", "lots"), "lots"),
    ],
)
def test_bad_shaping_options_exit_3_quoting_the_bad_part(
    tmp_path: Path, args: tuple[str, str], quoted: str
) -> None:
    out = _send_nowhere(tmp_path, *args)
    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert quoted in out.stderr and args[0] in out.stderr


@pytest.mark.parametrize(
    ("args", "warned"),
    [
        (("--rate", "10Mbit", "--burst", "1G"), "--burst 1G is 859 s of sending at 10Mbit"),
        (("--schedule", "mon-fri 20Mbit; * unlimited", "--burst", "64M"), "--burst 64M is 27 s of"),
        (("--rate", "1G", "--burst", "64M"), None),  # half a second's worth
        (("--burst", "1G"), None),  # no rate: nothing to compare with
    ],
)
def test_a_burst_worth_many_seconds_at_the_rate_is_warned(
    tmp_path: Path, args: tuple[str, ...], warned: str | None
) -> None:
    """--burst 1G with --rate 10Mbit let 14 minutes' worth go unshaped after each pause."""
    out = _send_nowhere(tmp_path, *args)
    assert out.returncode == ExitCode.CONNECT, out.stderr  # warned, not refused
    if warned is None:
        assert "--burst" not in out.stderr
    else:
        assert f"replicator: WARNING: {warned}" in out.stderr


def test_rate_without_a_running_sender(tmp_path: Path) -> None:
    out = replicator("rate", "--state-dir", str(tmp_path), "10Mbit")
    assert out.returncode == ExitCode.CONFIG
    assert "no sender answers" in out.stderr
    bad = replicator("rate", "--state-dir", str(tmp_path), "ten")
    assert bad.returncode == ExitCode.CONFIG and "'ten'" in bad.stderr
