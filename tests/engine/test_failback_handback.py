"""The receiver's hand-back at the end of a failback (``JobReplica.handback``), each durable
step cut short as a crash would: the job is promoted or a replica, never in between, and
records received before the failback are never applied after it."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from replicator.engine import failover, job_replica
from replicator.engine.errors import ConfigError
from replicator.engine.generations import PROMOTED_FILE
from replicator.engine.receiver import JobReplica, ReceiverConfig
from replicator.journal import Record

BLOCK = 4096


def _config(tmp_path: Path) -> ReceiverConfig:
    return ReceiverConfig(replica_root=tmp_path / "replicas", state_root=tmp_path / "state")


async def _promoted_with_a_cut_epoch(tmp_path: Path) -> None:
    """Generation 1, one epoch applied, then half an epoch received (never completed: the
    source died), then a forced failover."""
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        records = [
            Record.write("d", 0, b"\x01" * BLOCK).with_lsn(1, 1),
            Record.epoch(1).with_lsn(2, 1),
            Record.write("d", 0, b"\x02" * BLOCK).with_lsn(3, 1),  # no barrier follows
        ]
        await replica.ingest(records)
        await replica.journal.sync()
        replica.note_durable(records)
        await replica.apply_pending()
        await replica.set_generation(1)
    finally:
        await replica.aclose()
    await failover.failover_at_rest(_config(tmp_path), "job")


def _promoted(replica: JobReplica) -> bool:
    return replica.promotion is not None


def _replica_bytes(tmp_path: Path) -> bytes:
    return (tmp_path / "replicas" / "job" / "d").read_bytes()


async def test_handback_makes_a_replica_that_never_applies_older_records(tmp_path: Path) -> None:
    await _promoted_with_a_cut_epoch(tmp_path)
    (tmp_path / "replicas" / "job" / "d").write_bytes(b"\x09" * BLOCK)  # the promoted VM
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        assert replica.received_lsn == 3 and replica.applied_lsn == 2
        with pytest.raises(ConfigError, match="not above"):
            await replica.handback(3)
        await replica.handback(10)
        assert replica.promotion is None and replica.state.generation == 2
        assert (replica.applied_lsn, replica.state.point_lsn, replica.received_lsn) == (10, 10, 10)
        # the next sender's records follow lsn 10 and complete an epoch: only they apply
        records = [Record.epoch(2).with_lsn(11, 1)]
        await replica.ingest(records)
        await replica.journal.sync()
        replica.note_durable(records)
        await replica.apply_pending()
        assert replica.applied_lsn == 11
    finally:
        await replica.aclose()
    assert _replica_bytes(tmp_path) == b"\x09" * BLOCK  # lsn 3 (from before) never applied
    reopened = await JobReplica.open("job", _config(tmp_path))
    try:
        assert reopened.promotion is None and reopened.applied_lsn == 11
        assert not await reopened.check_replica(adopt=False)  # its files taken as they are
    finally:
        await reopened.aclose()
    assert _replica_bytes(tmp_path) == b"\x09" * BLOCK


async def test_a_crash_before_promoted_state_goes_leaves_the_job_promoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _promoted_with_a_cut_epoch(tmp_path)
    replica = await JobReplica.open("job", _config(tmp_path))
    try:

        def crash(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        with monkeypatch.context() as m:
            m.setattr(job_replica, "clear_promotion", crash)
            with pytest.raises(OSError):
                await replica.handback(10)
    finally:
        await replica.aclose()
    assert (tmp_path / "state" / "job" / PROMOTED_FILE).exists()
    replica = await JobReplica.open("job", _config(tmp_path))
    try:  # still promoted (every writer refused), at the hand-back LSN: a rerun finishes
        assert _promoted(replica) and replica.applied_lsn == replica.received_lsn == 10
        await replica.handback(11)
        assert not _promoted(replica) and replica.applied_lsn == 11
    finally:
        await replica.aclose()
    assert _replica_bytes(tmp_path) == b"\x01" * BLOCK  # the promoted point, nothing after
