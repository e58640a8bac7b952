"""A one-shot sender leaves its journal with no records once the receiver applied them all,
so its next run's open reads none (recovery reads the whole active segment, up to 64 MiB,
to find where its records end); the LSN floor, the local basis and the replica are kept."""

from __future__ import annotations

import os
from pathlib import Path

from replicator.engine.api import Receiver, ReceiverConfig, Sender, SenderConfig, resolve_volumes
from replicator.journal import Journal
from replicator.journal.segment import HEADER_BYTES, SEGMENT_SUFFIX

MiB = 1024 * 1024


def _rewrite(disk: Path, offsets: list[int]) -> None:
    with disk.open("r+b") as f:
        for offset in offsets:
            f.seek(offset)
            f.write(os.urandom(8192))


def _segments(journal_dir: Path) -> list[Path]:
    return sorted(p for p in journal_dir.iterdir() if p.name.endswith(SEGMENT_SUFFIX))


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
            sender = Sender(job, control=False)
            summary = await sender.run_once()
            await sender.aclose()
            basis.append(summary.basis)
            if change:
                assert summary.records > 1  # the changes were journaled, not only the EPOCH
            assert (tmp_path / "replicas" / "vm1" / "disk.img").read_bytes() == disk.read_bytes()
            (active,) = _segments(state / "journal")
            assert active.name == f"{summary.lsn + 1:020d}{SEGMENT_SUFFIX}"
            assert active.stat().st_size == HEADER_BYTES  # no records: nothing to verify
            async with await Journal.open(state / "journal") as journal:
                assert (journal.first_lsn, journal.next_lsn) == (summary.lsn + 1,) * 2
        # the local manifests stay the basis: the retired records were all in them
        assert basis[1:] == ["local", "local"]
