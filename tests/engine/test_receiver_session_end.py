"""Records a session appended and never handed over (it ended between its append and its
sync) count like any other once durable: the running receiver applies the epochs they
complete, its status says so, and a failover through it promotes the point that the same
folder at rest gives. Before, their barriers were known only to a job opened afresh: the
running applier waited for the next barrier a sender shipped, and `failover --force`
through the running receiver promoted an older point than the one found at rest."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from replicator.cli.status_cmd import _state
from replicator.engine.at_rest import receiver_jobs_at_rest
from replicator.engine.failover import failover_at_rest
from replicator.engine.receiver import JobReplica, Receiver, ReceiverConfig
from replicator.engine.receiver_session import Session
from replicator.journal import Record
from replicator.journal.records import encode_record
from replicator.transport import (
    PROTOCOL_VERSION,
    FramedConnection,
    Hello,
    Records,
    Welcome,
    connection_pair,
)
from tests.tools import answer_to_hello

BLOCK = 4096
FIRST = 3  # epoch one: lsn 1-3, applied and acknowledged
SECOND = 6  # epoch two: lsn 4-6, appended by a session cut before it handed them over


def _config(tmp_path: Path) -> ReceiverConfig:
    return ReceiverConfig(replica_root=tmp_path / "replicas", state_root=tmp_path / "state")


def _epoch(first_lsn: int, fill: int, *, barrier: bool = True) -> Records:
    """Two blocks of ``fill`` and an EPOCH (without ``barrier``: not yet), as one Records
    frame."""
    records = [
        Record.write("d", i * BLOCK, bytes([fill]) * BLOCK).with_lsn(first_lsn + i, 1)
        for i in range(2)
    ]
    if barrier:
        records.append(Record.epoch(fill).with_lsn(first_lsn + 2, 1))
    payload = b"".join(encode_record(r) for r in records)
    return Records(first_lsn, records[-1].lsn, len(records), 1, payload)


@contextlib.asynccontextmanager
async def _session(
    receiver: Receiver, generation: int
) -> AsyncIterator[tuple[FramedConnection, Welcome, asyncio.Task[None]]]:
    """A session of job ``job`` past its Welcome: (the sender's end, the Welcome, the
    session's task); on exit the sender's end is cut and the session has ended."""
    sender, server = await connection_pair()
    serving = asyncio.create_task(receiver.handle(server))
    try:
        await sender.send(Hello(PROTOCOL_VERSION, "job", (), ("lz4",), generation, "s"))
        welcome = await answer_to_hello(sender)
        assert isinstance(welcome, Welcome), welcome
        yield sender, welcome, serving
    finally:
        sender.abort()
        await serving


async def _applied(replica: JobReplica, lsn: int, timeout: float = 5) -> int:
    """The applied LSN once it reaches ``lsn``, or where it stands after ``timeout``."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout), replica.applied_changed:
            await replica.applied_changed.wait_for(lambda: replica.applied_lsn >= lsn)
    return replica.applied_lsn


async def _cut(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, *, during_sync: bool
) -> tuple[JobReplica, int]:
    """Session one: epoch one applied, then epoch two appended to the receive journal and
    the session cut before its sync task ran, or (``during_sync``) once that task had
    made them durable but before it handed them over. Returns the job and its
    generation."""
    async with _session(receiver, 0) as (sender, welcome, _):
        replica = await receiver.job("job")
        await sender.send(_epoch(1, 1))
        assert await _applied(replica, FIRST) == FIRST
        taken = asyncio.Event()  # the frame is in the journal (durable: ``during_sync``)
        with monkeypatch.context() as patched:
            if during_sync:
                make_durable = JobReplica.make_durable

                async def durable_then_cut(self: JobReplica) -> None:
                    await make_durable(self)
                    taken.set()
                    await asyncio.Event().wait()  # the session ends here

                patched.setattr(JobReplica, "make_durable", durable_then_cut)
            else:
                patched.setattr(Session, "_wake_syncer", lambda self: taken.set())
            await sender.send(_epoch(FIRST + 1, 2))
            async with asyncio.timeout(5):
                await taken.wait()
        assert replica.journal.last_lsn == SECOND
        # never acknowledged as received: that needs the hand-over the cut prevents
        assert replica.received_lsn == (SECOND if during_sync else FIRST)
    return replica, max(welcome.generation, 1)


async def _running_view(receiver: Receiver, replica: JobReplica) -> None:
    """The applier, the status and a failover through the running receiver all take
    epoch two."""
    assert await _applied(replica, SECOND) == SECOND
    status = await replica.status.snapshot()
    assert status["consistency_point"]["lsn"] == SECOND, status
    assert status["consistency_point"]["consistent"], status
    promotion, _ = await receiver.failover("job")
    assert promotion.point_lsn == SECOND and promotion.consistent


@pytest.mark.parametrize("during_sync", [False, True], ids=["before sync", "during sync"])
@pytest.mark.parametrize("next_session", [False, True], ids=["alone", "next session"])
@pytest.mark.parametrize("where", ["running", "at rest"])
async def test_a_session_cut_before_it_handed_records_over_loses_no_point(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    during_sync: bool,
    next_session: bool,
    where: str,
) -> None:
    """Alone: no session follows (a sender that never comes back); next session: the
    sender's next session makes them durable before its Welcome. At rest is the
    reference: the same folder, the receiver stopped, failed over from its files."""
    config = _config(tmp_path)
    receiver = Receiver(config)
    try:
        replica, generation = await _cut(receiver, monkeypatch, during_sync=during_sync)
        if next_session:
            async with _session(receiver, generation) as (_, welcome, _):
                # the sender resends from here: nothing it sent is appended twice
                assert welcome.received_lsn == SECOND
                if where == "running":  # while the next session is connected
                    await _running_view(receiver, replica)
        elif where == "running":
            await _running_view(receiver, replica)
    finally:
        await receiver.aclose()
    if where == "at rest":
        result = await failover_at_rest(config, "job")
        assert result.point_lsn == SECOND and result.consistent
    replica_file = (tmp_path / "replicas" / "job" / "d").read_bytes()
    assert replica_file == bytes([2]) * 2 * BLOCK


async def test_status_at_rest_names_an_epoch_durable_past_the_applied_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files a receiver killed right after it made epoch two durable leaves: `status`
    at rest said point 3 and nothing pending, while its start (and a failover at rest)
    applies up to 6; it names 6 as pending now."""
    config = _config(tmp_path)
    receiver = Receiver(config)
    try:
        async with _session(receiver, 0) as (sender, _, _):
            replica = await receiver.job("job")
            await sender.send(_epoch(1, 1))
            assert await _applied(replica, FIRST) == FIRST
            durable = asyncio.Event()
            make_durable = JobReplica.make_durable

            async def durable_then_stuck(self: JobReplica) -> None:
                await make_durable(self)
                durable.set()
                await asyncio.Event().wait()  # killed here, as far as the files tell

            with monkeypatch.context() as patched:
                patched.setattr(JobReplica, "make_durable", durable_then_stuck)
                await sender.send(_epoch(FIRST + 1, 2))
                async with asyncio.timeout(5):
                    await durable.wait()
                (job,) = receiver_jobs_at_rest(config.state_root)
    finally:
        await receiver.aclose()
    point = job["consistency_point"]
    assert (point["lsn"], point["pending_lsn"], job["recovery_pending"]) == (FIRST, SECOND, True)
    assert f"apply pending up to LSN {SECOND}" in _state(job)
    # applied since (the receiver's close): nothing pending any more
    (after,) = receiver_jobs_at_rest(config.state_root)
    assert after["consistency_point"]["lsn"] == SECOND
    assert after["consistency_point"]["pending_lsn"] is None and not after["recovery_pending"]


async def test_a_close_during_an_apply_rounds_state_write_leaves_one_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver closes while its applier's thread writes ``applied.state``: the
    cancelled round's write was left running while the close's own apply wrote the same
    file through the same temporary name: the older state landed last here (applied 3,
    an apply under way), or, the two at once, the second rename failed (ENOENT,
    swallowed: the epoch was left unapplied). Now the close waits for that write."""
    import threading

    from replicator.engine import replica_state

    config = _config(tmp_path)
    receiver = Receiver(config)
    real_save = replica_state.save
    writing = threading.Event()

    def slow_save(*args: object, **kwargs: object) -> None:
        if not writing.is_set():  # the round's first write only: the close's are quick
            writing.set()
            time.sleep(0.3)  # the close comes meanwhile
        real_save(*args, **kwargs)  # type: ignore[arg-type]

    try:
        async with _session(receiver, 0) as (sender, _, _):
            replica = await receiver.job("job")
            await sender.send(_epoch(1, 1))
            assert await _applied(replica, FIRST) == FIRST
            monkeypatch.setattr(replica_state, "save", slow_save)
            await sender.send(_epoch(FIRST + 1, 2))
            async with asyncio.timeout(5):
                await asyncio.to_thread(writing.wait)
            await replica.aclose()  # while the round's first state write runs
    finally:
        monkeypatch.setattr(replica_state, "save", real_save)
        await receiver.aclose()
    # every write a thread still runs lands (as a process's exit waits for them)
    await asyncio.get_running_loop().shutdown_default_executor()
    (job,) = receiver_jobs_at_rest(config.state_root)
    assert job["consistency_point"]["lsn"] == SECOND, job
    assert not job["recovery_pending"], job


async def _epoch_one_applied(
    receiver: Receiver, sender: FramedConnection, welcome: Welcome
) -> tuple[int, JobReplica]:
    """Epoch one sent and applied: the session's generation, and the job."""
    generation = max(welcome.generation, 1)
    replica = await receiver.job("job")
    await sender.send(_epoch(1, 1))
    assert await _applied(replica, FIRST) == FIRST
    return generation, replica


@pytest.mark.parametrize("where", ["session end", "sync"])
async def test_records_whose_journal_fsync_failed_are_never_acknowledged_as_received(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """fsyncgate: the receive journal's fdatasync fails with EIO (the kernel dropped the
    pages it could not write) at the end of a session that had not synced epoch two, or
    in that session's own sync; the job is reopened for the next session, whose open
    fdatasyncs the journal again, and that one succeeds without writing anything. The
    Welcome said received 5 while the disk held 3: a power cut then lost records the
    sender had been told were durable (and trims). (Epoch two's writes only, its EPOCH
    still to come: a complete epoch would be applied, into the replica, from the page
    cache's copy, and so be durable after all.) Now the journal's open writes its last
    segment's records again before that fdatasync, so what it counts is on the disk."""
    from replicator.engine.job_replica import JobReplica as Job
    from tests.faultfs import powered

    fs = powered(tmp_path / "real", tmp_path / "mnt")
    try:
        config = _config(tmp_path / "mnt")
        receiver = Receiver(config)
        try:
            async with _session(receiver, 0) as (sender, welcome, _):
                generation, replica = await _epoch_one_applied(receiver, sender, welcome)
                rule = fs.add("fsync", errno.EIO, path="*.seg", times=1)
                with monkeypatch.context() as patched:
                    if where == "session end":  # the session's sync never runs
                        taken = asyncio.Event()
                        patched.setattr(Session, "_wake_syncer", lambda self: taken.set())
                        await sender.send(_epoch(FIRST + 1, 2, barrier=False))
                        async with asyncio.timeout(5):
                            await taken.wait()
                    else:
                        await sender.send(_epoch(FIRST + 1, 2, barrier=False))
                        with contextlib.suppress(ConnectionError, TimeoutError):
                            while True:  # the receiver says why and ends the session
                                await sender.recv(timeout=5)
                    assert replica.journal.last_lsn == SECOND - 1
            await asyncio.to_thread(fs.wait_for_hit, rule)
            assert replica.broken  # the journal refuses everything after the failure
            async with _session(receiver, generation) as (_, welcome, _):
                acknowledged = welcome.received_lsn
        finally:
            await receiver.aclose()
        fs.power_cut()
    finally:
        fs.stop()
    after = await Job.open("job", _config(tmp_path / "real"))
    try:
        assert after.received_lsn >= acknowledged, (after.received_lsn, acknowledged)
    finally:
        await after.aclose()


async def test_a_session_end_that_cannot_sync_says_so_and_the_next_session_converges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session ends with epoch two appended and not synced, and its end's fdatasync of
    the receive journal fails (EIO): it was logged as a warning only, and the job's status
    said "idle", consistent at 3, its last error "connection lost", as if nothing was
    wrong with its disk. Now it says "failed" and why; the next session reopens the job
    from its files and the replica reaches epoch two."""
    from tests.faultfs import FaultFS

    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        receiver = Receiver(_config(tmp_path / "mnt"))
        try:
            async with _session(receiver, 0) as (sender, welcome, _):
                generation, replica = await _epoch_one_applied(receiver, sender, welcome)
                rule = fs.add("fsync", errno.EIO, path="*.seg", times=1)
                taken = asyncio.Event()
                with monkeypatch.context() as patched:  # the session's sync never runs
                    patched.setattr(Session, "_wake_syncer", lambda self: taken.set())
                    await sender.send(_epoch(FIRST + 1, 2))
                    async with asyncio.timeout(5):
                        await taken.wait()
            assert fs.hits()[str(rule)] == 1
            status = await replica.status.snapshot()
            assert status["state"] == "failed", status
            assert status["errors"].get("storage") == 1, status
            assert "Input/output error" in status["last_error"], status
            assert "sends it again" in status["last_error"], status
            assert status["lsn"] == {"received": FIRST, "applied": FIRST}, status
            async with _session(receiver, generation) as (_, welcome, _):
                assert welcome.received_lsn == SECOND
                replica = await receiver.job("job")
                assert await _applied(replica, SECOND) == SECOND
                status = await replica.status.snapshot()
                assert status["state"] == "receiving", status
        finally:
            await receiver.aclose()
    assert (tmp_path / "real" / "replicas" / "job" / "d").read_bytes() == bytes([2]) * 2 * BLOCK


async def test_a_first_sync_whose_commit_fails_at_the_session_end_is_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first sync writes straight into the replica; its session ends before its sync
    ran, and the end's commit (the replica file's fsync) fails with EIO: nothing of it is
    acknowledged, the status says why, and the sender's next session, told applied and
    received 0, sends it again, which lands."""
    from tests.faultfs import FaultFS

    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        receiver = Receiver(_config(tmp_path / "mnt"))
        try:
            rule = fs.add("fsync", errno.EIO, path="replicas/job/d", times=1)
            async with _session(receiver, 0) as (sender, welcome, _):
                generation = max(welcome.generation, 1)
                replica = await receiver.job("job")
                taken = asyncio.Event()
                with monkeypatch.context() as patched:  # the session's sync never runs
                    patched.setattr(Session, "_wake_syncer", lambda self: taken.set())
                    await sender.send(_epoch(1, 1))
                    async with asyncio.timeout(5):
                        await taken.wait()
            assert fs.hits()[str(rule)] == 1
            status = await replica.status.snapshot()
            assert status["errors"].get("storage") == 1, status
            assert "Input/output error" in status["last_error"], status
            assert status["lsn"] == {"received": 0, "applied": 0}, status
            assert not status["consistency_point"]["consistent"], status
            async with _session(receiver, generation) as (sender, welcome, _):
                assert (welcome.received_lsn, welcome.applied_lsn) == (0, 0)
                await sender.send(_epoch(1, 1))
                replica = await receiver.job("job")
                assert await _applied(replica, FIRST) == FIRST
        finally:
            await receiver.aclose()
    assert (tmp_path / "real" / "replicas" / "job" / "d").read_bytes() == bytes([1]) * 2 * BLOCK
