"""The receiver applies from memory when it can, from its journal when it must."""

from __future__ import annotations

from pathlib import Path

from replicator.engine.receiver import JobReplica, ReceiverConfig
from replicator.journal import Record


def _config(tmp_path: Path) -> ReceiverConfig:
    return ReceiverConfig(replica_root=tmp_path / "replicas", state_root=tmp_path / "state")


async def test_records_a_dead_session_left_unhanded_are_still_applied(tmp_path: Path) -> None:
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        first = [Record.write("d", 0, b"a" * 4096).with_lsn(1, 1), Record.flush().with_lsn(2, 1)]
        await replica.ingest(first)
        await replica.journal.sync()
        replica.note_durable(first)
        assert await replica.apply_pending() == 2
        # a session appends and dies before its sync hands the records over
        orphans = [Record.write("d", 4096, b"b" * 4096).with_lsn(3, 1)]
        await replica.ingest(orphans)
        # the next session syncs them at its start, then brings a barrier
        await replica.journal.sync()
        replica.session_started()
        barrier = [Record.flush().with_lsn(4, 1)]
        await replica.ingest(barrier)
        await replica.journal.sync()
        replica.note_durable(barrier)
        assert await replica.apply_pending() == 4
    finally:
        await replica.aclose()
    data = (tmp_path / "replicas" / "job" / "d").read_bytes()
    assert data == b"a" * 4096 + b"b" * 4096


async def test_only_whole_epochs_are_applied(tmp_path: Path) -> None:
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        part = [Record.write("d", 0, b"x" * 512).with_lsn(1, 1)]
        await replica.ingest(part)
        await replica.journal.sync()
        replica.note_durable(part)
        assert await replica.apply_pending() == 0  # no barrier yet: the replica waits
        assert not (tmp_path / "replicas" / "job" / "d").exists()
        end = [Record.epoch(1).with_lsn(2, 1)]
        await replica.ingest(end)
        await replica.journal.sync()
        replica.note_durable(end)
        assert await replica.apply_pending() == 2
    finally:
        await replica.aclose()
    assert (tmp_path / "replicas" / "job" / "d").read_bytes() == b"x" * 512
