"""The receiver applies from memory when it can, from its journal when it must."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.engine import job_replica
from replicator.engine.durable_tail import KeptMemory
from replicator.engine.receiver import JobReplica, ReceiverConfig
from replicator.engine.source_clock import lag_seconds
from replicator.journal import Record

MIB = 1024 * 1024


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
        await replica.take_durable()
        barrier = [Record.flush().with_lsn(4, 1)]
        await replica.ingest(barrier)
        await replica.journal.sync()
        replica.note_durable(barrier)
        assert await replica.apply_pending() == 4
    finally:
        await replica.aclose()
    data = (tmp_path / "replicas" / "job" / "d").read_bytes()
    assert data == b"a" * 4096 + b"b" * 4096


async def test_a_barrier_among_records_a_dead_session_left_unhanded_is_applied(
    tmp_path: Path,
) -> None:
    """Their barrier used to be known only to a job opened afresh: the running applier
    waited for the next one a session shipped (and a failover through it promoted the
    point before), while the same files at rest gave the newer point."""
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        first = [Record.write("d", 0, b"a" * 4096).with_lsn(1, 1), Record.flush().with_lsn(2, 1)]
        await _durable_records(replica, first)
        assert await replica.apply_pending() == 2
        # appended, then made durable without being handed over, barrier and all
        await replica.ingest(
            [Record.write("d", 4096, b"b" * 4096).with_lsn(3, 1), Record.flush().with_lsn(4, 1)]
        )
        await replica.ingest([Record.write("d", 0, b"c" * 4096).with_lsn(5, 1)])
        await replica.journal.sync()
        await replica.take_durable()
        assert replica.last_barrier == 4  # not 5: nothing past the last barrier is applied
        assert await replica.apply_pending() == 4
        # what the next session hands over again is passed over, not kept twice
        replica.note_durable([Record.write("d", 0, b"c" * 4096).with_lsn(5, 1)])
        assert len(replica._tail) == 0
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
        assert remote.slice(0, remote.count) == ExtentManifest.of_file(spec.path, 4096).slice(
            0, remote.count
        )
        assert await link.request_manifest("missing.img", 4096) is None
        assert not link._answer_queues  # each request's queue gone with its answer
        await link.goodbye()
    finally:
        await link.aclose()
        await serving
        await receiver.aclose()
        await journal.aclose()


async def test_memory_dropped_during_a_round_is_made_up_from_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records arriving faster than they are applied make the receiver drop its memory
    copy, possibly while a round applies from it: the round then reads the rest from the
    journal (a kill cycle saw "records up to lsn 16296 should be durable here, but they
    end at 11869" once the credit window let more arrive meanwhile)."""
    monkeypatch.setattr(job_replica, "APPLY_BATCH_BYTES", 4096)  # one apply_many per write
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        first = [
            Record.write("d", i * 4096, bytes([i + 1]) * 4096).with_lsn(i + 1, 1) for i in range(8)
        ]
        first.append(Record.flush().with_lsn(9, 1))
        more = [Record.write("d", 0, b"z" * 4096).with_lsn(10, 1), Record.flush().with_lsn(11, 1)]
        await replica.ingest(first + more)
        await replica.journal.sync()
        applier = replica._get_applier()
        apply_many = applier.apply_many
        loop = asyncio.get_running_loop()
        arrived = threading.Event()

        def arrive() -> None:
            replica.note_durable(more)
            arrived.set()

        def first_batch_then_more_arrives(batch: list[Record], **kwargs: bool) -> None:
            if not arrived.is_set():  # mid-round: the next records push memory over its cap
                replica._tail.cap = 0
                loop.call_soon_threadsafe(arrive)
                assert arrived.wait(10)
            apply_many(batch, **kwargs)

        monkeypatch.setattr(applier, "apply_many", first_batch_then_more_arrives)
        # the job's own apply loop and this call race for the round up to lsn 9; whichever
        # takes it applies its first record from memory and the rest from the journal
        replica.note_durable(first)
        assert await replica.apply_pending() in (9, 11)
        assert arrived.is_set()
        assert await replica.apply_pending() == 11
        assert replica.failure is None  # the job's own apply task saw no error either
    finally:
        await replica.aclose()
    data = (tmp_path / "replicas" / "job" / "d").read_bytes()
    assert data == b"z" * 4096 + b"".join(bytes([i + 1]) * 4096 for i in range(1, 8))


async def _durable(replica: JobReplica, records: list[Record]) -> None:
    await replica.ingest(records)
    await replica.journal.sync()
    replica.note_durable(records)


async def test_a_first_sync_is_applied_as_it_arrives_and_is_no_consistency_point_until_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from replicator.engine.errors import ReplicaInconsistent

    monkeypatch.setattr(job_replica, "EAGER_APPLY_BYTES", 8192)
    replica = await JobReplica.open("job", _config(tmp_path))
    target = tmp_path / "replicas" / "job" / "d"
    try:
        await _durable(replica, [Record.write("d", 0, b"x" * 4096).with_lsn(1, 1)])
        assert await replica.apply_pending() == 0  # below a round's worth: waits
        await _durable(replica, [Record.write("d", 4096, b"y" * 8192).with_lsn(2, 1)])
        assert await replica.apply_pending() == 2  # no earlier point to keep: written now
        assert target.read_bytes() == b"x" * 4096 + b"y" * 8192
        assert not replica.state.consistent and replica.state.point_lsn == 0
        with pytest.raises(ReplicaInconsistent):  # half a first sync is never promoted
            await replica.promote()
        await _durable(replica, [Record.epoch(1).with_lsn(3, 1)])
        assert await replica.apply_pending() == 3
        done = replica.state  # a new state object: mypy narrowed the old one
        assert done.consistent and done.point_lsn == 3
    finally:
        await replica.aclose()


async def test_after_its_first_point_a_replica_moves_only_from_barrier_to_barrier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_replica, "EAGER_APPLY_BYTES", 8192)
    replica = await JobReplica.open("job", _config(tmp_path))
    target = tmp_path / "replicas" / "job" / "d"
    try:
        await _durable(
            replica,
            [Record.write("d", 0, b"a" * 4096).with_lsn(1, 1), Record.epoch(1).with_lsn(2, 1)],
        )
        assert await replica.apply_pending() == 2
        big = [Record.write("d", 0, b"b" * 65536).with_lsn(3, 1)]
        await _durable(replica, big)
        assert await replica.apply_pending() == 2  # the point at lsn 2 is kept
        assert target.read_bytes() == b"a" * 4096
        assert replica.state.consistent and replica.state.point_lsn == 2
    finally:
        await replica.aclose()


async def test_a_failed_first_sync_round_moves_nothing_and_the_next_one_converges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An eager round is a round like any other: a write failing in it (ENOSPC) leaves
    the applied LSN where it was, and the records are applied again from the journal."""
    import errno

    from replicator.engine.applier import Applier

    monkeypatch.setattr(job_replica, "EAGER_APPLY_BYTES", 8192)
    real = Applier.apply_many
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def flaky(self: Applier, records: list[Record], **kwargs: bool) -> None:
        if failures:
            raise failures.pop()
        real(self, records, **kwargs)

    monkeypatch.setattr(Applier, "apply_many", flaky)
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        await _durable(replica, [Record.write("d", 0, b"z" * 16384).with_lsn(1, 1)])
        with pytest.raises(OSError):
            await replica.apply_pending()
        assert replica.applied_lsn == 0 and not replica.state.consistent
        await _durable(replica, [Record.write("d", 16384, b"w" * 16384).with_lsn(2, 1)])
        assert await replica.apply_pending() == 2  # from the journal: lsn 1 too
        await _durable(replica, [Record.epoch(1).with_lsn(3, 1)])
        assert await replica.apply_pending() == 3
        done = replica.state
        assert done.consistent and done.point_lsn == 3
    finally:
        await replica.aclose()
    assert (tmp_path / "replicas" / "job" / "d").read_bytes() == b"z" * 16384 + b"w" * 16384


def _count_journal_reads(replica: JobReplica, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The LSNs the replica reads back from its journal (not from memory), in order."""
    read_back: list[int] = []
    real = replica.journal.read_from

    async def counted(lsn: int) -> AsyncGenerator[Record, None]:
        async with contextlib.aclosing(real(lsn)) as records:
            async for record in records:
                read_back.append(record.lsn)
                yield record

    monkeypatch.setattr(replica.journal, "read_from", counted)
    return read_back


async def test_a_receiver_that_fell_behind_applies_from_memory_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory keeps the newest records when the applier falls behind: the applier reads
    the older ones from the journal and comes back to memory for the rest. (It used to
    drop memory whole and take it back only once nothing durable was left unapplied,
    which under a steady stream, with records always durable after the last barrier,
    never happened: every record was read back from the journal from then on.)"""
    replica = await JobReplica.open("job", _config(tmp_path))
    read_back = _count_journal_reads(replica, monkeypatch)
    page = 4096
    replica._tail.cap = 3 * Record.write("d", 0, b"x" * page).encoded_size
    try:
        epoch = [
            Record.write("d", i * page, bytes([i + 1]) * page).with_lsn(i + 1, 1) for i in range(8)
        ]
        epoch.append(Record.flush().with_lsn(9, 1))
        await _durable(replica, epoch)  # over the cap: the oldest are dropped
        # a steady stream: the next epoch has begun before this one is applied
        await _durable(replica, [Record.write("d", 0, b"y" * page).with_lsn(10, 1)])
        assert await replica.apply_pending() == 9
        assert read_back and max(read_back) < 9  # the newest came from memory already
        before = len(read_back)
        await _durable(
            replica,
            [Record.write("d", page, b"z" * page).with_lsn(11, 1), Record.flush().with_lsn(12, 1)],
        )
        assert await replica.apply_pending() == 12
        assert read_back[before:] == []  # all from memory: it came back
    finally:
        await replica.aclose()
    data = (tmp_path / "replicas" / "job" / "d").read_bytes()
    assert data == b"y" * page + b"z" * page + b"".join(bytes([i + 1]) * page for i in range(2, 8))


@dataclass
class _Model:
    """What the replica file must hold: every durable write in LSN order."""

    writes: list[tuple[int, int, bytes]] = field(default_factory=list)  # (lsn, offset, data)
    lsn: int = 0
    barrier: int = 0  # the last barrier

    def content_at(self, lsn: int) -> bytes:
        image = bytearray()
        for at, offset, data in self.writes:
            if at > lsn:
                break
            end = offset + len(data)
            image.extend(bytes(max(0, end - len(image))))  # a write past the end grows it
            image[offset:end] = data
        return bytes(image)

    def batch(self, pages: list[int], barrier: bool) -> list[Record]:
        records = []
        for page in pages:
            self.lsn += 1
            data = self.lsn.to_bytes(4, "big") * 1024
            self.writes.append((self.lsn, page * 4096, data))
            records.append(Record.write("d", page * 4096, data).with_lsn(self.lsn, 1))
        if barrier:
            self.lsn += 1
            self.barrier = self.lsn
            records.append(Record.flush().with_lsn(self.lsn, 1))
        return records


_STEP = st.one_of(
    st.tuples(st.just("note"), st.lists(st.integers(0, 7), min_size=1, max_size=6), st.booleans()),
    st.tuples(
        st.just("orphans"), st.lists(st.integers(0, 7), min_size=1, max_size=3), st.booleans()
    ),
    st.tuples(st.just("cap"), st.integers(0, 12), st.just(False)),
    st.tuples(st.just("apply"), st.just(0), st.booleans()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(_STEP, min_size=1, max_size=25))
def test_memory_and_journal_together_apply_every_record_once_in_order(
    steps: list[tuple[str, Any, bool]],
) -> None:
    """Whatever memory keeps or drops (its cap changing under it), records a dead session
    left unhanded, rounds forced or not: the replica holds exactly the writes up to the
    applied LSN, and at the end every durable record is applied."""

    async def run(root: Path) -> None:
        model = _Model()
        replica = await JobReplica.open("job", _config(root))
        target = root / "replicas" / "job" / "d"
        try:
            for kind, arg, flag in steps:
                if kind == "note":
                    await _durable(replica, model.batch(arg, flag))
                elif kind == "orphans":  # appended and synced, never handed over
                    await replica.ingest(model.batch(arg, flag))
                    await replica.journal.sync()
                    await replica.take_durable()
                elif kind == "cap":
                    replica._tail.cap = arg * 4200
                else:
                    before = replica.applied_lsn
                    applied = await replica.apply_pending(force=flag)
                    # every durable barrier counts, handed over or not
                    assert applied == (model.lsn if flag else max(before, model.barrier))
                async with replica._apply_lock:  # the job's own apply loop is between rounds
                    applied = replica.applied_lsn
                    found = target.read_bytes() if target.exists() else b""
                assert found == model.content_at(applied), f"wrong replica at lsn {applied}"
                assert replica.failure is None
            assert await replica.apply_pending(force=True) == model.lsn
            assert replica.failure is None
        finally:
            await replica.aclose()
        assert (target.read_bytes() if target.exists() else b"") == model.content_at(model.lsn)

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp)))


async def _durable_records(replica: JobReplica, records: list[Record]) -> None:
    await replica.ingest(records)
    await replica.journal.sync()
    replica.note_durable(records)


async def test_jobs_behind_together_keep_no_more_than_the_receivers_limit(
    tmp_path: Path,
) -> None:
    """Each job kept up to a backlog and a window (194 MiB) of records for its applier, so
    a receiver with many jobs behind held that much per job. All jobs together keep at
    most ``kept_max``; what does not fit is read back from the journals, and every
    replica ends exactly as sent."""
    config = dataclasses.replace(_config(tmp_path), kept_max=3 * MIB)
    kept = KeptMemory(config.kept_max)
    jobs = [await JobReplica.open(f"job{i}", config, kept) for i in range(3)]
    try:
        for replica in jobs:  # a first point, so the rest waits for a barrier
            await _durable_records(replica, [Record.epoch(1).with_lsn(1, 1)])
            assert await replica.apply_pending() == 1
        for step in range(4):
            for i, replica in enumerate(jobs):
                data = bytes([i * 16 + step]) * MIB
                await _durable_records(
                    replica, [Record.write("d", step * MIB, data).with_lsn(2 + step, 1)]
                )
                assert kept.bytes <= config.kept_max
        assert 2 * MIB < kept.bytes <= 3 * MIB
        behind = max(range(3), key=lambda i: jobs[i]._tail.bytes)
        held = kept.bytes - jobs[behind]._tail.bytes
        assert held < kept.bytes
        await jobs[behind].aclose()  # a job closed behind gives its memory back
        assert kept.bytes == held
        jobs[behind] = await JobReplica.open(f"job{behind}", config, kept)
        for replica in jobs:
            await _durable_records(replica, [Record.epoch(2).with_lsn(6, 1)])
            assert await replica.apply_pending() == 6
        assert kept.bytes == 0
    finally:
        for replica in jobs:
            await replica.aclose()
    assert kept.bytes == 0
    for i in range(3):
        data = (tmp_path / "replicas" / f"job{i}" / "d").read_bytes()
        assert data == b"".join(bytes([i * 16 + step]) * MIB for step in range(4))


async def test_a_point_applied_at_a_restart_is_converted_with_the_last_offset(
    tmp_path: Path,
) -> None:
    """A source an hour ahead; the receiver stops with a point 40 s old in its journal and
    applies it when it opens again, before any session tells the clock's offset: it takes
    the offset its last point was converted with, and the lag reads the point's 40 s
    (it read 0: the stamp, an hour ahead, taken no later than the apply)."""
    second, skew = 10**9, 3600 * 10**9
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        replica.source_offset_ns = skew  # as a session's Pings told it
        now = time.time_ns()
        first = [Record.write("d", 0, b"a" * 4096), Record.flush()]
        first = [r.with_lsn(i, now + skew) for i, r in enumerate(first, 1)]
        await replica.ingest(first)
        await replica.journal.sync()
        replica.note_durable(first)
        assert await replica.apply_pending() == 2
        assert abs(replica.state.point_target_ns - now) < 5 * second
        late = now + skew - 40 * second  # a point taken 40 s ago, not applied yet
        backlog = [Record.write("d", 0, b"b" * 4096), Record.flush()]
        await replica.ingest([r.with_lsn(i, late) for i, r in enumerate(backlog, 3)])
        await replica.journal.sync()

        async def stopped(force: bool = False) -> int:  # the receiver stops first
            return replica.state.applied_lsn

        replica.apply_pending = stopped  # type: ignore[method-assign]
    finally:
        await replica.aclose()
    reopened = await JobReplica.open("job", _config(tmp_path))
    try:
        state = reopened.state
        assert (state.applied_lsn, state.point_lsn, state.point_ts_ns) == (4, 4, late)
        lag = lag_seconds(time.time_ns(), state.point_ts_ns, state.point_target_ns)
        assert lag is not None and 40 <= lag < 60
        assert reopened.source_offset_ns is None  # status claims no estimate of its own
    finally:
        await reopened.aclose()
