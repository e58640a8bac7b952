"""A volume that goes away while a continuous scanning sender runs: removed (a restore by
``rm`` and ``cp``), or replaced by something that is not a file (a FIFO)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from replicator.engine.errors import ExitCode
from tests.tools import (
    ENV,
    REPLICATOR,
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
        # the command samples the job afresh, seconds later under load: by then the job
        # may be between two tries, so wait for a sample taken while the volume is gone
        wait_for(
            lambda: (
                "no consistency point is taken until it is back"
                in " ".join(replicator("status", "--state-dir", str(state)).stdout.split())
            ),
            proc,
            "status to say no point is taken while the volume is gone",
        )
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


def test_a_disk_cut_shorter_mid_scan_is_scanned_again_before_its_point(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A disk truncated while `send --once` read it: what lay past its new end read as
    zeros, and the point left the replica at the old size with zeros there (a state the
    file never held), without a word until the next run. Now the scan says so and scans
    it again at its new size before the point."""
    disk, state = tmp_path / "disk.raw", tmp_path / "state"
    disk.write_bytes(os.urandom(32 * 1024 * 1024))
    proc = subprocess.Popen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "vm", "--state-dir",
         str(state), "--once", "--json", "--insecure", "--rate", "40Mbit", str(disk)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        # 5 MB/s: the scan, which ships as it reads (a first sync), takes about 7 s
        wait_for(lambda: sender_job(state).get("bytes", {}).get("wire", 0) > 2 << 20,
                 proc, "the first 2 MiB on the wire")  # fmt: skip
        os.truncate(disk, 4 * 1024 * 1024)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    replica = receiver.dir / "vm" / "disk.raw"
    assert replica.stat().st_size == disk.stat().st_size  # not 32 MiB with zeros
    assert b3(replica) == b3(disk)
    warned = [json.loads(line) for line in err.splitlines() if "volume_resized_mid_scan" in line]
    assert len(warned) == 1, err[-3000:]
    assert warned[0]["path"] == str(disk) and warned[0]["size_at_end"] == 4 * 1024 * 1024
    assert warned[0]["size_at_start"] == 32 * 1024 * 1024
    assert "scanning it again at its new size" in warned[0]["action"]
