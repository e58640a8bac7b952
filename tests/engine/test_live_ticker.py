"""The live ticker's barriers never follow a change that is journaled but not yet made
at its source (engine/live.py, JournalFirst.barrier_now).

A FUSE kill-cycle soak found the replica folder at rest in a state its source never had:
the ticker had appended a FLUSH between a write's journal append and the write itself,
and the sender was killed right there. The replica then held the write as a consistency
point while the source never got it (until the restarted sender compared them).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from replicator.engine.journal_first import Events, JournalFirst
from replicator.engine.live import TICK, LiveCapture, LiveSender
from replicator.engine.sender import Sender, SenderConfig
from replicator.journal import Journal, Record, RecordType

EVENTS = Events("replicator.test", overflow="test.journal_overflow", diverged="test.diverged")


class _Capture:
    """What the ticker asks of a capture."""

    watched: list[Any] = []

    def __init__(self, sequence: JournalFirst[Any]) -> None:
        self._sequence = sequence

    def barriers_allowed(self) -> bool:
        return True

    def sequence(self) -> JournalFirst[Any]:
        return self._sequence


async def _types(journal: Journal) -> list[RecordType]:
    await journal.sync()
    return [r.type async for r in journal.read_from(journal.first_lsn)]


async def test_the_ticker_waits_until_a_journaled_change_is_made(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path / "journal")
    sequence: JournalFirst[Any] = JournalFirst(journal, EVENTS)
    config = SenderConfig("127.0.0.1", 1, "job", [], tmp_path / "state")
    live = LiveSender(Sender(config), cast(LiveCapture, _Capture(sequence)))
    stop = asyncio.Event()
    ticker = asyncio.create_task(live._ticker(journal, stop))
    await asyncio.sleep(2 * TICK)  # running, with nothing new to close
    try:
        async with sequence:  # a change: journal append, then (later) the source write
            assert await sequence.append([Record.write("disk.img", 0, b"x" * 512)])
            await asyncio.sleep(20 * TICK)  # many ticks with a new record in the journal
            assert await _types(journal) == [RecordType.WRITE]
        await asyncio.sleep(20 * TICK)
        assert await _types(journal) == [RecordType.WRITE, RecordType.FLUSH]
    finally:
        stop.set()
        await ticker
        await journal.aclose()
