"""A failed apply never counts as applied; recovery rebuilds what damage took.

Each durable step of an apply is made to fail once (a real OSError where the step does
its I/O); the applied LSN must stay put, the records stay in the journal, and the next
attempt (same object, or the job reopened) brings the replica to the source's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from replicator.engine import job_replica, replica_state
from replicator.engine.applier import Applier, ApplyError
from replicator.engine.at_rest import receiver_jobs_at_rest
from replicator.engine.errors import ReplicaInconsistent
from replicator.engine.generations import PromotedUnfinished, load_promotion
from replicator.engine.receiver import JobReplica, ReceiverConfig
from replicator.engine.replica_files import ReplicaDiverged, ReplicaFiles
from replicator.journal import Record
from replicator.journal.segment import HEADER_BYTES
from tests.engine.page_cache import fail_direct_write
from tests.engine.sessions import end_as_sigkill, end_job
from tests.tools import answer_to_hello

BLOCK = 4096


def _config(tmp_path: Path) -> ReceiverConfig:
    return ReceiverConfig(replica_root=tmp_path / "replicas", state_root=tmp_path / "state")


def _epoch(first_lsn: int, writes: int, fill: int) -> list[Record]:
    records = [
        Record.write("d", i * BLOCK, bytes([fill]) * BLOCK).with_lsn(first_lsn + i, 1)
        for i in range(writes)
    ]
    return [*records, Record.epoch(fill).with_lsn(first_lsn + writes, 1)]


async def _feed(replica: JobReplica, records: list[Record]) -> None:
    await replica.ingest(records)
    await replica.journal.sync()
    replica.note_durable(records)


@contextlib.asynccontextmanager
async def _opened(tmp_path: Path) -> AsyncIterator[JobReplica]:
    """The job's replica as a receiver opens it (recovery included), closed after."""
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        yield replica
    finally:
        await replica.aclose()


async def _applied_once(tmp_path: Path, fill: int) -> None:
    """A job that applied one epoch of two blocks of ``fill``, then closed."""
    async with _opened(tmp_path) as replica:
        await _feed(replica, _epoch(1, 2, fill))
        assert await replica.apply_pending() == 3


def _replica(tmp_path: Path) -> bytes:
    return (tmp_path / "replicas" / "job" / "d").read_bytes()


def _fail_once(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, err: int, times: int = 1
) -> Callable[[], int]:
    """Make ``owner.name`` raise OSError(err) on its first ``times`` calls; returns a call
    counter."""
    real = getattr(owner, name)
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] <= times:
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return lambda: calls[0]


STEPS = {
    "replica write": (Applier, "apply_many"),
    "replica fsync": (Applier, "barrier"),
    "state file write": (replica_state, "save"),
}


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("step", sorted(STEPS))
async def test_a_failed_apply_step_leaves_everything_to_apply_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, err: int
) -> None:
    async with _opened(tmp_path) as replica:
        await _feed(replica, _epoch(1, 4, 0xA1))
        assert await replica.apply_pending() == 5
        owner, name = STEPS[step]
        calls = _fail_once(monkeypatch, owner, name, err)
        await _feed(replica, _epoch(6, 4, 0xB2))
        with pytest.raises((OSError, ApplyError)):
            await replica.apply_pending()
        assert calls() >= 1
        assert replica.applied_lsn == 5  # nothing counted that is not there
        saved = replica_state.load(tmp_path / "state" / "job", "job")
        assert saved is not None and saved.applied_lsn == 5
        # the same object tries again: the records come from the journal now
        assert await replica.apply_pending() == 10
        assert replica.state.consistent
    assert _replica(tmp_path) == b"\xb2" * 4 * BLOCK


async def test_a_reopened_job_applies_what_a_failed_apply_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replica = await JobReplica.open("job", _config(tmp_path))
    _fail_once(monkeypatch, Applier, "apply_many", errno.ENOSPC, times=10)
    try:
        await _feed(replica, _epoch(1, 3, 0x33))
        with pytest.raises(OSError):
            await replica.apply_pending()
    finally:
        await replica.aclose()  # its last attempt fails too: the disk is still full
    monkeypatch.undo()
    saved = replica_state.load(tmp_path / "state" / "job", "job")
    assert saved is not None and saved.applied_lsn == 0 and not saved.consistent
    async with _opened(tmp_path) as reopened:  # recovery applies the epoch
        assert reopened.applied_lsn == 4 and reopened.state.consistent
    assert _replica(tmp_path) == b"\x33" * 3 * BLOCK


MiB = 1024 * 1024


def _big_epoch(first_lsn: int, fill: int) -> list[Record]:
    """Two 2 MiB writes and their barrier: journaled writes the applier sends past the page
    cache, each in two 1 MiB direct writes (``engine/direct_writes.py``)."""
    data = bytes([fill]) * 2 * MiB
    writes = [Record.write("d", n * 2 * MiB, data).with_lsn(first_lsn + n, 1) for n in (0, 1)]
    return [*writes, Record.epoch(fill).with_lsn(first_lsn + 2, 1)]


@pytest.mark.parametrize("killed", [False, True], ids=["retried", "killed there"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_a_direct_replica_write_failing_mid_record_counts_nothing_and_converges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, killed: bool
) -> None:
    """The first 1 MiB of a 2 MiB record lands past the page cache, the second fails: the
    applied LSN stays at the last barrier, on disk too; the same job applies the epoch
    again from its journal, or, killed right there, the reopened one does."""
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        await _feed(replica, _big_epoch(1, 0xA1))
        assert await replica.apply_pending() == 3
        asked = fail_direct_write(monkeypatch, err, nth=2)
        await _feed(replica, _big_epoch(4, 0xB2))
        with pytest.raises((OSError, ApplyError)):
            await replica.apply_pending()
        assert asked == [0, MiB]  # the record's first half went past the cache, then the fault
        assert replica.applied_lsn == 3
        saved = replica_state.load(tmp_path / "state" / "job", "job")
        assert saved is not None and saved.applied_lsn == 3 and saved.point_lsn == 3
        if not killed:
            assert await replica.apply_pending() == 6 and replica.state.consistent
    finally:
        await end_job(replica, killed=killed)
    if killed:
        monkeypatch.undo()
        async with _opened(tmp_path) as reopened:  # recovery applies it
            assert reopened.applied_lsn == 6 and reopened.state.consistent
    assert _replica(tmp_path) == b"\xb2" * 4 * MiB


async def test_applying_past_the_last_barrier_is_not_a_consistency_point(tmp_path: Path) -> None:
    async with _opened(tmp_path) as replica:
        await _feed(replica, _epoch(1, 2, 0x11))
        assert await replica.apply_pending() == 3
        assert (replica.state.consistent, replica.state.point_lsn) == (True, 3)
        await _feed(replica, [Record.write("d", 0, b"\x22" * BLOCK).with_lsn(4, 7)])
        assert await replica.apply_pending(force=True) == 4  # what a --resync compare does
        assert (replica.state.consistent, replica.state.point_lsn) == (False, 3)
        await _feed(replica, [Record.epoch(2).with_lsn(5, 9)])
        assert await replica.apply_pending() == 5
        state = replica.state
        assert (state.consistent, state.point_lsn, state.point_ts_ns) == (True, 5, 9)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


async def test_damaged_state_file_is_rebuilt_from_the_journal(tmp_path: Path) -> None:
    async with _opened(tmp_path) as replica:
        await _feed(replica, _epoch(1, 3, 0x44))
        assert await replica.apply_pending() == 4
        await _feed(replica, _epoch(5, 3, 0x55))
        assert await replica.apply_pending() == 8
    state_file = tmp_path / "state" / "job" / "applied.state"
    _flip(state_file, state_file.stat().st_size - 3)
    async with _opened(tmp_path) as reopened:
        # every record still in the journal is applied again, ending at its last barrier,
        # but whether the replica was at a point (a floor, a comparison cut short) is lost
        assert reopened.applied_lsn == 8 and reopened.received_lsn == 8
        assert not reopened.state.consistent and "was damaged" in reopened.state.unknown
        assert replica_state.load(state_file.parent, "job") == reopened.state  # durable
        (refusal,) = await reopened.check_replica(adopt=False)  # a plain session
        assert refusal.startswith("the replica is not known: its replica state")
        await _feed(reopened, _epoch(9, 1, 0x66))
        assert await reopened.apply_pending() == 10
        assert not reopened.state.consistent  # no barrier is a point until compared
        with pytest.raises(ReplicaInconsistent, match="was damaged"):
            await reopened.promote()
        # a --resync session: taken as it is, then the sender's floor (it compares)
        assert await reopened.check_replica(adopt=True) == []
        await reopened.raise_point_floor(12)
        assert reopened.state.unknown == "" and reopened.state.point_floor == 12
        await _feed(reopened, _epoch(11, 1, 0x77))  # journaled before the comparison
        assert await reopened.apply_pending() == 12
        await _feed(reopened, _epoch(13, 3, 0x88))  # the comparison's epoch
        assert await reopened.apply_pending() == 16
        state = reopened.state
        assert (state.consistent, state.point_lsn, state.unknown) == (True, 16, "")
    assert _replica(tmp_path) == b"\x88" * 3 * BLOCK
    assert replica_state.load(state_file.parent, "job") == state


async def test_a_resync_that_ends_before_its_floor_leaves_the_replica_unknown(
    tmp_path: Path,
) -> None:
    """A --resync session adopts the files first; until the sender's PointFloor arrives
    nothing says a comparison will follow, so a receiver that dies in between (or a
    session that ends there) is as unknown as before, and a plain session is refused."""
    await _applied_once(tmp_path, 0x44)
    _flip(tmp_path / "state" / "job" / "applied.state", 20)
    async with _opened(tmp_path) as replica:
        assert await replica.check_replica(adopt=True) == []
    async with _opened(tmp_path) as again:
        assert "was damaged" in again.state.unknown and not again.state.consistent
        (refusal,) = await again.check_replica(adopt=False)
        assert refusal.startswith("the replica is not known")


async def test_damaged_state_file_barrier_below_the_floor_is_no_point(tmp_path: Path) -> None:
    await _applied_once(tmp_path, 0x44)
    state_file = tmp_path / "state" / "job" / "applied.state"
    _flip(state_file, 20)
    async with _opened(tmp_path) as reopened:
        await reopened.raise_point_floor(9)
        await _feed(reopened, _epoch(4, 1, 0x55))
        assert await reopened.apply_pending() == 5
        assert not reopened.state.consistent and reopened.state.point_lsn == 0


async def test_damaged_file_stamps_make_the_replica_unknown_and_it_stays_so(
    tmp_path: Path,
) -> None:
    """Without ``files.state`` an edit of the replica made meanwhile (or one already found)
    can no longer be told: unknown, saved at once, so that writing ``files.state`` again
    (every session start does) does not take the evidence away."""
    await _applied_once(tmp_path, 0x44)
    state_dir = tmp_path / "state" / "job"
    _flip(state_dir / "files.state", 30)
    (at_rest,) = receiver_jobs_at_rest(tmp_path / "state")  # as the job will open
    assert "stamps were lost" in at_rest["consistency_point"]["unknown"]
    assert at_rest["consistency_point"]["consistent"] is False
    async with _opened(tmp_path) as reopened:
        assert not reopened.state.consistent and "stamps were lost" in reopened.state.unknown
        saved = replica_state.load(state_dir, "job")
        assert saved is not None and saved.unknown == reopened.state.unknown  # at once
        (refusal,) = await reopened.check_replica(adopt=False)  # writes files.state again
        assert "stamps were lost" in refusal
    async with _opened(tmp_path) as again:
        assert "stamps were lost" in again.state.unknown  # the file is readable now


async def test_a_deleted_file_stamps_state_makes_the_replica_unknown(tmp_path: Path) -> None:
    """``files.state`` deleted (by hand, a restore that left it out) loses the same
    evidence as a damaged one: applied.state says it was saved, so its absence is a loss,
    not a job that never had stamps (which used to adopt the replica as it was)."""
    await _applied_once(tmp_path, 0x44)
    state_dir = tmp_path / "state" / "job"
    (state_dir / "files.state").unlink()
    (at_rest,) = receiver_jobs_at_rest(tmp_path / "state")  # as the job will open
    assert "files.state is missing" in at_rest["consistency_point"]["unknown"]
    assert at_rest["consistency_point"]["consistent"] is False
    async with _opened(tmp_path) as reopened:
        assert "files.state is missing" in reopened.state.unknown
        (refusal,) = await reopened.check_replica(adopt=False)  # writes files.state again
        assert "stamps were lost" in refusal
    async with _opened(tmp_path) as again:
        assert "files.state is missing" in again.state.unknown  # saved, not re-derived


async def test_an_older_applied_state_put_back_does_not_vouch_for_lost_stamps(
    tmp_path: Path,
) -> None:
    """The stamps were lost (files.state damaged), so the replica is unknown; then
    applied.state alone is put back from a backup made before, which says nothing of it.
    The stamps written since vouch only for what the replica held when they were taken:
    files.state says so itself (``lost``), and the job stays unknown until a sender
    compares it. Used to open consistent, the replica taken as it was."""
    await _applied_once(tmp_path, 0x44)
    state_dir = tmp_path / "state" / "job"
    backup = (state_dir / "applied.state").read_bytes()
    _flip(state_dir / "files.state", 30)
    async with _opened(tmp_path) as reopened:
        assert "stamps were lost" in reopened.state.unknown
        await reopened.check_replica(adopt=False)  # files.state written again
    (state_dir / "applied.state").write_bytes(backup)  # "restored from the backup"
    (at_rest,) = receiver_jobs_at_rest(tmp_path / "state")
    assert "stamps were lost" in at_rest["consistency_point"]["unknown"]
    async with _opened(tmp_path) as restored:
        assert "stamps were lost" in restored.state.unknown
        assert not restored.state.consistent
        # a sender compares (send --resync): taken as it is, and trusted from then on
        assert await restored.check_replica(adopt=True) == []
        await restored.raise_point_floor(restored.received_lsn + 1)
        assert restored.state.unknown == ""
    async with _opened(tmp_path) as compared:
        assert compared.state.unknown == ""


def _kill_at_the_state_save_after_lost_stamps(
    monkeypatch: pytest.MonkeyPatch, state_dir: Path
) -> Callable[[], int]:
    """Make the first ``applied.state`` save after a ``files.state`` save that carries
    ``lost`` (read back from disk) raise EIO, as the step a SIGKILL lands on; returns how
    many saves were failed so."""
    real_files_save, real_state_save = ReplicaFiles.save, replica_state.save
    armed, failed = [False], [0]

    def files_save(self: ReplicaFiles, folder: Path) -> None:
        real_files_save(self, folder)
        if ReplicaFiles.load(state_dir, "job").lost:
            armed[0] = True

    def state_save(folder: Path, job: str, state: replica_state.ReplicaState) -> None:
        if armed[0]:
            armed[0] = False
            failed[0] += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_state_save(folder, job, state)

    monkeypatch.setattr(ReplicaFiles, "save", files_save)
    monkeypatch.setattr(replica_state, "save", state_save)
    return lambda: failed[0]


@pytest.mark.parametrize("via", ["session start", "apply round"])
@pytest.mark.parametrize("loss", ["damaged", "deleted"])
async def test_killed_after_the_lost_stamps_are_saved_the_replica_stays_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loss: str, via: str
) -> None:
    """The stamps were lost, so the replica is unknown; ``files.state`` is then saved again
    carrying ``lost`` (by a session's start, or by an apply round with its new stamps),
    and the receiver is killed right at the next ``applied.state`` save (the round's
    first, or its last). Restarted, the loss is still seen, at rest and by the job: no
    consistency point until a sender compares."""
    await _applied_once(tmp_path, 0x44)
    state_dir = tmp_path / "state" / "job"
    if loss == "damaged":
        _flip(state_dir / "files.state", 30)
    else:
        (state_dir / "files.state").unlink()
    failed = _kill_at_the_state_save_after_lost_stamps(monkeypatch, state_dir)
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        assert replica.state.unknown and not replica.state.consistent
        if via == "session start":
            (refusal,) = await replica.check_replica(adopt=False)  # saves files.state
            assert "stamps were lost" in refusal
        await _feed(replica, _epoch(4, 2, 0x55))
        with pytest.raises(OSError):
            await replica.apply_pending()
    finally:
        await end_as_sigkill(replica)
    monkeypatch.undo()
    assert failed() == 1  # killed at that step: files.state on disk carries the loss
    assert ReplicaFiles.load(state_dir, "job").lost
    (at_rest,) = receiver_jobs_at_rest(tmp_path / "state", replica_root=tmp_path / "replicas")
    assert at_rest["consistency_point"]["consistent"] is False
    assert at_rest["consistency_point"]["unknown"]
    async with _opened(tmp_path) as reopened:  # the round is redone, and is no point
        assert reopened.applied_lsn == 6 and reopened.state.point_lsn == 3
        assert reopened.state.unknown and not reopened.state.consistent
        (refusal,) = await reopened.check_replica(adopt=False)
        assert "stamps were lost" in refusal
    async with _opened(tmp_path) as compared:  # a sender compares: a point again
        assert await compared.check_replica(adopt=True) == []
        await compared.raise_point_floor(compared.received_lsn + 1)
        await _feed(compared, _epoch(7, 1, 0x66))
        assert await compared.apply_pending() == 8
        assert compared.state.consistent and compared.state.point_lsn == 8
    assert _replica(tmp_path) == b"\x66" * BLOCK + b"\x55" * BLOCK


async def test_a_job_whose_stamps_were_never_saved_is_not_missing_them(tmp_path: Path) -> None:
    """applied.state saved before any files.state (an apply round's ``applying`` write)
    does not claim one: its absence then costs nothing."""
    state_dir = tmp_path / "state" / "job"
    state_dir.mkdir(parents=True)
    replica_state.save(state_dir, "job", replica_state.ReplicaState(applying=True))
    saved = replica_state.load(state_dir, "job")
    assert saved is not None and not saved.stamped
    async with _opened(tmp_path) as replica:
        assert replica.state.unknown == ""


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_unknown_that_cannot_be_saved_opens_nothing_and_loses_no_evidence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """The state saved at once when the stamps are lost fails: the job does not open (no
    session can rewrite files.state meanwhile), and the next open finds the same damage."""
    await _applied_once(tmp_path, 0x44)
    state_dir = tmp_path / "state" / "job"
    _flip(state_dir / "files.state", 30)
    damaged = (state_dir / "files.state").read_bytes()
    calls = _fail_once(monkeypatch, replica_state, "save", err)
    with pytest.raises(OSError):
        await JobReplica.open("job", _config(tmp_path))
    assert calls() == 1
    assert (state_dir / "files.state").read_bytes() == damaged
    saved = replica_state.load(state_dir, "job")
    assert saved is not None and saved.consistent and not saved.unknown  # not yet written
    async with _opened(tmp_path) as reopened:
        assert "stamps were lost" in reopened.state.unknown


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_a_floor_that_cannot_be_saved_leaves_the_replica_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """Clearing ``unknown`` is the floor's one durable write: when it fails, the replica is
    still unknown, in memory and on disk, and the sender's next comparing session clears
    it."""
    await _applied_once(tmp_path, 0x44)
    _flip(tmp_path / "state" / "job" / "applied.state", 20)
    async with _opened(tmp_path) as replica:
        assert replica.state.unknown
        _fail_once(monkeypatch, replica_state, "save", err)
        with pytest.raises(OSError):
            await replica.raise_point_floor(9)
        assert replica.state.unknown and replica.state.point_floor == 0
        saved = replica_state.load(tmp_path / "state" / "job", "job")
        assert saved is not None and saved.unknown
        await replica.raise_point_floor(9)
        assert (replica.state.unknown, replica.state.point_floor) == ("", 9)


async def test_damaged_file_stamps_of_a_job_with_no_history_cost_nothing(tmp_path: Path) -> None:
    state_dir = tmp_path / "state" / "job"
    state_dir.mkdir(parents=True)
    (state_dir / "files.state").write_bytes(b"garbage")
    async with _opened(tmp_path) as replica:
        assert replica.state.consistent and replica.state.unknown == ""
        assert await replica.check_replica(adopt=False) == []


async def test_a_missing_state_file_is_unknown_once_the_journal_was_trimmed(
    tmp_path: Path,
) -> None:
    """The file is written before the journal is trimmed: a trimmed journal without it
    means it was there and is gone (deleted by hand, say), and with it what it held."""
    config = dataclasses.replace(_config(tmp_path), segment_bytes=64 * 1024)
    replica = await JobReplica.open("job", config)
    try:
        for i in range(8):
            await _feed(replica, _epoch(1 + 5 * i, 4, 0x10 + i))
            assert await replica.apply_pending() == 5 + 5 * i
        assert replica.journal.first_lsn > 1
    finally:
        await replica.aclose()
    (tmp_path / "state" / "job" / "applied.state").unlink()
    reopened = await JobReplica.open("job", config)
    try:
        assert not reopened.state.consistent and "is missing" in reopened.state.unknown
        assert reopened.applied_lsn == 40 and reopened.journal.first_lsn > 1
    finally:
        await reopened.aclose()


async def test_a_new_job_without_a_state_file_is_known(tmp_path: Path) -> None:
    """Nothing was trimmed yet: the journal holds the replica's whole history, so the
    redo of all of it is exact, whatever the file said."""
    async with _opened(tmp_path) as replica:
        await replica.ingest(_epoch(1, 2, 0x44))  # journaled, not the direct path
        await _feed(replica, [])
        await replica.journal.sync()
    (tmp_path / "state" / "job" / "applied.state").unlink(missing_ok=True)
    assert (tmp_path / "state" / "job" / "journal").is_dir()
    async with _opened(tmp_path) as reopened:
        state = reopened.state
        assert (state.applied_lsn, state.consistent, state.unknown) == (3, True, "")
    assert _replica(tmp_path) == b"\x44" * 2 * BLOCK


async def test_journal_damage_below_the_applied_lsn_costs_nothing(tmp_path: Path) -> None:
    """The issue's case: a flipped byte among records applied long ago used to be cut as a
    torn tail, leaving received < applied and a job that refused every later session."""
    async with _opened(tmp_path) as replica:
        await _feed(replica, _epoch(1, 6, 0x66))
        assert await replica.apply_pending() == 7
    (segment,) = sorted((tmp_path / "state" / "job" / "journal").glob("*.seg"))
    _flip(segment, HEADER_BYTES + 2 * (58 + 1 + BLOCK) + 100)  # inside the third record
    async with _opened(tmp_path) as reopened:
        assert reopened.journal.recovery is not None
        assert reopened.journal.recovery.kind == "damage"
        assert reopened.applied_lsn == 7 and reopened.received_lsn == 7  # never below applied
        await _feed(reopened, _epoch(8, 2, 0x77))
        assert await reopened.apply_pending() == 10
    assert _replica(tmp_path) == b"\x77" * 2 * BLOCK + b"\x66" * 4 * BLOCK


async def test_journal_damage_above_the_applied_lsn_is_fetched_again(tmp_path: Path) -> None:
    """Received but not yet applied, then damaged: the journal is cut there and the
    receiver reports the lower received LSN, so the sender resends from it."""
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        await _feed(replica, _epoch(1, 2, 0x10))
        assert await replica.apply_pending() == 3
        await _feed(replica, [Record.write("d", 0, b"\x20" * BLOCK).with_lsn(4, 1)])
        await _feed(replica, [Record.write("d", BLOCK, b"\x20" * BLOCK).with_lsn(5, 1)])
    finally:
        await replica.aclose()  # no barrier after 3: records 4 and 5 wait in the journal
    (segment,) = sorted((tmp_path / "state" / "job" / "journal").glob("*.seg"))
    record = 58 + 1 + BLOCK
    epoch = 58  # an EPOCH record is a bare header
    _flip(segment, HEADER_BYTES + 2 * record + epoch + 80)  # inside lsn 4; lsn 5 is intact
    async with _opened(tmp_path) as reopened:
        assert reopened.received_lsn == 3  # the sender resends 4 onwards
        assert reopened.applied_lsn == 3
        await _feed(reopened, _epoch(4, 2, 0x30))
        assert await reopened.apply_pending() == 6
    assert _replica(tmp_path) == b"\x30" * 2 * BLOCK


# -- replica files changed outside replication --------------------------------------------


async def test_an_edit_between_applies_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    async with _opened(tmp_path) as replica:
        await _feed(replica, _epoch(1, 2, 0x01))
        assert await replica.apply_pending() == 3
        with (tmp_path / "replicas" / "job" / "d").open("r+b") as f:
            f.write(b"hand edit")  # someone booted the replica VM, say
        await _feed(replica, _epoch(4, 2, 0x02))
        with pytest.raises(ReplicaDiverged, match="changed outside replication"):
            await replica.apply_pending()
        assert replica.applied_lsn == 3
        assert await replica.check_replica(adopt=False) == [
            "'d' was changed outside replication (its ctime moved)"
        ]
    assert _replica(tmp_path).startswith(b"hand edit")  # nothing built on it
    reopened = await JobReplica.open("job", _config(tmp_path))
    try:  # remembered across restarts, until a sender compares with the replica
        assert await reopened.check_replica(adopt=False) != []
        assert await reopened.check_replica(adopt=True) == []
        assert await reopened.apply_pending() == 6
    finally:
        await reopened.aclose()
    assert _replica(tmp_path) == b"\x02" * 2 * BLOCK


@pytest.mark.parametrize("change", ["edit", "delete", "replace", "symlink"])
async def test_a_change_while_the_receiver_is_down_is_found_at_the_next_session(
    tmp_path: Path, change: str
) -> None:
    await _applied_once(tmp_path, 0x01)
    path = tmp_path / "replicas" / "job" / "d"
    if change == "edit":
        os.truncate(path, BLOCK)
    elif change == "delete":
        path.unlink()
    elif change == "replace":
        content = path.read_bytes()
        path.unlink()
        path.write_bytes(content)  # same bytes, another file
    else:
        path.unlink()
        path.symlink_to(tmp_path / "elsewhere")
    async with _opened(tmp_path) as reopened:
        (problem,) = await reopened.check_replica(adopt=False)
        assert problem.startswith("'d' ")


async def test_a_crash_mid_apply_does_not_look_like_an_edit(tmp_path: Path) -> None:
    """Our own writes past the stamps (the round never finished) are redone, not refused."""
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        await _feed(replica, _epoch(1, 2, 0x01))
        assert await replica.apply_pending() == 3
        await _feed(replica, _epoch(4, 2, 0x02))
        # the round gets as far as writing the replica, then the process dies
        state = replica.state.replace(applying=True, consistent=False)
        replica_state.save(tmp_path / "state" / "job", "job", state)
        applier = Applier(tmp_path / "replicas" / "job")
        applier.apply_many(_epoch(4, 2, 0x02)[:1])
        applier.close()
    finally:
        replica._closed = True  # no orderly close: a crash
        if replica._task is not None:
            replica._task.cancel()
        await replica.journal.aclose()
    async with _opened(tmp_path) as reopened:
        assert reopened.applied_lsn == 6 and reopened.state.consistent
        assert await reopened.check_replica(adopt=False) == []
    assert _replica(tmp_path) == b"\x02" * 2 * BLOCK


# -- hostile records ----------------------------------------------------------------------


def _raw_record(rtype: int, name: bytes, offset: int, data: bytes, lsn: int) -> bytes:
    """A record with a valid checksum whose fields Record() itself would refuse."""
    from replicator.journal.records import (
        CHECKED_HEADER_SIZE,
        RECORD_HEADER,
        RECORD_MAGIC,
        RECORD_VERSION,
        record_digest,
    )

    head = RECORD_HEADER.pack(
        RECORD_MAGIC, RECORD_VERSION, rtype, len(name), len(data), lsn, 1, offset, len(data),
        b"\0" * 16,
    )[:CHECKED_HEADER_SIZE]  # fmt: skip
    return head + record_digest(head, name, data) + name + data


async def _session_answer(tmp_path: Path, payload: bytes, first: int, last: int) -> object:
    """What a receiver answers to one Records frame carrying ``payload``."""
    from replicator.transport import Records

    async with _welcomed(tmp_path) as (_, sender, _serving):
        count = payload.count(b"RJ\x02")  # RECORD_MAGIC + RECORD_VERSION
        await sender.send(Records(first, last, count, 1, payload))
        while True:
            msg = await sender.recv(timeout=10)
            if type(msg).__name__ in ("Error", "Refuse"):
                return msg


@contextlib.asynccontextmanager
async def _welcomed(tmp_path: Path) -> AsyncIterator[tuple[Any, Any, asyncio.Task[None]]]:
    """A real Receiver serving one session over a connection pair, past its Welcome:
    (receiver, the sender's end, the session's task)."""
    from replicator.engine.receiver import Receiver
    from replicator.transport import PROTOCOL_VERSION, Hello, Welcome, connection_pair

    receiver = Receiver(_config(tmp_path))
    sender, server = await connection_pair()
    serving = asyncio.create_task(receiver.handle(server))
    try:
        await sender.send(Hello(PROTOCOL_VERSION, "job", (), ("lz4",), 0, "s"))
        assert isinstance(await answer_to_hello(sender), Welcome)
        yield receiver, sender, serving
    finally:
        await sender.aclose()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await receiver.aclose()


async def test_a_write_record_with_no_name_is_a_protocol_error(tmp_path: Path) -> None:
    """Used to be answered Error('internal') with a traceback in the receiver's log."""
    from replicator.transport import Error

    payload = _raw_record(1, b"", 0, b"x" * 512, 1)  # WRITE needs a volume name
    answer = await _session_answer(tmp_path, payload, 1, 1)
    assert isinstance(answer, Error) and answer.code == "protocol", answer
    assert "needs a volume name" in answer.message


async def test_a_write_at_an_absurd_offset_is_never_marked_applied(tmp_path: Path) -> None:
    """A WRITE at 2^62 used to be marked applied and never applied. Now the file system
    refuses it, the job says so, and the applied LSN stays where it was."""
    from replicator.transport import Error

    payload = _raw_record(1, b"d", 2**62, b"x" * 512, 1) + _raw_record(6, b"", 1, b"", 2)
    answer = await _session_answer(tmp_path, payload, 1, 2)
    assert isinstance(answer, Error) and answer.code == "storage", answer
    assert "lsn 1" in answer.message
    saved = replica_state.load(tmp_path / "state" / "job", "job")
    assert saved is None or saved.applied_lsn == 0


async def test_a_session_cut_short_never_leaves_a_frame_being_written_behind_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session ended (its link failed, the receiver closing) while its reader waited
    for the last frame's write: the write went on after the session had ended, so the
    next session could announce a resume point below it, and the records the sender then
    resent were refused as a storage error ("not after the journal's last lsn"), which
    stops a sender (the thousand-network-faults soak found it)."""
    from replicator.journal.records import encode_record
    from replicator.transport import Records

    gate = asyncio.Event()
    taken: list[int] = []
    real_receive = JobReplica.receive

    async def slow_receive(self: JobReplica, records: list[Record], encoded: Any = None) -> None:
        await gate.wait()  # a slow disk
        await real_receive(self, records, encoded)
        taken.append(records[0].lsn)

    monkeypatch.setattr(JobReplica, "receive", slow_receive)
    try:
        async with _welcomed(tmp_path) as (receiver, sender, serving):
            for first in (1, 3):  # the second frame makes the reader wait for the first
                payload = b"".join(encode_record(r) for r in _epoch(first, 1, first))
                await sender.send(Records(first, first + 1, 2, 1, payload))
            await asyncio.sleep(0.3)
            serving.cancel()  # the session ends while the first frame is being written
            await asyncio.sleep(0.3)
            replica = await receiver.job("job")
            assert taken == [] and replica.session_lock.locked()  # the session waits for it
            gate.set()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            assert taken == [1]  # written before the session ended; the second never taken
    finally:
        gate.set()


@pytest.mark.parametrize("failure", ["full disk", "our fault"])
async def test_a_frame_the_replica_could_not_take_leaves_no_task_unretrieved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """A frame whose write failed (a full disk) is answered Error('storage') and the
    session ends; its write task, failed, used to be left with nobody reading its
    exception, and asyncio logged "Task exception was never retrieved" with a traceback
    in the receiver's log (found with a receiver on a full ext4)."""
    import gc

    from structlog.testing import capture_logs

    from replicator.journal.records import encode_record
    from replicator.transport import Records

    unretrieved: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unretrieved.append(str(context["message"])))

    async def fails(self: JobReplica, records: list[Record], encoded: Any = None) -> None:
        if failure == "full disk":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("a bug")  # not one the session answers: it must still be told

    monkeypatch.setattr(JobReplica, "receive", fails)
    payload = b"".join(encode_record(r) for r in _epoch(1, 1, 1))
    try:
        with capture_logs() as logs:
            if failure == "full disk":
                answer = await _session_answer(tmp_path, payload, 1, 2)
                assert getattr(answer, "code", None) == "storage", answer
            else:
                async with _welcomed(tmp_path) as (_, sender, _serving):
                    await sender.send(Records(1, 2, 2, 1, payload))
                    await asyncio.sleep(0.3)  # the write fails; then the sender goes
        gc.collect()
        assert unretrieved == []
        events = [entry["event"] for entry in logs]
        assert ("receiver.write_failed" in events) == (failure == "our fault"), events
    finally:
        loop.set_exception_handler(None)


async def test_a_manifest_request_for_a_bad_name_ends_the_session_with_that_error(
    tmp_path: Path,
) -> None:
    """Used to answer Error('name') and read on: the next Ping found the connection closed
    and the sender got Error('internal'), the receiver's log a traceback."""
    from replicator.transport import Error, ManifestRequest

    async with _welcomed(tmp_path) as (_, sender, serving):
        await sender.send(ManifestRequest(1, "../../etc/passwd", 65536, True))
        answer = await sender.recv(timeout=10)
        while type(answer).__name__ == "Ping":  # the receiver's pinger may come first
            answer = await sender.recv(timeout=10)
        assert isinstance(answer, Error) and answer.code == "name", answer
        await asyncio.wait_for(serving, 10)  # the session is over, not waiting for more


async def test_a_floor_above_what_was_received_replaces_a_higher_one(tmp_path: Path) -> None:
    """Only a comparing session sends a floor, numbered above what the receiver holds, and
    its comparison's epoch comes at or after it: so it replaces any earlier floor, even a
    higher one no sender will reach."""
    await _applied_once(tmp_path, 0x44)
    async with _opened(tmp_path) as replica:
        await replica.raise_point_floor(2**64 - 1)
        await _feed(replica, _epoch(4, 1, 0x55))
        assert await replica.apply_pending() == 5
        wedged = replica.state
        assert not wedged.consistent and wedged.point_lsn == 3
        await replica.raise_point_floor(6)
        assert replica.state.point_floor == 6
        await _feed(replica, _epoch(6, 1, 0x66))
        assert await replica.apply_pending() == 7
        healed = replica.state  # a new state object: mypy narrowed the old one
        assert healed.consistent and healed.point_lsn == 7
    saved = replica_state.load(tmp_path / "state" / "job", "job")
    assert saved is not None and (saved.point_floor, saved.point_lsn) == (6, 7)


async def test_a_floor_at_or_below_what_was_received_only_raises(tmp_path: Path) -> None:
    """Records received under a floor wait in the journal: a floor at or below them (no
    conforming sender sends one) must not make their barriers points."""
    await _applied_once(tmp_path, 0x44)
    async with _opened(tmp_path) as replica:
        await replica.raise_point_floor(100)
        await _feed(replica, _epoch(4, 1, 0x55))  # received, not applied yet
        await replica.raise_point_floor(4)
        assert replica.state.point_floor == 100
        assert await replica.apply_pending() == 5
        assert not replica.state.consistent and replica.state.point_lsn == 3


PROMOTION_STEPS = {
    "file stamps": (ReplicaFiles, "save"),
    "promoted.state": (job_replica, "save_promotion"),
    "applied.state": (replica_state, "save"),
}


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("step", sorted(PROMOTION_STEPS))
async def test_a_promotion_whose_durable_step_fails_is_all_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, err: int
) -> None:
    """Each durable write of a failover failing once: the failover fails, and this
    process is promoted exactly when a restarted one would be (``promoted.state`` is the
    truth); running it again promotes once, at the same generation, as a restart does."""
    await _applied_once(tmp_path, 0x44)
    state_dir = tmp_path / "state" / "job"
    async with _opened(tmp_path) as replica:
        before = replica.state.generation
        calls = _fail_once(monkeypatch, *PROMOTION_STEPS[step], err)
        # after promoted.state the failure says the job IS promoted (PromotedUnfinished)
        failure = PromotedUnfinished if step == "applied.state" else OSError
        with pytest.raises(failure):
            await replica.promote()
        assert calls() == 1
        on_disk = load_promotion(state_dir)
        assert (replica.promotion is None) == (on_disk is None)
        assert (on_disk is None) == (step != "applied.state")
        promotion = await replica.promote()
        assert promotion.generation == before + 1 and promotion.point_lsn == 3
        assert load_promotion(state_dir) == promotion
        saved = replica_state.load(state_dir, "job")
        assert saved is not None and saved.generation == promotion.generation
    async with _opened(tmp_path) as reopened:
        assert reopened.promotion == promotion
        assert reopened.state.generation == promotion.generation
    assert _replica(tmp_path) == b"\x44" * 2 * BLOCK


async def test_a_hello_of_another_protocol_version_is_refused_and_logged(tmp_path: Path) -> None:
    """Every other refusal logged `receiver.refused`; this one nothing at all."""
    from replicator.engine.receiver import Receiver
    from replicator.transport import PROTOCOL_VERSION, Hello, Refuse, connection_pair
    from replicator.transport.frames import encode_frame

    receiver = Receiver(_config(tmp_path))
    sender, server = await connection_pair()
    try:
        with structlog.testing.capture_logs() as logs:
            serving = asyncio.create_task(receiver.handle(server))
            newer = Hello(PROTOCOL_VERSION + 1, "job", (), ("lz4",), 0, "s")
            transport = sender._transport
            assert transport is not None
            transport.write(b"".join(encode_frame(newer).buffers))  # as a newer peer would
            answer = await sender.recv(timeout=10)
            await asyncio.wait_for(serving, 10)
    finally:
        await sender.aclose()
        await receiver.aclose()
    assert isinstance(answer, Refuse) and answer.code == "version", answer
    refused = [e for e in logs if e["event"] == "receiver.refused"]
    assert [e["code"] for e in refused] == ["version"], logs
