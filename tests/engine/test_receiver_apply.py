"""The receiver applies from memory when it can, from its journal when it must."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

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


async def test_replica_manifest_streams_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from replicator.engine import job_replica
    from replicator.engine import receiver as receiver_module
    from replicator.engine.link import Link
    from replicator.engine.manifest import ExtentManifest
    from replicator.engine.volumes import VolumeKind, VolumeSpec
    from replicator.journal import Journal
    from replicator.transport import connection_pair

    monkeypatch.setattr(job_replica, "MANIFEST_CHUNK", 7)  # 100 extents -> 15 messages
    replica = tmp_path / "replicas" / "job" / "d.img"
    replica.parent.mkdir(parents=True)
    replica.write_bytes(os.urandom(100 * 4096))
    receiver = receiver_module.Receiver(_config(tmp_path))
    sender_conn, receiver_conn = await connection_pair()
    serving = asyncio.create_task(receiver.handle(receiver_conn))
    journal = await Journal.open(tmp_path / "sender-journal")
    link = Link(sender_conn, journal)
    try:
        spec = VolumeSpec(replica, "d.img", VolumeKind.DISK)
        await link.handshake("job", [spec], {"d.img": replica.stat().st_size})
        link.start_reader()
        remote = await link.request_manifest("d.img", 4096)
        assert remote is not None
        assert remote.digests == ExtentManifest.of_file(spec.path, 4096).digests
        assert await link.request_manifest("missing.img", 4096) is None
        await link.goodbye()
    finally:
        await link.aclose()
        await serving
        await receiver.aclose()
        await journal.aclose()
