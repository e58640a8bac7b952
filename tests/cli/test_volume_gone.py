"""A volume that goes away while a continuous scanning sender runs: removed (a restore by
``rm`` and ``cp``), or replaced by something that is not a file (a FIFO)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from replicator.engine.errors import ExitCode
from tests.tools import (
    ReceiverProc,
    b3,
    replicator,
    sender_job,
    start_send,
    stop_and_read,
    wait_for,
)


def _volumes(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    disk, config = src / "disk.raw", src / "vm.xml"
    disk.write_bytes(os.urandom(2 * 1024 * 1024))
    config.write_text("<domain>v1</domain>\n")
    return disk, config


def _write(disk: Path, offset: int) -> None:
    with disk.open("r+b") as f:
        f.seek(offset)
        f.write(os.urandom(65536))


def test_a_fifo_in_a_volumes_place_neither_hangs_nor_deafens_the_sender(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A FIFO put where a configuration file was held the scan in ``open`` for good: no
    cycle after it, and SIGTERM went unheard (only SIGKILL stopped it). Now the cycle
    says which volume went, the sender waits and tries again, and a stop is prompt."""
    disk, config = _volumes(tmp_path)
    state = tmp_path / "state"
    proc = start_send(receiver.address, "vm", state, disk, config, extra=("--interval", "0.3"))
    try:
        replica = receiver.dir / "vm"
        wait_for(lambda: (replica / "vm.xml").exists(), proc, "the first point")
        config.unlink()
        os.mkfifo(config)
        _write(disk, 65536)
        wait_for(lambda: sender_job(state).get("state") == "volume_gone", proc, "volume_gone")
        job = sender_job(state)
        assert "'vm.xml'" in str(job["last_error"]) and "not a regular file" in str(
            job["last_error"]
        )
        assert int(job["errors"]["volume"]) >= 1
        shown = replicator("status", "--state-dir", str(state))
        assert "no consistency point is taken until it is back" in " ".join(shown.stdout.split())
        config.unlink()
        config.write_text("<domain>v2</domain>\n")  # put back: replication goes on
        wait_for(
            lambda: (
                (replica / "vm.xml").read_text() == "<domain>v2</domain>\n"
                and b3(replica / "disk.raw") == b3(disk)
            ),
            proc,
            "the replica catches up",
        )
        wait_for(lambda: sender_job(state).get("state") == "replicating", proc, "replicating")
        config.unlink()
        os.mkfifo(config)
        wait_for(lambda: sender_job(state).get("state") == "volume_gone", proc, "volume_gone")
        asked = time.monotonic()
        rc, err = stop_and_read(proc, timeout=30)
        assert time.monotonic() - asked < 10, "the stop waited"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err[-3000:]
    assert '"event": "sender.volume_gone"' in err


def test_a_disk_restored_by_rm_and_cp_is_waited_for_not_the_end_of_replication(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A removed disk ended the sender with "local storage error ... check the disk (free
    space, permissions)" (exit 9), for every volume of the job."""
    disk, config = _volumes(tmp_path)
    state = tmp_path / "state"
    proc = start_send(receiver.address, "vm", state, disk, config, extra=("--interval", "0.3"))
    try:
        replica = receiver.dir / "vm" / "disk.raw"
        wait_for(lambda: replica.exists() and b3(replica) == b3(disk), proc, "the first point")
        saved = disk.read_bytes()
        disk.unlink()
        wait_for(lambda: sender_job(state).get("state") == "volume_gone", proc, "volume_gone")
        assert "was removed or renamed" in str(sender_job(state)["last_error"])
        assert b3(replica) != "" and replica.exists()  # the replica keeps its last point
        restored = tmp_path / "restore.tmp"
        restored.write_bytes(saved)
        _write(restored, 0)
        restored.rename(disk)
        wait_for(lambda: b3(replica) == b3(disk), proc, "the restored disk replicated")
    finally:
        rc, err = stop_and_read(proc)
    assert rc == 0, err[-3000:]


def test_send_once_names_the_volume_that_went(tmp_path: Path, receiver: ReceiverProc) -> None:
    disk, config = _volumes(tmp_path)
    config.unlink()
    os.mkfifo(config)
    out = replicator(
        "send", "--to", receiver.address, "--job", "vm", "--state-dir", str(tmp_path / "state"),
        "--once", "--insecure", str(disk), str(config), timeout=60,
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert "vm.xml" in out.stderr and "not a regular file" in out.stderr
