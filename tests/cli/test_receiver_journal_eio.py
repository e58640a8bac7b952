"""The receive journal's fsync fails (EIO, faultfs under `receive --dir`) while a live NBD
sender ships a VM's writes, as a user sees it: nothing past the last durable point is
acknowledged or promoted, every party says what failed and where, and once the disk is
fine the replica converges without a hand on it."""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

from replicator.engine.errors import ExitCode
from tests.faultfs import FaultFS
from tests.tools import LiveNbdSender, b3, qemu_compare, replicator, start_receiver


def _status(*args: str) -> dict[str, object]:
    out = replicator("status", *args, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    job: dict[str, object] = json.loads(out.stdout)["jobs"][0]
    return job


def test_a_failing_receive_journal_is_reported_refused_and_converges_once_fixed(
    tmp_path: Path,
) -> None:
    """Before: the receiver's status said "idle" (a failed journal was no failure of the
    job's), and the sender, and a failover, said "[Errno 5] Input/output error" without
    naming the file whose fsync failed."""
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        target = fs.mountpoint
        rcv = start_receiver(target, log=tmp_path / "receiver.log")
        sender = LiveNbdSender(tmp_path, rcv)
        try:
            sender.write("write -P 0x11 0 1M")
            rule = fs.add("fsync", errno.EIO, path="*journal/*.seg")
            sender.write("write -P 0x22 1M 1M")  # acknowledged to the VM: in its journal
            fs.wait_for_hit(rule, 2)  # the session's sync, then the next session's open
            time.sleep(0.5)
            job = _status("--dir", str(target))
            assert job["state"] == "failed", (job["state"], job["last_error"], job["errors"])
            assert "Input/output error" in str(job["last_error"]), job
            assert "check it (dmesg), then run again" in str(job["last_error"]), job
            # at the point it applied (the records durable before the fault may follow it)
            lsn, point = job["lsn"], job["consistency_point"]
            assert isinstance(lsn, dict) and isinstance(point, dict), job
            assert point["consistent"] and point["lsn"] == lsn["applied"], job
            sent = _status("--state-dir", str(sender.state))
            assert sent["state"] == "refused", sent
            assert "receiver refused (storage)" in str(sent["last_error"]), sent
            assert ".seg'" in str(sent["last_error"]), sent  # which file the disk failed
            refused = replicator("failover", "--dir", str(target), "--job", "vm1", "--force")
            assert refused.returncode == ExitCode.STORAGE, refused.stderr[-2000:]
            assert ".seg'" in refused.stderr and "run the same command again" in refused.stderr
            assert _status("--dir", str(target))["promoted"] is False
            fs.clear()
            deadline = time.monotonic() + 60
            while not sender.caught_up():  # the sender retries by itself
                assert sender.proc.poll() is None, sender.stop()[1][-3000:]
                assert time.monotonic() < deadline, "no convergence after the fault cleared"
                time.sleep(0.2)
            code, err = sender.stop()
            assert code == 0, err[-3000:]
            promoted = replicator("failover", "--dir", str(target), "--job", "vm1", "--force")
            assert promoted.returncode == 0, promoted.stderr[-2000:]
            assert qemu_compare("raw", sender.source, sender.replica).returncode == 0
            assert b3(sender.source) == b3(sender.replica)
        finally:
            if sender.proc.poll() is None:
                sender.stop()
            assert rcv.stop() == 0
