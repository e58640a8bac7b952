"""State an older release left, opened by this one (docs/OPERATIONS.md, "Upgrading").

``tests/upgrade_state/protocol4_nbd`` holds what replicator built from commit 017f4f2
(2026-12-02: protocol 4, journal records of format 1 (blake3), no replica identity, no
``point_floor`` in ``applied.state``, no run outcome in ``sender.json``) left of an NBD job
when its sender and receiver were SIGKILLed, the receiver hung (SIGSTOP) so that the
sender's journal holds two writes the receiver never got. ``make.sh`` beside it made it
(see there); the disks are not kept (128 KiB each), ``_disks`` writes them again: the
same bytes the old release's source and replica held (checked against them once).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from replicator.journal.durable import read_state, write_state
from tests.tools import (
    LiveNbdSender,
    ReceiverProc,
    b3,
    replicator,
    start_receiver,
    wait_for,
)

FIXTURE = Path(__file__).resolve().parent.parent / "upgrade_state" / "protocol4_nbd"
SECTOR = 512


def _image(writes: list[tuple[int, int]]) -> bytes:
    """The 128 KiB disk: 0x11 over its first 64 KiB, then the 512-byte writes (pattern,
    offset) the old release journaled (make.sh)."""
    image = bytearray(b"\x11" * 65536 + bytes(65536))
    for pattern, offset in writes:
        image[offset : offset + SECTOR] = bytes([pattern]) * SECTOR
    return bytes(image)


APPLIED = [(0x21, 4096), (0x22, 98304)]  # shipped and applied before the receiver hung
UNSHIPPED = [(0x31, 8192), (0x32, 81920)]  # only in the sender's journal


def _disks(tmp_path: Path) -> tuple[Path, Path]:
    """The fixture's folders under ``tmp_path``, with the source disk and the replica as
    the old release left them. The replica's stamp in ``files.state`` is made again for
    the copy (same format; a copied file has another inode and ctime, which the receiver
    would take for a change made outside replication)."""
    shutil.copytree(FIXTURE / "sstate", tmp_path / "state")
    shutil.copytree(FIXTURE / "rdir", tmp_path / "rdir")
    source = tmp_path / "disk.raw"
    source.write_bytes(_image(APPLIED + UNSHIPPED))
    replica = tmp_path / "rdir" / "vm1" / "disk.raw"
    replica.parent.mkdir()
    replica.write_bytes(_image(APPLIED))
    os.sync()
    files = tmp_path / "rdir" / ".replicator" / "vm1" / "files.state"
    stamps = read_state(files)
    assert stamps is not None and set(stamps["files"]) == {"disk.raw"}, stamps
    st = replica.stat()
    write_state(files, {**stamps, "files": {"disk.raw": [st.st_ino, st.st_ctime_ns]}})
    return source, replica


def test_journal_inspect_reads_the_old_journals(tmp_path: Path) -> None:
    _disks(tmp_path)
    sender = replicator("journal", "inspect", str(tmp_path / "state"))
    assert sender.returncode == 0, sender.stderr
    assert "record format versions: 1 (blake3) 12" in sender.stdout
    assert "lsn: first 4  last 15  next 16" in sender.stdout
    assert "problem: none (every record verified)" in sender.stdout
    receiver = replicator("journal", "inspect", str(tmp_path / "rdir"))
    assert receiver.returncode == 0, receiver.stderr
    assert "record format versions: 1 (blake3) 6" in receiver.stdout
    at_rest = replicator("status", "--dir", str(tmp_path / "rdir"))
    assert at_rest.returncode == 0, at_rest.stderr
    assert "received 10, applied 10" in at_rest.stdout
    assert "not consistent" not in at_rest.stdout
    sender_at_rest = replicator("status", "--state-dir", str(tmp_path / "state"))
    assert sender_at_rest.returncode == 0, sender_at_rest.stderr
    text = " ".join(sender_at_rest.stdout.split())
    assert "journaled 15" in text and "how it ended is not known: an older replicator" in text


def test_an_nbd_job_killed_under_an_older_release_resumes_without_a_full_resync(
    tmp_path: Path,
) -> None:
    """Both sides upgraded at once (different protocols), restarted on what the old ones
    left: the two writes only the old sender's journal held are shipped as they are
    (format 1), the disk is compared with the old manifests and its journal (basis local,
    not the replica: nothing read from the target), and replication goes on."""
    source, replica = _disks(tmp_path)
    receiver: ReceiverProc = start_receiver(tmp_path / "rdir")
    try:
        live = LiveNbdSender(tmp_path, receiver, state=tmp_path / "state", fresh=False, loud=True)
        try:  # made once the replica equals the source: the unshipped writes are there
            live.write("write -P 0x41 12288 4096")  # and one of this release's
            wait_for(live.caught_up, live.proc, "the write through the export")
        finally:
            rc, err = live.stop()
        assert rc == 0, err
    finally:
        assert receiver.stop() == 0
    assert '"event": "sender.basis"' in err and '"kind": "local"' in err, err
    assert "full" not in err and '"kind": "remote"' not in err, err
    assert b3(replica) == b3(source)
    assert source.read_bytes()[8192 : 8192 + SECTOR] == b"\x31" * SECTOR  # what was unshipped
    journal = replicator("journal", "inspect", str(tmp_path / "rdir"))
    assert journal.returncode == 0, journal.stderr
