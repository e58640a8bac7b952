"""``durable.settled``: a state write in a worker thread never outlives a cancelled caller,
so the next write of the same file cannot race it or be overwritten by it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from replicator.journal import durable
from tests.journal.helpers import FirstWriteHeld


async def test_a_cancelled_write_has_ended_before_the_cancellation_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.state"
    held = FirstWriteHeld(durable.write_state)
    monkeypatch.setattr(durable, "write_state", held)
    first = asyncio.create_task(durable.write_state_async(path, {"n": 1}))
    await held.wait_started()
    first.cancel()
    await asyncio.sleep(0.01)
    first.cancel()  # cancelled again while it waits for its thread: it still waits
    with pytest.raises(asyncio.CancelledError):
        await first
    assert durable.read_state(path) == {"n": 1}  # the thread had written when it ended
    await durable.write_state_async(path, {"n": 2})  # the next writer
    await asyncio.get_running_loop().shutdown_default_executor()
    assert durable.read_state(path) == {"n": 2}
    assert os.listdir(tmp_path) == ["x.state"]  # no temporary file left


async def test_a_settled_call_returns_its_result_and_raises_its_error() -> None:
    assert await durable.settled(divmod, 7, 2) == (3, 1)
    assert await durable.settled(int, "ff", base=16) == 255
    with pytest.raises(ZeroDivisionError):
        await durable.settled(divmod, 1, 0)
