"""The jobs a receiver keeps open are bounded by its open-file limit
(engine/descriptors.py): idle ones are closed, least recently used first, to make room;
one with a session, or asked for a moment ago, never is."""

from __future__ import annotations

from pathlib import Path

import pytest

import replicator.engine.receiver as receiver_module
from replicator.engine.errors import BusyError
from replicator.engine.receiver import Receiver, ReceiverConfig


async def test_idle_jobs_are_closed_to_make_room_and_busy_ones_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = Receiver(ReceiverConfig(tmp_path / "r", tmp_path / "s", max_open_jobs=2))
    try:
        first = await receiver.job("first")
        await receiver.job("second")
        with pytest.raises(BusyError, match="2 jobs are open"):  # both asked for just now
            await receiver.job("third")
        monkeypatch.setattr(receiver_module, "IDLE_BEFORE_CLOSE", 0.0)
        assert await receiver.job("first") is first  # used after "second": it stays
        third = await receiver.job("third")
        assert sorted(receiver._jobs) == ["first", "third"]
        for replica in (first, third):  # sessions hold both: nothing can go
            await replica.session_lock.acquire()
        with pytest.raises(BusyError, match="none has been idle"):
            await receiver.job("fourth")
        third.session_lock.release()
        second = await receiver.job("second")  # reopened from its files, "third" closed
        assert not second.broken
        assert sorted(receiver._jobs) == ["first", "second"]
        first.session_lock.release()
    finally:
        await receiver.aclose()
