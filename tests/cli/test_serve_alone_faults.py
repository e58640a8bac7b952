"""The durable steps of serving alone, each failed by a real I/O error (faultfs under the
sender's --state-dir): the note of where alone-numbering began (`served_alone.state`),
the extents noted before a trim (`touched.state`), the checkpoint at a clean stop
(`manifests.state`). None may crash the sender or leave a replica unlike its source."""

from __future__ import annotations

import errno
import time
from pathlib import Path

from tests.faultfs import FaultFS
from tests.tools import (
    LiveNbdSender,
    b3,
    qemu_compare,
    qemu_io,
    start_receiver,
    wait_for,
)


def _converged_then_stopped(sender: LiveNbdSender, said: str) -> None:
    """The replica catches up and equals the source (qemu-img and blake3); a clean stop
    exits 0 and the sender's log says ``said``."""
    wait_for(sender.caught_up, sender.proc, "the replica to catch up")
    compared = qemu_compare("raw", sender.source, sender.replica)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert b3(sender.replica) == b3(sender.source)
    rc, err = sender.stop()
    assert rc == 0, err[-3000:]
    assert said in err


def test_a_note_that_cannot_be_written_defers_serving_alone(tmp_path: Path) -> None:
    """ENOSPC on `served_alone.state`: no record is numbered without the receiver; the
    sender says why, keeps waiting, and serves alone once the note can be written."""
    target, log = tmp_path / "target", tmp_path / "receiver.log"
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        state = fs.mountpoint / "state"
        receiver = start_receiver(target, log=log)
        first = LiveNbdSender(tmp_path, receiver, state=state)
        first.write("write -P 0x11 0 4M")
        wait_for(first.caught_up, first.proc, "the first write to be replicated")
        assert first.stop()[0] == 0
        receiver.stop()
        qemu_io("raw", first.source, "write -P 0x22 40M 1M")  # while no sender ran
        first.sock.unlink(missing_ok=True)
        rule = fs.add("*", errno.ENOSPC, path="*served_alone.state*")
        sender = LiveNbdSender(
            tmp_path, receiver, "--wait-for-receiver", "0.5", state=state, fresh=False,
            until="start",
        )  # fmt: skip
        try:
            fs.wait_for_hit(rule)
            time.sleep(1)
            assert sender.proc.poll() is None and not sender.sock.exists()
            fs.clear()
            wait_for(sender.sock.exists, sender.proc, "serving alone once the note is written")
            sender.write("write -P 0x33 8M 1M")
            receiver = start_receiver(target, receiver.port, log=log)
            _converged_then_stopped(sender, "served_alone.state could not be written")
        finally:
            sender.stop()
            receiver.stop()


def test_marks_that_cannot_be_written_hold_the_trim_not_the_vm(tmp_path: Path) -> None:
    """EIO on `touched.state` before every trim: the journal keeps its acknowledged
    segments (a crash then would find them, not a gap), fills, and the capture tracks
    changes past it as at any cap; the VM's writes go on and the replica converges."""
    target = tmp_path / "target"
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        state = fs.mountpoint / "state"
        receiver = start_receiver(target)
        sender = LiveNbdSender(tmp_path, receiver, "--journal-max", "8M", state=state)
        try:
            rule = fs.add("*", errno.EIO, path="*touched.state*")
            for i in range(6):  # 24 MiB through an 8 MiB journal
                sender.write(f"write -P {i + 1} {i * 4}M 4M")
            fs.wait_for_hit(rule)
            assert sender.proc.poll() is None
            fs.clear()  # the disk heals: the next trim notes the marks and goes through
            sender.write("write -P 0x44 40M 4M")
            _converged_then_stopped(sender, "sender.touched_unsaved")
        finally:
            sender.stop()
            receiver.stop()


def test_a_checkpoint_that_cannot_be_saved_leaves_the_older_manifests(tmp_path: Path) -> None:
    """ENOSPC on `manifests.state` at a clean stop: the stop still exits 0, the old
    manifests stay (the next start compares with the receiver's, as after a kill), and
    the replica converges."""
    target, log = tmp_path / "target", tmp_path / "receiver.log"
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        state = fs.mountpoint / "state"
        receiver = start_receiver(target, log=log)
        first = LiveNbdSender(tmp_path, receiver, "--journal-max", "8M", state=state, loud=True)
        for i in range(4):
            first.write(f"write -P {i + 1} {i * 4}M 4M")
            wait_for(first.caught_up, first.proc, "each write to be replicated")
        before = (fs.source / "state" / "manifests.state").read_bytes()
        rule = fs.add("*", errno.ENOSPC, path="*manifests.state*")
        rc, err = first.stop()
        assert rc == 0, err[-3000:]
        assert fs.hits()[str(rule)] >= 1 and "sender.checkpoint_failed" in err
        assert (fs.source / "state" / "manifests.state").read_bytes() == before
        fs.clear()
        qemu_io("raw", first.source, "write -P 0x55 40M 1M")  # while no sender ran
        first.sock.unlink(missing_ok=True)
        sender = LiveNbdSender(
            tmp_path, receiver, "--journal-max", "8M", state=state, fresh=False, loud=True
        )
        try:
            _converged_then_stopped(sender, '"basis": "remote"')
        finally:
            sender.stop()
            receiver.stop()
