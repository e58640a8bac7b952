"""A whole sender/receiver pair in one process, over in-memory connections: no subprocess,
no port. Initial sync, incremental, a connection cut mid-frame, a receiver restart, a
refusal, a peer gone silent."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from replicator.engine import (
    direct_intent,
    generations,
    lost_records,
    receiver_session,
    replica_id,
    replica_state,
)
from replicator.engine import link as link_module
from replicator.engine.at_rest import receiver_jobs_at_rest, sender_at_rest
from replicator.engine.connectors import MemoryConnector
from replicator.engine.errors import (
    ConnectError,
    PeerProtocolError,
    RefusedError,
    ReplicatorError,
    SplitBrainError,
)
from replicator.engine.job_replica import JobReplica
from replicator.engine.link import Link
from replicator.engine.manifest import ManifestSet
from replicator.engine.receiver import Receiver, ReceiverConfig
from replicator.engine.scan import ScanStats
from replicator.engine.sender import Sender, SenderConfig, SenderState
from replicator.engine.sender_state import basis_alone
from replicator.engine.volumes import VolumeKind, VolumeSpec, resolve_volumes
from replicator.journal import Journal, Record, RecordType
from replicator.journal.durable import write_state
from replicator.transport import (
    PROTOCOL_VERSION,
    FramedConnection,
    Hello,
    Manifest,
    ManifestRequest,
    Ping,
    VolumeInfo,
    Welcome,
    connection_pair,
)
from tests.tools import answer_to_hello

MiB = 1024 * 1024


@dataclass
class Pair:
    tmp: Path
    disk: Path
    receiver: Receiver
    connector: MemoryConnector
    sender: Sender

    @property
    def replica(self) -> Path:
        return self.tmp / "replicas" / "job" / self.disk.name

    async def restart_receiver(self) -> None:
        await self.receiver.aclose()
        self.receiver = Receiver(_receiver_config(self.tmp))

    async def handle(self, conn: FramedConnection) -> None:  # whichever receiver is current
        await self.receiver.handle(conn)


def _receiver_config(tmp: Path) -> ReceiverConfig:
    return ReceiverConfig(tmp / "replicas", tmp / "rstate")


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(8 * MiB))
    receiver = Receiver(_receiver_config(tmp_path))
    holder: list[Pair] = []

    async def handle(conn: FramedConnection) -> None:
        await holder[0].handle(conn)

    connector = MemoryConnector(handle)
    config = SenderConfig("memory", 0, "job", resolve_volumes([disk]), tmp_path / "state")
    p = Pair(tmp_path, disk, receiver, connector, Sender(config, connector))
    holder.append(p)
    try:
        yield p
    finally:
        await connector.aclose()
        await p.receiver.aclose()


def _change(disk: Path, offsets: list[int]) -> None:
    with disk.open("r+b") as f:
        for offset in offsets:
            f.seek(offset)
            f.write(os.urandom(64 * 1024))


async def _cycle_without_saving(pair: Pair, *, unjournaled: bool = False) -> tuple[str, ScanStats]:
    """One epoch applied, its manifests never saved (a kill between the two): the basis
    it was scanned against, and what it found."""
    async with SenderState(pair.sender.config) as state:
        link, kind, basis = await pair.sender.open_link(state)
        try:
            _, stats, lsn = await pair.sender.cycle(
                state, link, basis, save=False, unjournaled=unjournaled
            )
            await link.wait_applied(lsn)
        finally:
            await pair.sender.close_link(link)
    return kind, stats


async def test_initial_then_incremental(pair: Pair) -> None:
    first = await pair.sender.run_once()
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    assert first.basis == "remote" and first.payload_bytes >= 8 * MiB
    _change(pair.disk, [MiB, 5 * MiB])
    second = await pair.sender.run_once()
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    assert second.basis == "local" and second.bytes_changed == 2 * 64 * 1024
    assert second.payload_bytes < 256 * 1024  # only the change moved
    assert pair.connector.connections == 2


async def test_a_connection_cut_mid_frame_resumes_from_the_last_ack(pair: Pair) -> None:
    big = pair.disk
    big.write_bytes(os.urandom(48 * MiB))
    job = asyncio.create_task(pair.sender.run_once())
    while pair.sender.status.link is None or pair.sender.status.link.received_lsn < 5:
        assert not job.done(), job
        await asyncio.sleep(0.001)
    received = pair.sender.status.link.received_lsn
    pair.connector.cut()  # somewhere in the middle of a 2 MiB frame, most likely
    with pytest.raises(ConnectError):
        await job
    resumed = await pair.sender.run_once()
    assert pair.replica.read_bytes() == big.read_bytes()
    # what the receiver had acknowledged was not sent again: less than the whole disk moved
    assert resumed.payload_bytes < 48 * MiB
    assert received >= 5


async def test_a_receiver_restart_between_runs(pair: Pair) -> None:
    await pair.sender.run_once()
    await pair.restart_receiver()
    _change(pair.disk, [0])
    summary = await pair.sender.run_once()
    assert summary.basis == "local"
    assert pair.replica.read_bytes() == pair.disk.read_bytes()


async def test_a_refusal_reaches_the_sender_and_nothing_is_written(pair: Pair) -> None:
    await pair.sender.run_once()
    with pair.replica.open("r+b") as f:  # changed on the target behind the receiver's back
        f.write(b"edited")
    _change(pair.disk, [2 * MiB])
    with pytest.raises(RefusedError, match="diverged"):
        await pair.sender.run_once()
    assert pair.replica.read_bytes().startswith(b"edited")


async def test_an_epoch_journaled_but_not_in_the_manifests_is_folded_not_sent_again(
    pair: Pair,
) -> None:
    """The local basis plus the records journaled after it (the fold in choose_basis):
    a cycle whose manifests were never saved (a crash between the two) is not sent twice."""
    await pair.sender.run_once()
    _change(pair.disk, [MiB, 3 * MiB])
    kind, stats = await _cycle_without_saving(pair)
    assert kind == "local" and stats.bytes_changed == 2 * 64 * 1024
    again = await pair.sender.run_once()
    assert again.basis == "local"
    assert again.bytes_changed == 0 and again.payload_bytes < 64 * 1024
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    _change(pair.disk, [5 * MiB])  # and with nothing left to fold, only the new change moves
    third = await pair.sender.run_once()
    assert third.basis == "local" and third.bytes_changed == 64 * 1024
    assert pair.replica.read_bytes() == pair.disk.read_bytes()


def _write(disk: Path, offset: int, data: bytes) -> None:
    with disk.open("r+b") as f:
        f.seek(offset)
        f.write(data)


async def test_a_state_folder_restored_from_an_older_copy_is_never_trusted_past_its_gap(
    pair: Pair,
) -> None:
    """A state folder copied back from before the replica's last epochs: the first session
    compares with the replica (the receiver is ahead of this journal) and numbers its records
    past what the receiver holds. When that session dies before saving its manifests, the
    journal holds records from before and after a gap whose records it never saw; the
    manifests plus the journal are not what the replica holds, and an extent that went back
    to what the old manifests say would never be sent again."""
    state_dir = pair.sender.config.state_dir
    y, old = 2 * MiB, os.urandom(64 * 1024)
    _write(pair.disk, y, old)
    await pair.sender.run_once()
    _change(pair.disk, [4 * MiB])
    await _cycle_without_saving(pair)  # the journal holds an epoch past the manifests
    older = pair.tmp / "state-copy"
    shutil.copytree(state_dir, older)
    _write(pair.disk, y, os.urandom(64 * 1024))
    await pair.sender.run_once()  # the replica moves on: y is new there
    shutil.rmtree(state_dir)
    shutil.copytree(older, state_dir)  # the older copy comes back
    _change(pair.disk, [6 * MiB])
    assert (await _cycle_without_saving(pair))[0] == "remote"  # the receiver is ahead of it
    _write(pair.disk, y, old)  # y goes back to what the old manifests say
    async with SenderState(pair.sender.config) as state:
        assert "does not hold" in str(await basis_alone(state))  # nor serving alone
    summary = await pair.sender.run_once()
    assert summary.basis == "remote"
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    again = await pair.sender.run_once()  # and once a sync completed, the local basis holds
    assert again.basis == "local" and again.bytes_changed == 0


async def test_a_later_cycle_ships_unjournaled_and_notes_it_first(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    await pair.sender.run_once()
    journaled: list[RecordType] = []
    real = Sender.append

    async def spy(self: Sender, journal: Journal, link: Link, records: list[Record]) -> int:
        journaled.extend(r.type for r in records)
        return await real(self, journal, link, records)

    monkeypatch.setattr(Sender, "append", spy)
    _change(pair.disk, [MiB, 5 * MiB])
    summary = await pair.sender.run_once()
    assert summary.basis == "local" and summary.bytes_changed == 2 * 64 * 1024
    assert journaled == [RecordType.EPOCH]  # the changes went straight to the receiver
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    assert not (pair.sender.config.state_dir / direct_intent.FILE_NAME).exists()


async def test_a_cycle_cut_short_after_shipping_unjournaled_is_sent_again(pair: Pair) -> None:
    """The receiver holds part of a cycle no journal here has, to be applied with the next
    EPOCH. An extent it holds goes back to what the manifests say: the next cycle must send
    it again all the same, or the receiver's copy of the cut cycle would win."""
    pair.disk.write_bytes(os.urandom(48 * MiB))
    first = await pair.sender.run_once()
    was = pair.disk.read_bytes()[: 64 * 1024]
    pair.disk.write_bytes(os.urandom(48 * MiB))
    job = asyncio.create_task(pair.sender.run_once())
    while pair.sender.status.link is None or pair.sender.status.link.received_lsn < first.lsn + 4:
        assert not job.done(), job
        await asyncio.sleep(0.001)
    pair.connector.cut()
    with pytest.raises(ConnectError):
        await job
    assert (pair.sender.config.state_dir / direct_intent.FILE_NAME).exists()
    await asyncio.sleep(0.05)
    away = await pair.sender.status.snapshot()  # in no journal here, and still unapplied
    assert not away["connected"] and away["lag"]["seconds"] >= 0.05
    _write(pair.disk, 0, was)  # back to what the manifests say
    summary = await pair.sender.run_once()
    assert summary.basis == "local"  # not a comparison of the whole disk
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    assert (await pair.sender.status.snapshot())["lag"]["seconds"] == 0.0


async def test_a_cycle_that_dies_once_its_notes_are_durable_converges(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed right after the notes' fdatasync, before a record left: the notes name
    changes the receiver never got, which the next cycle sends anyway; no "durable" before."""
    await pair.sender.run_once()
    _change(pair.disk, [MiB, 6 * MiB])

    async def dies(self: Link, records: list[Record], floor: int = 0) -> int:
        raise ConnectError("killed right after the notes")

    monkeypatch.setattr(Link, "ship_direct", dies)
    with pytest.raises(ConnectError):
        await pair.sender.run_once()
    monkeypatch.undo()
    notes = direct_intent.load(pair.sender.config.state_dir, 64 * 1024)
    assert notes is not None and sorted(notes.touched.indices("disk.img")) == [16, 96]
    assert pair.replica.read_bytes() != pair.disk.read_bytes()  # nothing claimed durable
    summary = await pair.sender.run_once()
    assert summary.basis == "local" and summary.bytes_changed == 2 * 64 * 1024
    assert pair.replica.read_bytes() == pair.disk.read_bytes()


async def test_a_cycle_applied_but_not_saved_is_sent_again(pair: Pair) -> None:
    """Killed after the receiver applied it, before its manifests were saved: only the
    notes say what it changed, and what they name is sent again."""
    await pair.sender.run_once()
    was = pair.disk.read_bytes()[MiB : MiB + 64 * 1024]
    _change(pair.disk, [MiB, 3 * MiB])
    kind, _ = await _cycle_without_saving(pair, unjournaled=True)
    assert kind == "local"
    _write(pair.disk, MiB, was)
    summary = await pair.sender.run_once()
    assert summary.basis == "local" and summary.bytes_changed == 2 * 64 * 1024
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    again = await pair.sender.run_once()
    assert again.basis == "local" and again.bytes_changed == 0


async def test_damaged_notes_send_the_sender_to_the_replica(pair: Pair) -> None:
    await pair.sender.run_once()
    _change(pair.disk, [2 * MiB])
    await _cycle_without_saving(pair, unjournaled=True)
    notes = pair.sender.config.state_dir / direct_intent.FILE_NAME
    damaged = bytearray(notes.read_bytes())
    damaged[-1] ^= 1
    notes.write_bytes(bytes(damaged))
    _change(pair.disk, [2 * MiB])
    summary = await pair.sender.run_once()
    assert summary.basis == "remote"
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    assert not notes.exists()  # the manifests saved since hold it all


def _flip_a_byte_after_the_first_records(journal_dir: Path) -> None:
    seg = max(journal_dir.iterdir(), key=lambda path: path.stat().st_size)
    damaged = bytearray(seg.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    seg.write_bytes(bytes(damaged))


async def test_records_the_receiver_lost_are_compared_and_make_no_point(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later cycle ships without the sender's journal; the receiver holds it all, durably,
    but a damaged journal costs it some of those records before it applies them. The
    sender's journal still holds the cycle's EPOCH, which it ships again: over the gap, a
    replica without those records would be a consistency point, and the manifests saved
    after that EPOCH would never send them again."""
    await pair.sender.run_once()
    rstate = pair.tmp / "rstate" / "job"
    point = replica_state.load(rstate, "job")
    assert point is not None and point.consistent
    _change(pair.disk, [MiB, 3 * MiB, 5 * MiB, 7 * MiB])
    # the receiver takes the cycle durably and is killed before it applies it
    monkeypatch.setattr(JobReplica, "_apply_target", lambda self, force: self.state.applied_lsn)
    async with SenderState(pair.sender.config) as state:
        link, kind, basis = await pair.sender.open_link(state)
        try:
            _, _, epoch = await pair.sender.cycle(state, link, basis, unjournaled=True)
            await link.wait_received(epoch)
        finally:
            await pair.sender.close_link(link)
    assert kind == "local"
    await pair.receiver.aclose()
    monkeypatch.undo()
    _flip_a_byte_after_the_first_records(rstate / "journal")
    await pair.restart_receiver()
    # the next session ships the EPOCH across the gap, then dies before comparing
    async with SenderState(pair.sender.config) as state:
        link, kind, _ = await pair.sender.open_link(state)
        try:
            await link.wait_applied(epoch, timeout=10)
        finally:
            await pair.sender.close_link(link)
    assert kind == "remote"
    after = replica_state.load(rstate, "job")
    assert after is not None and after.applied_lsn == epoch
    assert not after.consistent and after.point_lsn == point.point_lsn  # not a point
    (job,) = receiver_jobs_at_rest(pair.tmp / "rstate")
    assert job["consistency_point"]["floor_lsn"] == after.point_floor > epoch
    assert pair.replica.read_bytes() != pair.disk.read_bytes()
    assert (pair.sender.config.state_dir / lost_records.FILE_NAME).exists()
    pending = (await pair.sender.status.snapshot())["compare_pending"]
    assert pending is not None and "lacks lsn" in pending
    at_rest = sender_at_rest(pair.sender.config.state_dir)["jobs"][0]["compare_pending"]
    assert at_rest == pending
    # the receiver holds every LSN up to the EPOCH now: only the note sends it to the replica
    summary = await pair.sender.run_once()
    assert summary.basis == "remote"
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    healed = replica_state.load(rstate, "job")
    assert healed is not None and healed.consistent and healed.point_lsn == summary.lsn
    (job,) = receiver_jobs_at_rest(pair.tmp / "rstate")
    assert job["consistency_point"]["floor_lsn"] is None
    assert not (pair.sender.config.state_dir / lost_records.FILE_NAME).exists()
    assert (await pair.sender.status.snapshot())["compare_pending"] is None
    assert sender_at_rest(pair.sender.config.state_dir)["jobs"][0]["compare_pending"] is None
    again = await pair.sender.run_once()
    assert again.basis == "local" and again.bytes_changed == 0


async def test_lost_records_behind_a_record_still_journaled_are_compared(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with a journaled cycle before the unjournaled one, both unapplied: the
    sender's journal reaches below the receiver's position, and only the gap in its LSNs
    says the receiver lost records (the local basis would never send them again)."""
    await pair.sender.run_once()
    rstate = pair.tmp / "rstate" / "job"
    monkeypatch.setattr(JobReplica, "_apply_target", lambda self, force: self.state.applied_lsn)
    async with SenderState(pair.sender.config) as state:
        link, _, basis = await pair.sender.open_link(state)
        try:
            _change(pair.disk, [MiB, 2 * MiB])
            basis, _, _ = await pair.sender.cycle(state, link, basis)  # journaled
            _change(pair.disk, [4 * MiB, 5 * MiB, 6 * MiB, 7 * MiB])
            _, _, epoch = await pair.sender.cycle(state, link, basis, unjournaled=True)
            await link.wait_received(epoch)
        finally:
            await pair.sender.close_link(link)
    await pair.receiver.aclose()
    monkeypatch.undo()
    seg = max((rstate / "journal").iterdir(), key=lambda path: path.stat().st_size)
    damaged = bytearray(seg.read_bytes())
    damaged[len(damaged) * 7 // 8] ^= 1  # in the unjournaled cycle's records
    seg.write_bytes(bytes(damaged))
    await pair.restart_receiver()
    summary = await pair.sender.run_once()
    assert summary.basis == "remote"
    assert pair.replica.read_bytes() == pair.disk.read_bytes()


async def test_a_session_that_compares_nothing_is_refused_across_lost_records(
    pair: Pair,
) -> None:
    """A live sender reconnecting (or ``verify``) ships its journal without comparing: past
    records the receiver lost, it is refused before it ships anything, and the next session
    with a basis compares."""
    first = await pair.sender.run_once()
    _change(pair.disk, [2 * MiB])
    async with SenderState(pair.sender.config) as state:
        journal = state.journal
        assert journal is not None
        await journal.append(Record.epoch(2))  # held, then LSNs it never held, then held
        journal.skip_to(journal.next_lsn + 5)
        await journal.append(Record.epoch(3))
        await journal.sync()
        with pytest.raises(RefusedError, match=f"lacks lsn {first.lsn + 2} to {first.lsn + 6}"):
            await pair.sender.open_link(state, with_basis=False)
        assert state.compare is not None
        assert state.manifests is not None
        await state.save(state.manifests)  # a live sender's checkpoint at its stop, say
    assert (pair.sender.config.state_dir / lost_records.FILE_NAME).exists()  # compared nothing
    rstate = replica_state.load(pair.tmp / "rstate" / "job", "job")
    assert rstate is not None and rstate.applied_lsn == first.lsn  # nothing was shipped
    summary = await pair.sender.run_once()
    assert summary.basis == "remote"
    assert pair.replica.read_bytes() == pair.disk.read_bytes()


async def _an_epoch_past_lsns_the_receiver_lacks(pair: Pair) -> None:
    async with SenderState(pair.sender.config) as state:
        journal = state.journal
        assert journal is not None
        journal.skip_to(journal.next_lsn + 3)
        await journal.append(Record.epoch(2))
        await journal.sync()


async def test_a_compare_note_that_cannot_be_written_ships_nothing(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compare.state`` is the first durable step when the receiver lost records: a full
    disk there ends the run before anything is sent across the gap."""
    first = await pair.sender.run_once()
    await _an_epoch_past_lsns_the_receiver_lacks(pair)

    def full(state_dir: Path, reason: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lost_records, "save", full)
    with pytest.raises(OSError, match="No space left"):
        await pair.sender.run_once()
    saved = replica_state.load(pair.tmp / "rstate" / "job", "job")
    assert saved is not None and saved.point_floor == 0
    assert saved.applied_lsn == first.lsn and saved.consistent  # nothing came across
    monkeypatch.undo()
    _change(pair.disk, [3 * MiB])
    summary = await pair.sender.run_once()
    assert summary.basis == "remote"
    assert pair.replica.read_bytes() == pair.disk.read_bytes()


async def test_a_resync_whose_compare_note_cannot_be_written_ships_nothing(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``--resync`` notes ``compare.state`` before its PointFloor: a full disk there ends
    the run before the floor or anything else goes; the replica keeps its point, and the
    next ``--resync`` converges."""
    first = await pair.sender.run_once()
    resync = Sender(dataclasses.replace(pair.sender.config, resync=True), pair.connector)

    def full(state_dir: Path, reason: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lost_records, "save", full)
    with pytest.raises(OSError, match="No space left"):
        await resync.run_once()
    saved = replica_state.load(pair.tmp / "rstate" / "job", "job")
    assert saved is not None and saved.point_floor == 0  # no floor went
    assert saved.applied_lsn == first.lsn and saved.consistent
    assert not (pair.sender.config.state_dir / lost_records.FILE_NAME).exists()
    monkeypatch.undo()
    _change(pair.disk, [3 * MiB])
    summary = await resync.run_once()
    assert summary.basis == "remote"
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    healed = replica_state.load(pair.tmp / "rstate" / "job", "job")
    assert healed is not None and healed.consistent and healed.point_lsn == summary.lsn


async def test_a_sender_killed_right_after_its_compare_note_compares_at_the_next_start(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await pair.sender.run_once()
    await _an_epoch_past_lsns_the_receiver_lacks(pair)

    async def killed(self: Link, lsn: int) -> None:
        raise ConnectError("killed right after compare.state")

    monkeypatch.setattr(Link, "send_point_floor", killed)
    with pytest.raises(ConnectError):
        await pair.sender.run_once()
    monkeypatch.undo()
    assert (pair.sender.config.state_dir / lost_records.FILE_NAME).exists()
    saved = replica_state.load(pair.tmp / "rstate" / "job", "job")
    assert saved is not None and saved.applied_lsn == first.lsn and saved.consistent
    _change(pair.disk, [5 * MiB])
    summary = await pair.sender.run_once()
    assert summary.basis == "remote"
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    healed = replica_state.load(pair.tmp / "rstate" / "job", "job")
    assert healed is not None and healed.consistent and healed.point_lsn == summary.lsn
    assert not (pair.sender.config.state_dir / lost_records.FILE_NAME).exists()


async def test_a_point_floor_the_receiver_cannot_save_ends_the_session_with_why(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await pair.sender.run_once()
    await _an_epoch_past_lsns_the_receiver_lacks(pair)
    real = replica_state.save

    def full(state_dir: Path, job: str, state: replica_state.ReplicaState) -> None:
        if state.point_floor:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(state_dir, job, state)

    monkeypatch.setattr(replica_state, "save", full)
    with pytest.raises(ReplicatorError, match="receiver disk is full"):
        await pair.sender.run_once()
    saved = replica_state.load(pair.tmp / "rstate" / "job", "job")
    assert saved is not None and saved.point_floor == 0 and saved.applied_lsn == first.lsn
    monkeypatch.undo()
    _change(pair.disk, [3 * MiB])
    summary = await pair.sender.run_once()
    assert summary.basis == "remote"
    assert pair.replica.read_bytes() == pair.disk.read_bytes()


# -- random interleavings -----------------------------------------------------------------

_steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 63), st.integers(1, 8)),
        st.tuples(st.just("send"), st.just(0), st.just(0)),
        st.tuples(st.just("cut"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("restart"), st.just(0), st.just(0)),
        st.tuples(st.just("down"), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=_steps)
def test_random_writes_cuts_and_restarts_end_in_an_exact_replica(
    steps: list[tuple[str, int, int]],
) -> None:
    """Whatever happens between them (writes, cut connections at any moment, receiver
    restarts, a receiver that is down), every send that succeeds leaves the replica equal
    to the source, and a last send always gets there."""
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_scenario(Path(tmp), steps))


async def _scenario(tmp: Path, steps: list[tuple[str, int, int]]) -> None:
    disk = tmp / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    holder: list[Receiver] = [Receiver(_receiver_config(tmp))]

    async def handle(conn: FramedConnection) -> None:
        await holder[0].handle(conn)

    connector = MemoryConnector(handle)
    config = SenderConfig("memory", 0, "job", resolve_volumes([disk]), tmp / "state")
    sender = Sender(config, connector)
    replica = tmp / "replicas" / "job" / disk.name
    try:
        for step, a, b in steps:
            if step == "write":
                with disk.open("r+b") as f:
                    f.seek(a * 64 * 1024)
                    f.write(os.urandom(b * 16 * 1024))
            elif step == "send":
                await sender.run_once()
                assert replica.read_bytes() == disk.read_bytes()
            elif step == "cut":
                job = asyncio.create_task(sender.run_once())
                await asyncio.sleep(a / 1000)
                connector.cut()
                try:
                    await job
                except ConnectError:
                    continue
                assert replica.read_bytes() == disk.read_bytes()  # it finished before the cut
            elif step == "restart":
                await holder[0].aclose()
                holder[0] = Receiver(_receiver_config(tmp))
            else:
                connector.refuse = True
                with pytest.raises(ConnectError):
                    await sender.run_once()
                connector.refuse = False
        await sender.run_once()
        assert replica.read_bytes() == disk.read_bytes()
    finally:
        await connector.aclose()
        await holder[0].aclose()


async def test_a_receiver_slow_to_open_the_job_pings_and_is_waited_for(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a job can take long (journal recovery after a crash): the receiver pings
    meanwhile, so the sender does not take its silence for "not a receiver"."""
    import replicator.engine.link as link
    import replicator.engine.receiver as receiver

    monkeypatch.setattr(link, "FIRST_ANSWER_TIMEOUT", 0.3)
    monkeypatch.setattr(receiver, "OPENING_PING", 0.05)
    opening = Receiver.job

    async def slow_job(self: Receiver, name: str) -> object:
        await asyncio.sleep(1.0)  # a recovery more than three first-answer timeouts long
        return await opening(self, name)

    monkeypatch.setattr(Receiver, "job", slow_job)
    summary = await pair.sender.run_once()
    assert summary.lsn > 0 and pair.replica.read_bytes() == pair.disk.read_bytes()


async def test_a_peer_that_says_nothing_is_not_a_receiver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import replicator.engine.link as link

    monkeypatch.setattr(link, "FIRST_ANSWER_TIMEOUT", 0.3)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"x" * 4096)

    async def silent(conn: FramedConnection) -> None:
        await asyncio.sleep(30)

    connector = MemoryConnector(silent)
    config = SenderConfig("memory", 0, "job", resolve_volumes([disk]), tmp_path / "state")
    try:
        with pytest.raises(PeerProtocolError, match="is not a replicator receiver"):
            await Sender(config, connector).run_once()
    finally:
        await connector.aclose()


@pytest.mark.parametrize("failing", ["manifests", "note"])
async def test_a_comparison_whose_last_steps_fail_compares_again(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A comparison ends with two durable steps: its manifests saved, then ``compare.state``
    removed. When either fails (ENOSPC, EIO; or the sender is killed there) the run ends
    with the error and the note is kept: the next run compares again, and only that run's
    removal ends it. Nothing is taken as compared that was not."""
    await pair.sender.run_once()
    await _an_epoch_past_lsns_the_receiver_lacks(pair)
    note = pair.sender.config.state_dir / lost_records.FILE_NAME

    def full(self: ManifestSet, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def broken(state_dir: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if failing == "manifests":
        monkeypatch.setattr(ManifestSet, "save", full)
    else:
        monkeypatch.setattr(lost_records, "clear", broken)
    _change(pair.disk, [3 * MiB])
    with pytest.raises(OSError, match="No space left" if failing == "manifests" else "I/O|Input"):
        await pair.sender.run_once()
    assert note.exists()
    assert pair.replica.read_bytes() == pair.disk.read_bytes()  # the comparison itself ran
    monkeypatch.undo()
    assert sender_at_rest(pair.sender.config.state_dir)["jobs"][0]["compare_pending"]
    _change(pair.disk, [6 * MiB])
    summary = await pair.sender.run_once()
    assert summary.basis == "remote"  # the note still sends it to the replica
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    assert not note.exists()
    healed = replica_state.load(pair.tmp / "rstate" / "job", "job")
    assert healed is not None and healed.consistent and healed.point_lsn == summary.lsn
    again = await pair.sender.run_once()
    assert again.basis == "local" and again.bytes_changed == 0


async def test_a_receiver_killed_right_after_saving_its_point_floor_keeps_it(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The floor is durable before the receiver takes another frame: killed right after
    saving it, the receiver restarts with the floor, at its old consistency point, having
    applied nothing past it; the next run compares and ends above the floor."""
    first = await pair.sender.run_once()
    await _an_epoch_past_lsns_the_receiver_lacks(pair)
    saving = JobReplica.raise_point_floor

    async def killed(self: JobReplica, lsn: int) -> None:
        await saving(self, lsn)
        raise RuntimeError("receiver killed right after saving its point floor")

    monkeypatch.setattr(JobReplica, "raise_point_floor", killed)
    with pytest.raises(ReplicatorError):
        await pair.sender.run_once()
    await pair.receiver.aclose()
    monkeypatch.undo()
    rstate = pair.tmp / "rstate" / "job"
    kept = replica_state.load(rstate, "job")
    assert kept is not None and kept.point_floor > first.lsn
    assert kept.applied_lsn == first.lsn and kept.consistent  # nothing past it was taken
    assert kept.point_lsn == first.lsn
    await pair.restart_receiver()
    _change(pair.disk, [7 * MiB])
    summary = await pair.sender.run_once()
    assert summary.basis == "remote"
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    healed = replica_state.load(rstate, "job")
    assert healed is not None and healed.consistent and healed.point_lsn == summary.lsn
    assert summary.lsn >= kept.point_floor
    assert not (pair.sender.config.state_dir / lost_records.FILE_NAME).exists()


async def test_a_resync_cut_short_is_finished_by_the_next_plain_run(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--resync`` takes the replica's files as they are (an edit there is no longer
    refused). Cut short before its comparison completed, the plain run after it used to
    scan against the old manifests, leave the edit in place and call that replica a
    consistency point. The note makes every later run compare until one completes."""
    await pair.sender.run_once()
    with pair.replica.open("r+b") as f:  # the replica VM was started by hand, say
        f.seek(2 * MiB)
        f.write(b"written on the target" * 1000)
    resync = Sender(dataclasses.replace(pair.sender.config, resync=True), pair.connector)

    async def cut(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed before the comparison completed")

    monkeypatch.setattr(Sender, "cycle", cut)
    with pytest.raises(RuntimeError, match="killed before"):
        await resync.run_once()
    monkeypatch.undo()
    note = pair.sender.config.state_dir / lost_records.FILE_NAME
    assert note.exists()
    assert sender_at_rest(pair.sender.config.state_dir)["jobs"][0]["compare_pending"]
    rstate = pair.tmp / "rstate" / "job"
    cut_short = replica_state.load(rstate, "job")
    assert cut_short is not None and cut_short.point_floor > cut_short.applied_lsn
    _change(pair.disk, [5 * MiB])
    summary = await pair.sender.run_once()  # no --resync
    assert summary.basis == "remote"
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    healed = replica_state.load(rstate, "job")
    assert healed is not None and healed.consistent and healed.point_lsn == summary.lsn
    assert not note.exists()
    again = await pair.sender.run_once()
    assert again.basis == "local" and again.bytes_changed == 0


async def _hostile_floor(pair: Pair, lsn: int) -> None:
    """A peer holding the job's credentials says no barrier below ``lsn`` ends a point."""
    from replicator.transport import (
        PROTOCOL_VERSION,
        Goodbye,
        Hello,
        PointFloor,
        Welcome,
        connection_pair,
    )

    peer, server = await connection_pair()
    serving = asyncio.create_task(pair.handle(server))
    try:
        await peer.send(Hello(PROTOCOL_VERSION, "job", (), ("lz4",), 0, "s"))
        assert isinstance(await answer_to_hello(peer), Welcome)
        await peer.send(PointFloor(lsn))
        await peer.send(Goodbye("done"))
        await asyncio.wait_for(serving, 10)
    finally:
        await peer.aclose()


async def test_a_floor_no_sender_will_reach_is_replaced_by_the_next_comparison(
    pair: Pair,
) -> None:
    """A PointFloor of 2**64-1 (a hostile or broken peer) used to stay for ever: the floor
    only rose, so no later epoch, a ``--resync`` comparison's included, was a consistency
    point again, and failover refused the replica until its folder was deleted. A session
    that compares replaces the floor with its own, and its epoch is a point again."""
    first = await pair.sender.run_once()
    await _hostile_floor(pair, 2**64 - 1)
    rstate = pair.tmp / "rstate" / "job"
    wedged = replica_state.load(rstate, "job")
    assert wedged is not None and wedged.point_floor == 2**64 - 1
    _change(pair.disk, [MiB])
    plain = await pair.sender.run_once()  # compares nothing: no floor of its own
    assert plain.lsn > first.lsn
    after_plain = replica_state.load(rstate, "job")
    assert after_plain is not None and not after_plain.consistent
    assert after_plain.point_lsn == first.lsn
    resync = Sender(dataclasses.replace(pair.sender.config, resync=True), pair.connector)
    _change(pair.disk, [3 * MiB])
    summary = await resync.run_once()
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    healed = replica_state.load(rstate, "job")
    assert healed is not None and healed.consistent and healed.point_lsn == summary.lsn
    assert healed.point_floor <= summary.lsn


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_the_replica_identitys_durable_steps_fail_and_converge(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """The identity's two writes (engine/replica_id.py), each failing once: the receiver's
    ``replica.id`` at a job's open (the session is refused for storage, nothing written)
    and the sender's ``peer.state`` when a ``--resync`` takes another replica over
    (nothing shipped); each retry converges, and a replica whose identity was lost is
    never built on by a plain run."""
    first = await pair.sender.run_once()
    rstate = pair.tmp / "rstate" / "job"
    before = pair.replica.read_bytes()
    # the receiver's identity lost (its file damaged): a new one, made at the next open
    (rstate / replica_id.FILE_NAME).write_bytes(b"\x00damaged")
    await pair.restart_receiver()
    real_write = write_state

    def failing_write(path: Path, state: dict[str, object]) -> None:
        monkeypatch.setattr(replica_id, "write_state", real_write)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(replica_id, "write_state", failing_write)
    _change(pair.disk, [2 * MiB])
    with pytest.raises(ReplicatorError):
        await pair.sender.run_once()  # refused: the job could not be opened
    assert pair.replica.read_bytes() == before
    with pytest.raises(SplitBrainError, match="holds another replica"):
        await pair.sender.run_once()  # opened with a new identity: not built on
    assert pair.replica.read_bytes() == before
    saved = replica_state.load(rstate, "job")
    assert saved is not None and saved.point_lsn == first.lsn and saved.consistent
    resync = Sender(dataclasses.replace(pair.sender.config, resync=True), pair.connector)
    real_save = generations.save_peer

    def failing_save(state_dir: Path, peer: generations.Peer) -> None:
        monkeypatch.setattr(generations, "save_peer", real_save)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(generations, "save_peer", failing_save)
    with pytest.raises(OSError):
        await resync.run_once()  # before anything is shipped
    assert pair.replica.read_bytes() == before
    summary = await resync.run_once()
    assert pair.replica.read_bytes() == pair.disk.read_bytes()
    healed = replica_state.load(rstate, "job")
    assert healed is not None and healed.consistent and healed.point_lsn == summary.lsn
    again = await pair.sender.run_once()  # a plain run builds on it again
    assert again.bytes_changed == 0


# --- a peer gone silent (a black hole: packets dropped, no reset) ---------------------------


async def _welcome_then_black_hole(conn: FramedConnection) -> None:
    """A receiver that welcomes the sender and answers its manifest request (no replica
    yet), then turns into a path that drops every packet: reads nothing, sends nothing."""
    assert isinstance(await conn.recv(5), Hello)
    await conn.send(Welcome(PROTOCOL_VERSION, 0, 0, 256 * MiB, ("lz4", "manifest"), 0))
    request = await conn.recv(5)
    assert isinstance(request, ManifestRequest)
    await conn.send(
        Manifest(request.request_id, request.volume, False, 0, request.extent_size, 0, b"", True)
    )
    await asyncio.Event().wait()  # until the connector ends it


async def _in_drain(conn: FramedConnection, tasks: int) -> None:
    """Until ``tasks`` tasks wait in ``conn``'s drain (its buffers full, nobody reading)."""
    while len(conn._drain_waiters) < tasks:  # noqa: ASYNC110 (nothing to wait on but this)
        await asyncio.sleep(0.01)


async def test_a_receiver_gone_silent_mid_sync_is_lost_and_the_sender_reconnects(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first sync fills the buffers and waits in drain when the path starts dropping
    everything: the link's silence timeout failed the link but woke nobody, so the
    sender stayed "connected" until TCP gave up retransmitting (~15 minutes)."""
    monkeypatch.setattr(link_module, "REPLY_TIMEOUT", 1.0)
    pair.disk.write_bytes(os.urandom(32 * MiB))  # far more than the buffers hold

    async def first_a_black_hole(conn: FramedConnection) -> None:
        if pair.connector.connections == 1:
            await _welcome_then_black_hole(conn)
        else:
            await pair.handle(conn)

    pair.connector.handler = first_a_black_hole
    stop = asyncio.Event()
    with capture_logs() as logs:
        running = asyncio.create_task(pair.sender.run_forever(0.2, stop))
        try:
            async with asyncio.timeout(30):  # 1 s of silence, the retry's 1 s, the sync
                while pair.connector.connections < 2 or not (
                    pair.replica.exists() and pair.replica.read_bytes() == pair.disk.read_bytes()
                ):
                    assert not running.done(), running
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            await running
    # the first link, black-holed, is lost to its silence; under a loaded machine the
    # test's 1 s timeout may lose a later, healthy one too (it reconnects again)
    lost = [e for e in logs if e["event"] == "sender.link_lost"]
    assert lost and "sent nothing for 1 s" in lost[0]["error"], lost
    assert pair.connector.connections >= 2


async def test_a_reader_waiting_to_send_a_pong_still_sees_the_receiver_gone_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver's Ping came while the shipper had filled the buffers: the reader's Pong
    waited in drain behind them, where no timeout of its recv ran, when the path started
    dropping everything. The link never failed, and the shipper slept on in drain."""
    monkeypatch.setattr(link_module, "REPLY_TIMEOUT", 1.0)
    journal = await Journal.open(tmp_path / "journal")
    near, far = await connection_pair()
    link = Link(near, journal)

    async def welcome() -> None:
        assert isinstance(await far.recv(5), Hello)
        await far.send(Welcome(PROTOCOL_VERSION, 0, 0, 256 * MiB, ("lz4", "manifest"), 0))

    async def ship() -> None:
        for lsn in itertools.count():
            await link.ship_direct(
                [Record(RecordType.WRITE, "d.img", lsn * MiB, MiB, os.urandom(MiB))]
            )

    try:
        welcoming = asyncio.create_task(welcome())
        spec = VolumeSpec(tmp_path / "d.img", "d.img", VolumeKind.DISK)
        await link.handshake("job", [spec], {spec.name: 1 << 40})
        await welcoming
        link.start_reader()
        link.start_shipper(1)
        shipping = asyncio.create_task(ship())
        async with asyncio.timeout(10):
            await _in_drain(near, 1)  # the shipper
            await far.send(Ping(1, time.time_ns()))  # then nothing more: the black hole
            await _in_drain(near, 2)  # the reader's Pong, behind the shipper's frames
        started = time.monotonic()
        with pytest.raises(ConnectError, match="sent nothing for 1 s"):
            async with asyncio.timeout(10):
                await shipping
        assert time.monotonic() - started < 5
        with pytest.raises(ConnectError, match="sent nothing for 1 s"):
            link.raise_if_failed()
    finally:
        await link.aclose()
        far.abort()
        await journal.aclose()


async def test_a_receiver_answering_a_ping_into_a_full_buffer_still_sees_the_sender_gone_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest being sent filled the receiver's buffers, so the Pong its reader owed a
    Ping waited in drain behind it when the path started dropping everything: no timeout
    of the reader's recv ran there, and the session (its job busy to the next sender)
    lasted until TCP gave up retransmitting."""
    monkeypatch.setattr(receiver_session, "IDLE_TIMEOUT", 1.0)
    size = 384 * MiB  # 12 MiB of digests at 512-byte extents: more than the buffers hold
    (tmp_path / "replicas" / "job").mkdir(parents=True)
    with (tmp_path / "replicas" / "job" / "big.img").open("wb") as f:
        f.truncate(size)
    receiver = Receiver(_receiver_config(tmp_path))
    # uncompressed: the digests of a sparse file are all alike, and lz4 would shrink them
    near, far = await connection_pair(compress=False)
    serving = asyncio.create_task(receiver.handle(far))
    try:
        volumes = (VolumeInfo("big.img", size, "disk"),)
        await near.send(Hello(PROTOCOL_VERSION, "job", volumes, ("manifest", "resync"), 0, "s"))
        assert isinstance(await answer_to_hello(near), Welcome)
        await near.send(ManifestRequest(1, "big.img", 512, True))
        async with asyncio.timeout(30):  # pings keep the session alive meanwhile
            for nonce in itertools.count(1):
                if len(far._drain_waiters) >= 2:  # the manifest's part, then a Pong
                    break
                assert not serving.done()
                await near.send(Ping(nonce, time.time_ns()))
                await asyncio.sleep(0.1)
        started = time.monotonic()  # then nothing more from the sender, nothing read
        with capture_logs() as logs:
            async with asyncio.timeout(10):
                await serving
        assert time.monotonic() - started < 5
        (lost,) = [e for e in logs if e["event"] == "receiver.session_lost"]
        assert "sent nothing for 1 s" in lost["reason"]
    finally:
        near.abort()
        await serving
        await receiver.aclose()
