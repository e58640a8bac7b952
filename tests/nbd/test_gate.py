"""The write gate of source self-fencing (engine/nbd/gate.py) covers a write's reply as
well as its start: a write let through just before the fence's deadline, whose journal
write outlasted it (a frozen process, a stalled disk), was acknowledged after the target
could have been promoted. It now waits for a renewal (acknowledged) or the witness's
word that the target was promoted (EIO), as a write arriving then does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from replicator.engine.nbd import proto
from replicator.engine.nbd import server as server_module
from replicator.engine.nbd.backend import JournaledFileExport
from replicator.engine.nbd.gate import WriteGate, fence_clock
from replicator.engine.nbd.server import NbdServer
from replicator.engine.witness_fence import SourceFence
from replicator.journal import Journal
from tests.nbd.helpers import RawClient

FENCE_AFTER = 0.3


async def _held_write(
    tmp_path: Path, journal: Journal, end: Callable[[SourceFence], None]
) -> tuple[int, bool]:
    """A write that starts in time and ends past the fence's deadline, then ``end``: its
    error, and whether its reply came before ``end``. On the per-request path, where a
    write can wait (the batch path's writes cannot: tests/nbd/test_native.py)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    export = JournaledFileExport(journal, disk, "disk", None)
    started, go_on = asyncio.Event(), asyncio.Event()
    write = export.write

    async def slow_write(offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        started.set()
        await go_on.wait()  # the process frozen, or its disk stalled, past the deadline
        await write(offset, data, fua=fua)

    export.write = slow_write  # type: ignore[method-assign]
    gate = WriteGate()
    fence = SourceFence("vm1", FENCE_AFTER, gate=gate)
    fence.renewed(fence_clock())
    server = NbdServer({"disk": export}, gate=gate)
    sock = str(tmp_path / "nbd.sock")
    await server.start_unix(sock)
    try:
        client = await RawClient.open(sock, "disk")
        client.send_request(proto.Cmd.WRITE, 7, 4096, 4096, b"\xab" * 4096)
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(FENCE_AFTER + 0.1)  # past the deadline; no renewal came
        go_on.set()
        early = asyncio.ensure_future(client.read_reply())
        done, _ = await asyncio.wait([early], timeout=0.5)
        end(fence)
        handle, error, _ = await asyncio.wait_for(early, 10)
        assert handle == 7
        await client.disconnect()
        return error, bool(done)
    finally:
        await server.aclose()
        await export.aclose()


@pytest.fixture(autouse=True)
def per_request_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "NATIVE", False)  # see _held_write


@pytest.fixture
async def journal(tmp_path: Path) -> Journal:
    return await Journal.open(tmp_path / "journal")


async def test_a_write_that_ends_past_the_deadline_waits_for_a_renewal(
    tmp_path: Path, journal: Journal
) -> None:
    error, early = await _held_write(tmp_path, journal, lambda f: f.renewed(fence_clock()))
    await journal.aclose()
    assert not early  # held until the renewal said this source is still the primary
    assert error == 0


async def test_a_write_that_ends_past_the_deadline_fails_once_the_target_was_promoted(
    tmp_path: Path, journal: Journal
) -> None:
    error, early = await _held_write(tmp_path, journal, lambda f: f.demoted())
    await journal.aclose()
    assert not early
    assert error == proto.Errno.EIO  # never acknowledged: the guest does not count on it
