"""A one-shot sender leaves its journal with no records once the receiver applied them all,
so its next run's open reads none (recovery reads the whole active segment, up to 64 MiB,
to find where its records end); the LSN floor, the local basis and the replica are kept.
When that last step fails part way (a full or failing disk, or a kill there), the run says
so (exit 9) and the next run converges."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from replicator.engine.api import Receiver, ReceiverConfig, Sender, SenderConfig, resolve_volumes
from replicator.engine.errors import ExitCode
from replicator.engine.sender import Summary
from replicator.journal import Journal, recovery
from replicator.journal import journal as journal_mod
from replicator.journal.errors import JournalIOError
from replicator.journal.segment import HEADER_BYTES, SEGMENT_SUFFIX
from tests.journal.helpers import segment_files

MiB = 1024 * 1024


def _rewrite(disk: Path, offsets: list[int]) -> None:
    with disk.open("r+b") as f:
        for offset in offsets:
            f.seek(offset)
            f.write(os.urandom(8192))


async def _once(job: SenderConfig) -> Summary:
    sender = Sender(job, control=False)
    try:
        return await sender.run_once()
    finally:
        await sender.aclose()


async def test_send_once_retires_what_the_receiver_applied(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    state = tmp_path / "sstate"
    config = ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate")
    async with Receiver(config) as receiver:
        host, port = receiver.address
        job = SenderConfig(host, port, "vm1", resolve_volumes([disk]), state)
        basis = []
        for change in range(3):
            if change:  # the first run is the first sync; then a few extents change
                _rewrite(disk, [change * 64 * 1024, 3 * MiB + change * 4096])
            summary = await _once(job)
            basis.append(summary.basis)
            if change:
                assert summary.records > 1  # the changes were journaled, not only the EPOCH
            assert (tmp_path / "replicas" / "vm1" / "disk.img").read_bytes() == disk.read_bytes()
            (active,) = segment_files(state / "journal")
            assert active.name == f"{summary.lsn + 1:020d}{SEGMENT_SUFFIX}"
            assert active.stat().st_size == HEADER_BYTES  # no records: nothing to verify
            async with await Journal.open(state / "journal") as journal:
                assert (journal.first_lsn, journal.next_lsn) == (summary.lsn + 1,) * 2
        # the local manifests stay the basis: the retired records were all in them
        assert basis[1:] == ["local", "local"]


def _fails_at(step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the retire's ``step`` fail, leaving the files as a kill there would."""

    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if step == "seal":  # before anything is written
        monkeypatch.setattr(journal_mod, "seal_and_create", no_space)
    elif step == "create":  # the old segment sealed and synced; the new file empty

        def create_empty(directory: Path, base_lsn: int) -> tuple[int, Path]:
            os.close(os.open(directory / f"{base_lsn:020d}{SEGMENT_SUFFIX}", os.O_CREAT, 0o644))
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(recovery, "create_segment", create_empty)
    else:  # "trim": the new segment durable, the sealed old one not removed

        def io_error(*args: object) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(journal_mod, "retire_segments", io_error)


@pytest.mark.parametrize("step", ["seal", "create", "trim"])
async def test_a_retire_that_fails_part_way_says_so_and_the_next_run_converges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    state = tmp_path / "sstate"
    replica = tmp_path / "replicas" / "vm1" / "disk.img"
    config = ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate")
    async with Receiver(config) as receiver:
        host, port = receiver.address
        job = SenderConfig(host, port, "vm1", resolve_volumes([disk]), state)
        await _once(job)  # the first sync
        _rewrite(disk, [64 * 1024, 3 * MiB])
        _fails_at(step, monkeypatch)
        with pytest.raises(JournalIOError) as failed:
            await _once(job)
        monkeypatch.undo()
        assert failed.value.exit_code is ExitCode.STORAGE  # not a success, not "durable"
        assert failed.value.hint  # what to do next
        _rewrite(disk, [128 * 1024, 2 * MiB])
        assert (await _once(job)).basis == "local"  # nothing was lost: no full compare needed
        assert replica.read_bytes() == disk.read_bytes()
        (active,) = segment_files(state / "journal")
        assert active.stat().st_size == HEADER_BYTES  # and this run's retire went through
