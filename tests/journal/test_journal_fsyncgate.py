"""fsyncgate: after an fsync of a segment failed, Linux may leave the pages it could not
write clean, and a later fdatasync succeeds without writing them. The journal refuses
everything after the failure; its next open must not count those records as durable
without writing them again (tests/faultfs/volatile.py models the lost pages: a power cut
takes them back unless they were rewritten and synced)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from replicator.journal import Journal, JournalError, Record
from tests.faultfs import FaultFS, powered


def _records(n: int, fill: int) -> list[Record]:
    return [Record.write("d", i * 512, bytes([fill]) * 512) for i in range(n)]


@pytest.mark.parametrize("where", ["sync", "roll"])
async def test_records_a_failed_fsync_covered_count_once_written_again(
    tmp_path: Path, where: str
) -> None:
    """``sync``: a sync's fdatasync fails; ``roll``: the fdatasync of the segment a roll
    sealed fails (the sealed segment is then the last one, and the open used to create
    the next one without syncing it at all). Reopened, the journal counts what it holds;
    after a power cut it still holds all of that."""
    fs = powered(tmp_path / "real", tmp_path / "mnt")
    try:
        folder = fs.mountpoint / "journal"
        journal = await Journal.open(folder, segment_bytes=64 * 1024 if where == "sync" else 8192)
        try:
            journal_lsn = 0
            for record in _records(4, 1):
                journal_lsn = await journal.append(record)
            await journal.sync()
            fs.add("fsync", errno.EIO, path="*.seg", times=1)
            with pytest.raises(JournalError):
                for record in _records(4 if where == "sync" else 40, 2):
                    journal_lsn = await journal.append(record)
                await journal.sync()
            assert journal.failed
        finally:
            await journal.aclose()
        reopened = await Journal.open(folder, segment_bytes=8192)
        counted = reopened.durable_lsn
        await reopened.aclose()
        assert counted > 4  # the records past the failure are there to count
        fs.power_cut()
    finally:
        fs.stop()
    after = await Journal.open(tmp_path / "real" / "journal", segment_bytes=8192)
    try:
        assert after.durable_lsn >= counted, (after.durable_lsn, counted, journal_lsn)
    finally:
        await after.aclose()


async def test_an_open_whose_fsync_fails_names_the_segment(tmp_path: Path) -> None:
    """An fsync's OSError names no file: the open says which segment it was."""
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        folder = fs.mountpoint / "journal"
        journal = await Journal.open(folder)
        await journal.append(Record.flush())
        await journal.aclose()
        fs.add("fsync", errno.EIO, path="*.seg", times=1)
        with pytest.raises(OSError) as caught:
            await Journal.open(folder)
        assert caught.value.errno == errno.EIO
        assert caught.value.filename == str(folder / "00000000000000000001.seg")
