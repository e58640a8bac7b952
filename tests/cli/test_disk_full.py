"""A receiver whose disk fills up refuses with a clear message, keeps serving, and resumes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from tests.tools import b3, one_line_error, replicator, send_once, start_receiver


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


def test_a_sender_whose_state_disk_fills_says_so_and_resumes_after_space_is_freed(
    tmp_path: Path, small_disk: Path
) -> None:
    """The sender's journal cannot be written (its state folder's file system is full):
    exit 9 naming the folder and what to do; once there is room, the next run completes
    and the replica equals the source."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(8 * 1024 * 1024) + bytes(24 * 1024 * 1024))
    receiver = start_receiver(tmp_path / "target")
    try:
        state = small_disk / "state"
        send_once(receiver, "vm1", state, disk)  # the first sync skips the journal
        with disk.open("r+b") as f:
            f.write(os.urandom(24 * 1024 * 1024))  # more than the 16 MiB file system holds
        out = replicator(
            "send", "--to", receiver.address, "--job", "vm1", "--state-dir", str(state),
            "--once", "--insecure", str(disk),
        )  # fmt: skip
        assert out.returncode == ExitCode.STORAGE, out.stderr
        line = one_line_error(out.stderr)
        assert "No space left on device" in line
        assert f"the file system holding {state / 'journal'} is full" in line
        assert "--state-dir" in line
        subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
        send_once(receiver, "vm1", state, disk)
        assert b3(tmp_path / "target" / "vm1" / "disk.img") == b3(disk)
    finally:
        receiver.stop()
