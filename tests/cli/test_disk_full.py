"""A receiver whose disk fills up refuses with a clear message, keeps serving, and resumes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from tests.tools import b3, replicator, send_once, start_receiver


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs the test mounts itself (root, as in CI)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_refused_then_resumes_after_space_is_freed(
    tmp_path: Path, small_disk: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(40 * 1024 * 1024))
    receiver = start_receiver(small_disk)
    try:
        state = tmp_path / "state"
        out = replicator(
            "send", "--to", receiver.address, "--job", "full", "--state-dir", str(state),
            "--once", "--insecure", str(disk),
        )  # fmt: skip
        assert out.returncode == ExitCode.REFUSED, out.stderr
        assert "disk is full" in out.stderr
        assert receiver.proc.poll() is None  # still serving
        subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
        send_once(receiver, "full", state, disk)
        assert b3(small_disk / "full" / "disk.img") == b3(disk)
    finally:
        receiver.stop()
