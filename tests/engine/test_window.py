"""The receiver's credit window (engine/window.py): two bandwidth-delay products within the
memory cap, slow-start growth on a long fat link, less credit while the disk is behind;
then sender/receiver pairs: one whose epoch is larger than the backlog limit (never stuck),
one whose replica applies slower than records arrive (its backlog stays at the limit)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.engine import job_replica
from replicator.engine.connectors import MemoryConnector
from replicator.engine.job_replica import JobReplica
from replicator.engine.receiver import Receiver, ReceiverConfig
from replicator.engine.sender import Sender, SenderConfig
from replicator.engine.statedir import state_reserve
from replicator.engine.volumes import VolumeKind, VolumeSpec, resolve_volumes
from replicator.engine.window import CreditWindow
from replicator.journal import Journal, Record, RecordType, recovery
from replicator.journal.errors import TargetStorageError
from replicator.journal.segment import HEADER_BYTES
from replicator.transport import FramedConnection
from tests.engine.sessions import ship_journal
from tests.tools import b3, tmpfs

MiB = 1024 * 1024
BASE = 66 * MiB
CAP = 256 * MiB


def _feed(window: CreditWindow, rate: float, seconds: float, start: float = 0.0) -> float:
    """Payload arriving at ``rate`` bytes/s in 10 ms steps; returns the end time."""
    now = start
    for _ in range(int(seconds / 0.01)):
        now += 0.01
        window.received(now, int(rate * 0.01))
    return now


def _grant(window: CreditWindow, now: float, **kw: int | bool) -> int:
    args: dict[str, int | bool] = {"outstanding": 0, "unsynced": 0, "backlog": 0}
    args.update(kw)
    args.setdefault("applicable", False)
    return window.grant(now, **args)  # type: ignore[arg-type]


def _throttled(window: CreditWindow) -> bool:
    return window.throttled


def test_a_fixed_window_grants_again_what_was_synced() -> None:
    window = CreditWindow(BASE)
    # Welcome granted BASE; 3 MiB received, 2 MiB of it synced (1 MiB still unsynced)
    assert _grant(window, 1.0, outstanding=BASE - 3 * MiB, unsynced=MiB) == 2 * MiB
    assert window.window == BASE and not window.throttled


def test_two_bdps_in_flight_within_the_cap() -> None:
    """1.25 GB/s at 100 ms: a BDP of 125 MB; the window is two of them, up to the cap."""
    window = CreditWindow(BASE, cap=CAP)
    window.observe_rtt(0.1)
    now = _feed(window, 1.25e9 / 8, 2.0)  # 1 Gbit/s: 2 BDPs = 25 MB, under the base
    assert window.target(now) == BASE
    window = CreditWindow(BASE, cap=1024 * MiB)
    window.observe_rtt(0.1)
    now = _feed(window, 1.25e9, 2.0)  # 10 Gbit/s
    assert 2 * 1.25e9 * 0.1 * 0.95 <= window.target(now) <= 2 * 1.25e9 * 0.1 * 1.05
    window = CreditWindow(BASE, cap=128 * MiB)
    window.observe_rtt(0.1)
    now = _feed(window, 1.25e9, 2.0)
    assert window.target(now) == 128 * MiB  # the memory cap holds


def test_a_window_limited_link_grows_like_slow_start_up_to_the_cap() -> None:
    """The link could carry 2 GB/s at 100 ms but gets window / RTT: each round the window
    doubles until the cap."""
    window = CreditWindow(BASE, cap=CAP)
    window.observe_rtt(0.1)
    now, sizes = 0.0, [BASE]
    for _ in range(6):
        rate = min(2e9, sizes[-1] / window.loop)
        now = _feed(window, rate, 1.0, now)
        sizes.append(window.target(now))
    assert sizes[1] > 1.8 * sizes[0]
    assert sizes[-1] == CAP
    assert sizes == sorted(sizes)


def test_the_sync_time_counts_in_the_loop() -> None:
    window = CreditWindow(BASE, cap=CAP)
    window.observe_rtt(0.05)
    for _ in range(30):
        window.observe_sync(0.05)
    assert abs(window.loop - 0.1) < 0.001


def test_a_disk_behind_shrinks_the_window_and_it_opens_as_the_backlog_drains() -> None:
    window = CreditWindow(8 * MiB, cap=CAP, backlog_max=64 * MiB)
    assert _grant(window, 1.0, backlog=40 * MiB, applicable=True) == 8 * MiB
    assert not _throttled(window)
    # 60 MiB waiting to be applied: only 4 MiB more may come
    assert _grant(window, 1.0, backlog=60 * MiB, applicable=True) == 4 * MiB
    assert _throttled(window) and window.window == 4 * MiB
    assert _grant(window, 1.0, backlog=70 * MiB, applicable=True) == 0
    assert _grant(window, 1.0, outstanding=3 * MiB, backlog=58 * MiB, applicable=True) == 3 * MiB
    # an epoch still arriving (nothing applicable): never throttled, or it could not complete
    assert _grant(window, 1.0, backlog=70 * MiB, applicable=False) == 8 * MiB
    assert not window.throttled


def test_a_stopped_stream_is_unstalled_up_to_the_largest_frame_the_sender_may_have_packed() -> None:
    """The sender packs frames of several records up to the most credit it has held
    (``SenderCore.window``). Once the window has granted more than ``base`` at once, the
    frame it waits for may be larger than ``base``: a stream the room stopped must be
    unstalled up to that frame, not to ``base``. (Under load a 2 MiB window grew past
    ``base`` by 126 bytes, the sender packed two 1 MiB records, and the unstall left it
    126 bytes short of them for ever: the full disk was never told.)"""
    base, record = 2 * MiB, MiB + 63  # a 1 MiB record as encoded
    window = CreditWindow(base)
    assert _grant(window, 0.0) == base  # the Welcome: one record a frame (two pass base)
    window.observe_rtt(0.25)  # a longer loop (a loaded machine): the window grows
    now = _feed(window, 5 * MiB, 1.0)
    # the first frame was synced: its credit back, and the growth
    held = base - record + _grant(window, now, outstanding=base - record)
    assert 2 * record <= held < 3 * record  # the next frame but one holds two records
    outstanding = held - record  # the second frame went (packed alone, before the credit)
    assert outstanding < 2 * record  # the third waits for credit
    # synced with the journal's room nearly gone and nothing to apply: cut short
    room = outstanding + 63
    assert _grant(window, now, outstanding=outstanding, room=room) == 63
    assert window.short
    outstanding += 63
    # no frame comes: the session unstalls the stream, and the frame must be able to go
    more = window.unstall(outstanding=outstanding, unsynced=0)
    assert outstanding + more >= 2 * record


@settings(max_examples=300, deadline=None)
@given(
    base=st.integers(1, 128 * MiB),
    outstanding=st.integers(0, 512 * MiB),
    unsynced=st.integers(0, 512 * MiB),
    backlog=st.integers(0, 2048 * MiB),
    backlog_max=st.integers(1, 1024 * MiB),
    applicable=st.booleans(),
    rate=st.floats(0, 1e10),
    rtt=st.floats(0, 2),
    room=st.none() | st.integers(0, 1024 * MiB),
)
def test_credit_never_takes_the_sender_past_the_window(
    base: int,
    outstanding: int,
    unsynced: int,
    backlog: int,
    backlog_max: int,
    applicable: bool,
    rate: float,
    rtt: float,
    room: int | None,
) -> None:
    window = CreditWindow(base, cap=CAP, backlog_max=backlog_max)
    window.observe_rtt(rtt)
    window.received(0.0, int(rate))
    granted = window.grant(
        0.5,
        outstanding=outstanding,
        unsynced=unsynced,
        backlog=backlog,
        applicable=applicable,
        room=room,
    )
    assert granted >= 0
    in_flight = outstanding + unsynced + granted
    assert granted == 0 or in_flight <= window.window
    cut = granted < max(0, window.window - outstanding - unsynced)
    if room is not None:
        assert granted == 0 or in_flight <= room  # the journal's disk holds what comes
        by_room = room - outstanding - unsynced < window.window - outstanding - unsynced
        if cut and by_room and applicable:
            assert window.throttled  # cut by the room: granted again after an apply
        # cut by the room with nothing to apply: the session unstalls it if frames stop
        assert window.short == (cut and by_room and not applicable)
    elif granted:
        assert in_flight == window.window
    if window.short:
        held = window.held_max  # the most the sender may have held: its frames grow to it
        more = window.unstall(outstanding=outstanding, unsynced=unsynced)
        # the largest record can come, and the largest frame the sender may have packed
        assert more == max(0, max(base, held) - outstanding - unsynced)
        assert not window.short
    assert window.window <= max(CAP, base)
    if not applicable:
        assert window.window >= base  # the largest record always fits in the end
    else:
        assert window.window + backlog <= max(backlog_max, backlog)  # the disk's limit


async def test_an_epoch_larger_than_the_backlog_limit_still_replicates(tmp_path: Path) -> None:
    """A 4 MiB backlog limit and a 16 MiB epoch in 64 KiB records: the epoch cannot be
    applied before it is complete, so credit must keep coming until it is."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(16 * MiB))
    config = ReceiverConfig(
        tmp_path / "replicas", tmp_path / "rstate", window=4 * MiB, backlog_max=4 * MiB
    )
    receiver = Receiver(config)

    async def handle(conn: FramedConnection) -> None:
        await receiver.handle(conn)

    connector = MemoryConnector(handle)
    sending = SenderConfig("memory", 0, "job", resolve_volumes([disk]), tmp_path / "sstate")
    sender = Sender(sending, connector)
    try:
        summary = await sender.run_once()
    finally:
        await connector.aclose()
        await receiver.aclose()
    assert summary.payload_bytes >= 16 * MiB
    assert b3(tmp_path / "replicas" / "job" / disk.name) == b3(disk)


RECORD = 64 * 1024
EPOCHS = 40
PER_EPOCH = 4  # WRITE records, then a FLUSH barrier


@pytest.fixture
def slow_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every apply round of a receiver takes 30 ms longer: a disk slower than the link."""
    real_apply = JobReplica._apply_upto

    async def slow_apply(self: JobReplica, target: int) -> tuple[int, Record | None]:
        await asyncio.sleep(0.03)
        return await real_apply(self, target)

    monkeypatch.setattr(JobReplica, "_apply_upto", slow_apply)


async def _sender_journal(tmp_path: Path, epochs: int) -> tuple[Journal, bytearray, list[Record]]:
    """A sender's journal (open: close it) of ``epochs`` epochs, each PER_EPOCH random
    RECORD-sized writes over one image and a FLUSH; the image they leave; the records."""
    image = bytearray(PER_EPOCH * RECORD)
    records: list[Record] = []
    for _ in range(epochs):
        for i in range(PER_EPOCH):
            data = os.urandom(RECORD)
            image[i * RECORD : (i + 1) * RECORD] = data
            records.append(Record(RecordType.WRITE, "d.img", i * RECORD, RECORD, data))
        records.append(Record.flush())
    journal = await Journal.open(tmp_path / "journal")
    await journal.append_many(records)
    await journal.sync()
    return journal, image, records


async def _most_unapplied(tmp_path: Path, backlog_max: int, segment_bytes: int = 64 * MiB) -> int:
    """Ship EPOCHS epochs of PER_EPOCH 64 KiB records to a receiver, sampling its backlog:
    the most LSNs it held received and not applied. Checks the replica at the end."""
    journal, image, _ = await _sender_journal(tmp_path, EPOCHS)
    config = ReceiverConfig(
        tmp_path / "replicas",
        tmp_path / "rstate",
        window=512 * 1024,
        window_cap=512 * 1024,
        backlog_max=backlog_max,
        segment_bytes=segment_bytes,
    )
    receiver = Receiver(config)
    most = 0

    async def sample() -> None:
        nonlocal most
        while True:
            replica = receiver._jobs.get("job")
            if replica is not None:
                most = max(most, replica.journal.last_lsn - replica.applied_lsn)
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    try:
        spec = VolumeSpec(tmp_path / "d.img", "d.img", VolumeKind.DISK)
        link = await ship_journal(receiver, journal, spec, len(image), timeout=60)
        link.raise_if_failed()
    finally:
        sampler.cancel()
        await receiver.aclose()
        await journal.aclose()
    assert (tmp_path / "replicas" / "job" / "d.img").read_bytes() == bytes(image)
    return most


@pytest.mark.usefixtures("slow_apply")
async def test_a_replica_applying_slower_than_records_arrive_holds_the_sender_back(
    tmp_path: Path,
) -> None:
    """A 2 MiB backlog limit, a 512 KiB window and 10 MiB to ship in 256 KiB epochs: the
    receiver never holds much more than the limit unapplied (the limit, plus what a grant
    made before it filled could still bring), where without the limit it takes in nearly
    everything while its applier is still at the first rounds."""
    limit = 2 * 1024 * 1024
    most = await _most_unapplied(tmp_path / "limited", limit)
    # in LSNs: PER_EPOCH + 1 per epoch of PER_EPOCH records
    per_lsn = RECORD * PER_EPOCH / (PER_EPOCH + 1)
    assert most * per_lsn <= limit + 512 * 1024 + PER_EPOCH * RECORD, most
    unlimited = await _most_unapplied(tmp_path / "unlimited", 1024 * 1024 * 1024)
    assert unlimited * per_lsn > 2 * limit, unlimited  # the slow applier really is behind


@pytest.fixture
def small_state_disk(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/rstate`` (the receiver's state folder in ``_most_unapplied``): a 4 MiB
    tmpfs the test mounts itself (root, as in CI)."""
    with tmpfs(tmp_path / "rstate", "4m") as state:
        yield state


@pytest.mark.usefixtures("slow_apply", "small_state_disk")
async def test_a_receiver_whose_journal_disk_is_small_waits_for_its_applier(
    tmp_path: Path,
) -> None:
    """The receive journal's file system has room for 3 MiB and the backlog limit is far
    above it: a slower applier must hold the sender back by the room left (credit), not
    let the journal run the disk full. Full, the journal failed the session, and every
    reconnection met the same full disk, held by its own backlog: the receiver wedged."""
    most = await _most_unapplied(tmp_path, 1024 * MiB, segment_bytes=256 * 1024)
    per_lsn = RECORD * PER_EPOCH / (PER_EPOCH + 1)
    assert most * per_lsn <= 4 * MiB, most


@pytest.mark.usefixtures("slow_apply")
async def test_an_applier_behind_by_the_whole_backlog_applies_it_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The applier keeps as many records as the window lets the backlog reach, so one
    that is behind never reads records back from the receive journal (a second read and
    a second hash of every byte). Its own floor is made tiny here, so only the window's
    bound keeps them."""
    monkeypatch.setattr(job_replica, "MEM_APPLY_BYTES", RECORD)
    read_back = 0
    real_read_from = Journal.read_from

    async def counting_read_from(self: Journal, lsn: int) -> AsyncIterator[Record]:
        nonlocal read_back
        async with contextlib.aclosing(real_read_from(self, lsn)) as records:
            async for record in records:
                read_back += 1
                yield record

    monkeypatch.setattr(Journal, "read_from", counting_read_from)
    most = await _most_unapplied(tmp_path, 2 * 1024 * 1024)
    assert most * RECORD > 1024 * 1024, most  # behind by more than the floor, by far
    assert read_back == 0


@pytest.mark.usefixtures("slow_apply")
async def test_a_receiver_restarted_beside_applied_records_keeps_its_first_credit_in_the_room(
    tmp_path: Path,
) -> None:
    """A receiver comes back with its journal's active segment full of applied records
    and its file system short of room: with nothing to apply, its Welcome granted the
    whole window whatever the room (the largest record must be able to come), the records
    filled the segment, rolled it with new ones that a slow applier had not applied yet,
    and the journal met ENOSPC (found by real power cuts on a 128 MiB ext4 state disk).
    The Welcome's credit is kept within the room now; were the stream to stop, the
    session would grant up to the window after a moment (``CreditWindow.unstall``)."""
    epoch = [
        Record(RecordType.WRITE, "d.img", i * RECORD, RECORD, os.urandom(RECORD)) for i in range(4)
    ]
    journal = await Journal.open(tmp_path / "journal")
    spec = VolumeSpec(tmp_path / "d.img", "d.img", VolumeKind.DISK)
    with tmpfs(tmp_path / "rstate", "4m") as state:
        config = ReceiverConfig(
            tmp_path / "replicas", state, window=MiB, window_cap=MiB, segment_bytes=2 * MiB
        )
        try:
            for _ in range(7):  # 1.75 MiB of the active segment's 2, all applied
                await journal.append_many([*epoch, Record.flush()])
            await journal.sync()
            receiver = Receiver(config)
            try:
                (await ship_journal(receiver, journal, spec, 4 * RECORD)).raise_if_failed()
            finally:
                await receiver.aclose()
            fs = os.statvfs(state)
            room = MiB * 3 // 4  # less than the window: the Welcome's credit is cut to it
            with (state / "filler").open("wb") as f:
                f.write(bytes(fs.f_bavail * fs.f_frsize - state_reserve(state / "job") - room))
            for _ in range(7):
                await journal.append_many([*epoch, Record.flush()])
            await journal.sync()
            receiver = Receiver(config)
            try:
                link = await ship_journal(receiver, journal, spec, 4 * RECORD, timeout=60)
            finally:
                await receiver.aclose()
            link.raise_if_failed()
        finally:
            await journal.aclose()


async def test_an_epoch_larger_than_the_journals_room_is_told_as_a_full_disk(
    tmp_path: Path,
) -> None:
    """One epoch of 6 MiB into a receive journal on a 4 MiB file system: it cannot be
    applied before it is complete, and it cannot be complete. The credit is cut to the
    room with nothing to apply; once the records stop coming, the session grants up to
    the window (the sender may be waiting for a record larger than the room), and the
    full disk is told as such, not waited on for ever."""
    records = [Record(RecordType.WRITE, "d.img", i * MiB, MiB, os.urandom(MiB)) for i in range(6)]
    journal = await Journal.open(tmp_path / "journal")
    spec = VolumeSpec(tmp_path / "d.img", "d.img", VolumeKind.DISK)
    try:
        with tmpfs(tmp_path / "rstate", "4m") as state:
            config = ReceiverConfig(tmp_path / "replicas", state, window=2 * MiB)
            for epoch in ([records[0]], records):  # a consistency point first: then the
                await journal.append_many([*epoch, Record.flush()])  # next epoch waits
                await journal.sync()  # for its barrier to be applied
                receiver = Receiver(config)
                try:
                    link = await ship_journal(receiver, journal, spec, 6 * MiB, timeout=30)
                finally:
                    await receiver.aclose()
        with pytest.raises(TargetStorageError, match="disk is full"):
            link.raise_if_failed()
    finally:
        await journal.aclose()


async def test_a_trim_after_a_roll_that_fails_is_told_and_the_next_session_converges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync drops the segments a roll sealed below the applied LSN
    (``JobReplica._trim_applied``), a durable step in the sync's path: when its deletes
    fail (EIO), the session ends with a storage error, nothing past the last durable point
    is acknowledged as applied, and the next session applies the rest: the replica is the
    image."""
    journal, image, records = await _sender_journal(tmp_path, 12)
    # a segment holds one epoch and a little more, not the next record: the record after
    # an epoch rolls it, and once that epoch is applied the sync after the roll drops it
    epoch_bytes = sum(r.encoded_size for r in records[: PER_EPOCH + 1])
    config = ReceiverConfig(
        tmp_path / "replicas",
        tmp_path / "rstate",
        segment_bytes=HEADER_BYTES + epoch_bytes + RECORD // 2,
        window=epoch_bytes,  # a frame an epoch: applied while the next one comes
        window_cap=epoch_bytes,
    )
    spec = VolumeSpec(tmp_path / "d.img", "d.img", VolumeKind.DISK)
    real_trim_applied = JobReplica._trim_applied
    real_retire = recovery.retire_segments
    in_sync_trim = failed = 0

    async def trim_applied(self: JobReplica) -> None:
        nonlocal in_sync_trim
        in_sync_trim += 1
        try:
            await real_trim_applied(self)
        finally:
            in_sync_trim -= 1

    def retire(directory: Path, paths: list[Path], keep: list[Path]) -> None:
        nonlocal failed
        if in_sync_trim and not failed:
            failed += 1
            raise OSError(errno.EIO, "Input/output error")
        real_retire(directory, paths, keep)

    real_receive = JobReplica.receive

    async def receive(self: JobReplica, records: list[Record], *args: Any) -> None:
        # the epoch before is applied (with the segment still active) before this frame
        # rolls it: waited for (a fixed 30 ms was not enough under load), for at most 10 s
        for _ in range(1000):
            if self.applied_lsn >= records[0].lsn - 1:
                break
            await asyncio.sleep(0.01)
        await real_receive(self, records, *args)

    monkeypatch.setattr(JobReplica, "receive", receive)
    monkeypatch.setattr(JobReplica, "_trim_applied", trim_applied)
    monkeypatch.setattr("replicator.journal.journal.retire_segments", retire)
    try:
        receiver = Receiver(config)
        try:
            link = await ship_journal(receiver, journal, spec, len(image), timeout=30)
        finally:
            await receiver.aclose()
        assert failed == 1  # the sync's trim was reached, and failed
        with pytest.raises(TargetStorageError, match="Input/output error"):
            link.raise_if_failed()
        assert link.core is not None and link.core.applied_lsn < journal.last_lsn
        receiver = Receiver(config)
        try:
            (await ship_journal(receiver, journal, spec, len(image), timeout=30)).raise_if_failed()
        finally:
            await receiver.aclose()
    finally:
        await journal.aclose()
    assert (tmp_path / "replicas" / "job" / "d.img").read_bytes() == bytes(image)
