"""A source's later chmod reaches the replica: the sender keeps each volume's mode in its
basis (saved with the manifests) and sends CHMOD when a scan sees another one. State saved
before modes were kept still loads; each mode is then sent once."""

from __future__ import annotations

import os
from pathlib import Path

from replicator.journal.durable import read_state, write_state
from tests.tools import ReceiverProc, send_once


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def _sources(tmp_path: Path) -> tuple[Path, Path]:
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(256 * 1024))
    disk.chmod(0o644)
    xml = tmp_path / "vm.xml"
    xml.write_text("<domain/>")
    xml.chmod(0o640)
    return disk, xml


def test_a_later_chmod_of_the_source_reaches_the_replica(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk, xml = _sources(tmp_path)
    state = tmp_path / "s"
    send_once(receiver, "m", state, disk, xml)
    replica = receiver.dir / "m"
    assert (_mode(replica / "d.img"), _mode(replica / "vm.xml")) == (0o644, 0o640)

    disk.chmod(0o600)  # only the modes change: no byte of either file does
    xml.chmod(0o600)
    summary = send_once(receiver, "m", state, disk, xml)
    assert summary["basis"] == "local"  # the saved basis, from a new process
    assert summary["bytes_changed"] == 0 and summary["files_changed"] == 0
    assert (_mode(replica / "d.img"), _mode(replica / "vm.xml")) == (0o600, 0o600)

    disk.chmod(0o4640)  # with a data change at the same time; set-id bits do not travel
    with disk.open("r+b") as f:
        f.write(b"\1" * 4096)
    send_once(receiver, "m", state, disk, xml)
    assert _mode(replica / "d.img") == 0o640
    assert (replica / "d.img").read_bytes() == disk.read_bytes()


def test_modes_survive_a_restart_and_old_state_sends_them_once(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk, xml = _sources(tmp_path)
    state = tmp_path / "s"
    send_once(receiver, "m", state, disk, xml)
    # a new process, nothing changed: the saved modes say the replica has them already,
    # so the epoch is its EPOCH record alone
    assert send_once(receiver, "m", state, disk, xml)["records"] == 1

    # state written before modes were kept (no "modes" field) still loads ...
    saved = state / "manifests.state"
    old = read_state(saved)
    assert old is not None and old.pop("modes") == {"d.img": 0o644, "vm.xml": 0o640}
    write_state(saved, old)
    xml.chmod(0o600)
    again = send_once(receiver, "m", state, disk, xml)
    assert again["basis"] == "local" and again["files_changed"] == 0
    assert again["records"] == 3  # ... and each unknown mode is sent once: 2 CHMOD + EPOCH
    assert _mode(receiver.dir / "m" / "vm.xml") == 0o600
    assert send_once(receiver, "m", state, disk, xml)["records"] == 1
