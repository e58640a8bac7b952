"""A sender leaves its records' checksums to a receiver that checks each one on arrival
(``ShippedUnchecked`` in engine/link.py); damage done to its journal while it runs is still
found on its own side, by the next session, and never applied on the target."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from replicator.engine.errors import PeerProtocolError
from replicator.engine.link import Link, ShippedUnchecked
from replicator.engine.receiver import Receiver, ReceiverConfig
from replicator.engine.volumes import VolumeKind, VolumeSpec
from replicator.journal import Journal, Record, RecordType
from replicator.journal.errors import JournalCorrupt
from replicator.journal.records import HEADER_SIZE
from replicator.journal.segment import HEADER_BYTES
from tests.engine.sessions import ship_journal

RECORD_DATA = 64 * 1024
RECORDS = 8
DAMAGED = 5  # the LSN whose payload gets a flipped bit
NAME = "d.img"


@dataclass
class Setup:
    tmp: Path
    journal: Journal
    receiver: Receiver
    spec: VolumeSpec

    async def session(self, unchecked: ShippedUnchecked | None) -> Link:
        """A session that ships the journal from what the receiver holds, until it fails
        (the failure is raised by the caller)."""
        return await ship_journal(
            self.receiver, self.journal, self.spec, RECORDS * RECORD_DATA, unchecked=unchecked
        )


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    journal = await Journal.open(tmp_path / "journal")
    await journal.append_many(
        [
            Record(RecordType.WRITE, NAME, i * RECORD_DATA, RECORD_DATA, os.urandom(RECORD_DATA))
            for i in range(RECORDS)
        ]
    )
    await journal.sync()
    (segment,) = sorted((tmp_path / "journal").glob("*.seg"))
    record_size = HEADER_SIZE + len(NAME) + RECORD_DATA
    at = HEADER_BYTES + (DAMAGED - 1) * record_size + HEADER_SIZE + len(NAME) + 1000
    fd = os.open(segment, os.O_RDWR)
    try:  # damage after the append: what the journal checked at open and from memory
        (byte,) = os.pread(fd, 1, at)
        os.pwrite(fd, bytes([byte ^ 0x10]), at)
    finally:
        os.close(fd)
    receiver = Receiver(ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate"))
    spec = VolumeSpec(tmp_path / NAME, NAME, VolumeKind.DISK)
    try:
        yield Setup(tmp_path, journal, receiver, spec)
    finally:
        await receiver.aclose()
        await journal.aclose()


async def test_the_receiver_refuses_a_record_damaged_here_and_the_next_session_finds_it(
    setup: Setup,
) -> None:
    unchecked = ShippedUnchecked()
    first = await setup.session(unchecked)
    with pytest.raises(PeerProtocolError, match=f"checksum mismatch \\(lsn {DAMAGED}\\)"):
        first.raise_if_failed()
    assert first.received_lsn < DAMAGED <= unchecked.lsn  # shipped unchecked, refused
    second = await setup.session(unchecked)
    with pytest.raises(JournalCorrupt, match="checksum mismatch"):
        second.raise_if_failed()  # found here, before it was shipped again
    assert second.received_lsn < DAMAGED  # never held by the receiver, let alone applied


async def test_a_sender_that_checks_every_record_finds_the_damage_in_its_first_session(
    setup: Setup,
) -> None:
    link = await setup.session(None)
    with pytest.raises(JournalCorrupt, match="checksum mismatch"):
        link.raise_if_failed()
    assert link.received_lsn < DAMAGED


async def test_records_shipped_unchecked_are_counted_before_they_go(setup: Setup) -> None:
    """A session that ships the journal's good records moves the mark past them."""
    unchecked = ShippedUnchecked()
    await setup.session(unchecked)
    assert unchecked.lsn >= DAMAGED - 1
