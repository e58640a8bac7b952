"""A sender's state folder is released only once its state writes have ended: a write
cancelled mid-way (SIGINT during a cycle's end) went on in its worker thread after the
folder's lock was dropped, while another sender could already have loaded the folder."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from replicator.engine import lost_records
from replicator.engine.errors import ConfigError
from replicator.engine.sender_state import SenderConfig, SenderState
from replicator.engine.volumes import resolve_volumes


async def test_a_cancelled_state_write_ends_before_the_folder_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"x" * 4096)
    config = SenderConfig("127.0.0.1", 1, "vm1", resolve_volumes([disk]), tmp_path / "state")
    started, go_on, written = threading.Event(), threading.Event(), threading.Event()
    save = lost_records.save

    def slow_save(folder: Path, reason: str) -> None:
        started.set()
        go_on.wait(30)
        save(folder, reason)
        written.set()

    monkeypatch.setattr(lost_records, "save", slow_save)

    async def cycle() -> None:
        async with SenderState(config) as state:
            await state.require_compare("a test's reason")

    task = asyncio.create_task(cycle())
    assert await asyncio.to_thread(started.wait, 30)
    task.cancel()
    await asyncio.sleep(0.3)
    # the write goes on in its thread: the folder is still this sender's
    with pytest.raises(ConfigError, match="already runs"):
        async with SenderState(config):
            pass
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert written.is_set()
    async with SenderState(config) as after:
        assert after.compare == "a test's reason"
