"""A live NBD sender whose source image's fdatasync fails (EIO, the image on faultfs):
the kernel may have dropped pages of writes the VM was told were done, so the volume no
longer matches its journal, and every further write to it is refused with EIO until a
restart compares it with the replica. That must show: `status` said "replicating", no
error, while the VM could write nothing."""

from __future__ import annotations

import errno
import json
import subprocess
import time
from pathlib import Path

from tests.faultfs import FaultFS
from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    b3,
    qemu_compare,
    qemu_img,
    replicator,
    require_tool,
    start_receiver,
    stop_and_read,
    wait_for,
)


def _serve(address: str, state: Path, sock: Path, source: Path) -> subprocess.Popen[str]:
    return LoggedPopen(
        [*REPLICATOR, "send", "--to", address, "--job", "vm1", "--state-dir", str(state),
         "--capture", "nbd", "--nbd-socket", str(sock), "--insecure", str(source)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip


def _qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[str]:
    cmd = ["qemu-io", "-f", "raw"]
    for command in commands:
        cmd += ["-c", command]
    return subprocess.run([*cmd, uri], capture_output=True, text=True, timeout=60)


def test_a_source_whose_fsync_failed_is_reported_diverged_until_a_restart(
    tmp_path: Path,
) -> None:
    require_tool("qemu-io")
    rcv = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    replica = tmp_path / "target" / "vm1" / "disk.raw"
    sock, state = tmp_path / "nbd.sock", tmp_path / "state"
    uri = f"nbd+unix:///disk.raw?socket={sock}"
    try:
        with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
            source = fs.mountpoint / "disk.raw"
            qemu_img("create", "-q", "-f", "raw", str(source), "16M")

            def caught_up() -> bool:
                return (
                    sock.exists()
                    and replica.exists()
                    and qemu_compare("raw", source, replica, shared=True).returncode == 0
                )

            sender = _serve(rcv.address, state, sock, source)
            try:
                wait_for(caught_up, sender, "the first sync")
                done = _qemu_io(uri, "write -P 0x11 0 1M", "flush")
                assert done.returncode == 0, done.stdout + done.stderr
                rule = fs.add("fsync", errno.EIO, path="disk.raw", times=1)
                failed = _qemu_io(uri, "write -P 0x22 1M 1M", "flush")
                assert fs.hits()[str(rule)] == 1
                assert "Input/output error" in failed.stdout + failed.stderr, failed
                refused = _qemu_io(uri, "write -P 0x33 2M 1M", "flush")  # the disk is fine
                assert "Input/output error" in refused.stdout + refused.stderr, refused
                out = replicator("status", "--state-dir", str(state), "--json")
                job = json.loads(out.stdout)["jobs"][0]
                assert job["state"] == "diverged", job
                said = job["last_error"]
                assert "disk.raw" in said and "fdatasync" in said, said
                assert "start it again" in said, said
                text = replicator("status", "--state-dir", str(state)).stdout
                assert "diverged (disk.raw:" in text, text
            finally:
                code, err = stop_and_read(sender)
            assert code == 0, err[-3000:]
            sock.unlink(missing_ok=True)
            sender = _serve(rcv.address, state, sock, source)  # compares everything
            try:
                wait_for(caught_up, sender, "the restart's comparison")
                again = _qemu_io(uri, "write -P 0x44 3M 1M", "flush")
                assert again.returncode == 0, again.stdout + again.stderr
                deadline = time.monotonic() + 30
                while not caught_up():
                    assert time.monotonic() < deadline, "the write after the restart never came"
                    time.sleep(0.1)
                job = json.loads(replicator("status", "--state-dir", str(state), "--json").stdout)
                assert job["jobs"][0]["state"] in ("replicating", "lagging"), job
            finally:
                code, err = stop_and_read(sender)
            assert code == 0, err[-3000:]
            assert b3(source) == b3(replica)
    finally:
        assert rcv.stop() == 0
