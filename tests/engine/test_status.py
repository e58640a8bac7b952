"""Job status on both sides: what a snapshot says after a real sync, and while disconnected."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from replicator.engine.receiver import Receiver, ReceiverConfig
from replicator.engine.sender import Sender, SenderConfig
from replicator.engine.status import SenderJobStatus, StatusBoard
from replicator.engine.volumes import resolve_volumes
from replicator.journal import Record
from replicator.transport import serve


async def test_snapshots_after_a_sync_and_while_the_receiver_is_away(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    receiver = Receiver(ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate"))
    server = await serve("127.0.0.1", 0, receiver.handle)
    port = server.sockets[0].getsockname()[1]
    config = SenderConfig("127.0.0.1", port, "job", resolve_volumes([disk]), tmp_path / "state")
    sender = Sender(config)
    board = StatusBoard("sender")
    board.add("job", sender.status)
    try:
        summary = await sender.run_once()
        snap = (await board.snapshot())["jobs"][0]
        assert snap["job"] == "job" and snap["role"] == "sender" and not snap["connected"]
        assert snap["lsn"]["applied"] == summary.lsn == snap["lsn"]["received"]
        assert snap["lag"]["records"] == 0 and snap["lag"]["seconds"] == 0.0
        assert snap["bytes"]["payload"] >= 1 << 20 and snap["initial_sync"]["percent"] == 100.0
        assert snap["last_epoch"] == 1
        rsnap = (await receiver.status.snapshot())["jobs"][0]
        assert rsnap["state"] == "idle" and rsnap["lsn"]["applied"] == summary.lsn
        assert rsnap["consistency_point"]["consistent"]
        assert rsnap["consistency_point"]["lsn"] == summary.lsn
        assert rsnap["bytes"]["payload"] == snap["bytes"]["payload"]
    finally:
        server.close()
        await receiver.aclose()
        await server.wait_closed()
    # the receiver is gone; a change is journaled but cannot ship: the lag grows
    from replicator.engine.sender import SenderState

    async with SenderState(config) as state:
        assert state.journal is not None
        sender.status.journal = state.journal
        await state.journal.append(
            Record.write("disk.img", 0, b"x" * 512).with_lsn(0, time.time_ns() - 5 * 10**9)
        )
        await state.journal.sync()
        lagging = (await board.snapshot())["jobs"][0]
        assert lagging["lag"]["records"] == 1
        assert lagging["lag"]["seconds"] >= 5.0  # since the source time of that change


async def test_an_applied_lsn_heard_before_any_link_was_received_too() -> None:
    """A live sender serving alone (--wait-for-receiver) starts from the receiver's applied
    LSN as last heard: its status said "received 0, applied 15", as if the receiver held
    less than it had applied."""
    from replicator.engine.status import SenderJobStatus

    status = SenderJobStatus("vm1", "nbd", "127.0.0.1:1")
    status.heard_applied(15)
    lsn = (await status.snapshot())["lsn"]
    assert lsn["applied"] == 15 and lsn["received"] == 15, lsn


async def test_a_wall_clock_stepped_back_shrinks_no_lag_no_uptime_no_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NTP steps the sender's wall clock an hour back while a scanning job waits for its
    first point to be applied: its lag read 0 (the RPO silently understated), its uptime
    -3570 s and its rate 0 B/s. Every moment the process notes for a duration is on the
    monotonic clock now."""
    board = StatusBoard("sender")
    status = SenderJobStatus("vm", "scan", "peer")
    status.interval = 1.0
    status.point_taken(5, time.monotonic())  # not applied yet: the lag counts from the start
    first = await status.snapshot()
    assert first["uptime_seconds"] < 5
    real_time, real_mono = time.time, time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real_mono() + 30)  # 30 s later...
    monkeypatch.setattr(time, "time", lambda: real_time() + 30 - 3600)  # ...stepped back
    status._totals.wire = 30_000_000
    snap = await status.snapshot()
    assert 29 - 1 <= snap["lag"]["seconds"] < 60, snap["lag"]
    assert 30 <= snap["uptime_seconds"] < 60
    assert snap["rate_bytes_per_second"] > 500_000
    assert 30 <= (await board.snapshot())["uptime_seconds"] < 60
