"""A first sync is written straight into the replica (no receive journal), and stays exact.

The direct path of ``JobReplica.receive``: while the replica never held a consistency point,
records up to the first barrier go into the replica files; ``make_durable`` commits them
(fsync, ``files.state``, ``applied.state``) and only then do they count as received. Each
case checks a promise of the journal path still holds: nothing counts before it is durable,
a failed or interrupted step is redone and never refused as an edit, what follows the first
barrier waits for the next one.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from replicator.engine import applier, replica_files, replica_state
from replicator.engine.applier import Applier, ApplyError
from replicator.engine.receiver import JobReplica, ReceiverConfig
from replicator.engine.replica_files import ReplicaFiles
from replicator.journal import Record
from replicator.journal.durable import write_state
from tests.engine.page_cache import PAGE, cached_pages, fail_direct_write, takes_o_direct
from tests.engine.sessions import end_as_sigkill, end_job

BLOCK = 4096


def _config(tmp_path: Path) -> ReceiverConfig:
    return ReceiverConfig(replica_root=tmp_path / "replicas", state_root=tmp_path / "state")


def _writes(first_lsn: int, count: int, fill: int, volume: str = "d") -> list[Record]:
    return [
        Record.write(volume, (first_lsn + i) * BLOCK, bytes([fill]) * BLOCK).with_lsn(
            first_lsn + i, 1
        )
        for i in range(count)
    ]


def _replica(tmp_path: Path, volume: str = "d") -> bytes:
    return (tmp_path / "replicas" / "job" / volume).read_bytes()


def _block(tmp_path: Path, lsn: int) -> bytes:
    data = _replica(tmp_path)
    return data[lsn * BLOCK : (lsn + 1) * BLOCK]


def _fail_once(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, nth: int = 1
) -> Callable[[], int]:
    """Make ``owner.name`` raise EIO on its ``nth`` call; returns a call counter."""
    real = getattr(owner, name)
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == nth:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return lambda: calls[0]


async def test_a_first_sync_skips_the_journal_and_counts_only_once_committed(
    tmp_path: Path,
) -> None:
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        records = [*_writes(1, 3, 0x11), Record.epoch(1).with_lsn(4, 7)]
        await replica.receive(records[:2])
        assert replica.received_lsn == 0 and replica.applied_lsn == 0  # written, not durable
        await replica.receive(records[2:])
        await replica.make_durable()
        assert replica.received_lsn == replica.applied_lsn == 4
        assert replica.state.consistent and not replica.state.applying
        assert (replica.state.point_lsn, replica.state.point_ts_ns) == (4, 7)
        assert replica.journal.next_lsn == 1  # not one record went through the journal
        assert not replica.eager  # the first point ends the direct path
    finally:
        await replica.aclose()
    assert _replica(tmp_path)[BLOCK:] == b"\x11" * 3 * BLOCK
    saved = replica_state.load(tmp_path / "state" / "job", "job")
    assert saved is not None and saved.applied_lsn == 4 and saved.consistent
    assert ReplicaFiles.load(tmp_path / "state" / "job", "job").writing == set()


async def test_what_follows_the_first_barrier_waits_in_the_journal_for_the_next(
    tmp_path: Path,
) -> None:
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        batch = [*_writes(1, 2, 0x21), Record.flush().with_lsn(3, 1), *_writes(4, 1, 0x22)]
        await replica.receive(batch)
        await replica.make_durable()
        replica.note_durable(batch)
        assert replica.applied_lsn == 3 and replica.state.point_lsn == 3
        assert replica.journal.first_lsn == 4 and replica.received_lsn == 4  # in the journal
        assert await replica.apply_pending() == 3  # no barrier after it yet: it waits
        assert _block(tmp_path, 4) != b"\x22" * BLOCK
        barrier = [Record.flush().with_lsn(5, 1)]
        await replica.receive(barrier)
        await replica.make_durable()
        replica.note_durable(barrier)
        assert await replica.apply_pending() == 5
        assert replica.state.consistent and replica.state.point_lsn == 5
    finally:
        await replica.aclose()
    assert _block(tmp_path, 4) == b"\x22" * BLOCK


async def test_a_first_sync_of_many_small_files_does_not_rewrite_the_stamps_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FUSE capture's first sync sends a folder's small files one FILE record a frame.
    Each frame named a new file, and files.state (every stamp so far) was rewritten and
    fsynced before it was written: 10,000 files took minutes, slower with every file.
    A file nothing stamped yet needs no ``writing`` entry on disk before it is written."""
    saved: list[int] = []

    def counting(path: Path, state: dict[str, Any]) -> None:
        saved.append(len(state["files"]))
        write_state(path, state)

    monkeypatch.setattr(replica_files, "write_state", counting)
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        for n in range(1, 201):
            await replica.receive([Record.file(f"f{n}.conf", b"%d" % n).with_lsn(n, 1)])
            if n % 50 == 0:  # a session's syncer commits now and then
                await replica.make_durable()
        await replica.receive([Record.epoch(1).with_lsn(201, 1)])
        await replica.make_durable()
        assert replica.applied_lsn == 201 and replica.state.consistent
    finally:
        await replica.aclose()
    assert saved == [50, 100, 150, 200, 200]  # a commit's stamps, not one save a file
    assert (tmp_path / "replicas" / "job" / "f7.conf").read_bytes() == b"7"


def test_a_file_stamped_on_disk_is_in_the_writing_list_on_disk_before_it_is_written(
    tmp_path: Path,
) -> None:
    """What lets the save above be skipped, and no more: a stamp on disk (adopted from a
    seeded replica, or a commit's) is one a crash must be able to undo."""
    (tmp_path / "a").write_bytes(b"a")
    files = ReplicaFiles()
    assert not files.will_write(["a"])  # nothing stamps it: no save needed first
    files.stamp("a", os.lstat(tmp_path / "a"))
    files.save(tmp_path)  # the stamp and "a" in writing, together
    files.written()
    files.save(tmp_path)
    assert files.will_write(["a"])  # stamped on disk, not in writing there
    assert ReplicaFiles.load(tmp_path, "job").will_write(["a", "b"])
    assert not ReplicaFiles.load(tmp_path, "job").will_write(["b"])
    loaded = ReplicaFiles.load(tmp_path, "job")
    loaded.forget("a")  # forgotten here, still stamped on disk until the next save
    assert loaded.will_write(["a"])


async def test_a_frame_after_an_uncommitted_first_barrier_goes_to_the_journal(
    tmp_path: Path,
) -> None:
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        await replica.receive([*_writes(1, 1, 0x23), Record.flush().with_lsn(2, 1)])
        later = _writes(3, 1, 0x24)
        await replica.receive(later)  # its barrier is written, not committed yet
        await replica.make_durable()
        replica.note_durable(later)
        assert replica.applied_lsn == 2 and replica.journal.first_lsn == 3
        assert _block(tmp_path, 3) != b"\x24" * BLOCK
    finally:
        await replica.aclose()


async def test_a_crash_before_the_commit_is_redone_not_refused_as_an_edit(
    tmp_path: Path,
) -> None:
    """Without the ``writing`` list the redo would find the file past its stamp."""
    replica = await JobReplica.open("job", _config(tmp_path))
    await replica.receive(_writes(1, 2, 0x31))
    await replica.make_durable()  # committed and stamped: applied 2
    await replica.receive(_writes(3, 2, 0x32))  # written over the stamp, then the crash
    await end_as_sigkill(replica)
    reopened = await JobReplica.open("job", _config(tmp_path))
    try:
        recovered = reopened.state
        assert recovered.applied_lsn == 2 and recovered.applying and not recovered.consistent
        assert await reopened.check_replica(adopt=False) == []  # our own write, not an edit
        # the sender sends again from the received LSN
        await reopened.receive([*_writes(3, 2, 0x33), Record.epoch(1).with_lsn(5, 1)])
        await reopened.make_durable()
        assert reopened.applied_lsn == 5 and reopened.state.consistent
    finally:
        await reopened.aclose()
    assert _replica(tmp_path)[BLOCK:] == b"\x31" * 2 * BLOCK + b"\x33" * 2 * BLOCK


async def test_an_edit_between_commits_is_still_refused(tmp_path: Path) -> None:
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        await replica.receive(_writes(1, 2, 0x41))
        await replica.make_durable()
        with (tmp_path / "replicas" / "job" / "d").open("r+b") as f:
            f.write(b"someone else")
        with pytest.raises(Exception, match="changed outside replication"):
            await replica.receive(_writes(3, 1, 0x42))
        assert replica.applied_lsn == 2
        assert "d" in replica.files.diverged
    finally:
        await replica.aclose()


@pytest.mark.parametrize(
    "step",
    [(Applier, "apply_many"), (applier, "fsync_fd"), (ReplicaFiles, "save"),
     (replica_state, "save")],
    ids=["replica write", "replica fsync", "files.state", "applied.state"],
)  # fmt: skip
async def test_a_failed_step_counts_nothing_and_the_resend_converges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: tuple[Any, str]
) -> None:
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        await replica.receive(_writes(1, 2, 0x51))
        await replica.make_durable()
        calls = _fail_once(monkeypatch, *step)
        batch = [*_writes(3, 2, 0x52), Record.epoch(1).with_lsn(5, 1)]
        with pytest.raises(OSError):
            await replica.receive(batch)
            await replica.make_durable()
        assert calls() == 1
        assert replica.applied_lsn == replica.received_lsn == 2  # never counted
        saved = replica_state.load(tmp_path / "state" / "job", "job")
        assert saved is not None and saved.applied_lsn == 2
        await replica.receive(batch)  # the sender's next session sends it again
        await replica.make_durable()
        assert replica.applied_lsn == 5 and replica.state.consistent
    finally:
        await replica.aclose()
    assert _replica(tmp_path)[BLOCK:] == b"\x51" * 2 * BLOCK + b"\x52" * 2 * BLOCK


async def test_a_namespace_record_is_preceded_by_a_commit(tmp_path: Path) -> None:
    """A rename redone after a crash must not be followed by writes under the old name."""
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        batch = [*_writes(1, 2, 0x61, "a"), Record.rename("a", "b").with_lsn(3, 1)]
        await replica.receive(batch)
        assert replica.applied_lsn == 2  # committed before the rename was applied
        saved = replica_state.load(tmp_path / "state" / "job", "job")
        assert saved is not None and saved.applied_lsn == 2
        await replica.receive([Record.epoch(1).with_lsn(4, 1)])
        await replica.make_durable()
        assert replica.applied_lsn == 4 and replica.state.consistent
    finally:
        await replica.aclose()
    assert not (tmp_path / "replicas" / "job" / "a").exists()
    assert _replica(tmp_path, "b")[BLOCK:] == b"\x61" * 2 * BLOCK


async def test_a_replica_with_a_point_keeps_it_until_the_next_barrier(tmp_path: Path) -> None:
    """Only a first sync goes direct: later syncs keep the last point until they end."""
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        await replica.receive([*_writes(1, 1, 0x71), Record.epoch(1).with_lsn(2, 1)])
        await replica.make_durable()
        later = _writes(3, 1, 0x72)
        await replica.receive(later)
        await replica.make_durable()
        replica.note_durable(later)
        assert replica.journal.first_lsn == 3  # journaled, not written in place
        assert await replica.apply_pending() == 2
        assert _block(tmp_path, 3) != b"\x72" * BLOCK
    finally:
        await replica.aclose()


async def test_writes_an_ended_session_left_uncommitted_are_not_taken_for_an_edit(
    tmp_path: Path,
) -> None:
    """The sender was killed between two commits: the next session's check finds the file
    past its stamp by our own writes; it commits them instead of refusing the job."""
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        await replica.receive(_writes(1, 2, 0x81))
        await replica.make_durable()
        await replica.receive(_writes(3, 2, 0x82))  # the session ends here
        assert await replica.check_replica(adopt=False) == []
        assert replica.applied_lsn == replica.received_lsn == 4  # committed, so announced
    finally:
        await replica.aclose()
    assert _replica(tmp_path)[BLOCK:] == b"\x81" * 2 * BLOCK + b"\x82" * 2 * BLOCK


async def test_a_write_cancelled_with_its_session_is_not_taken_for_an_edit(
    tmp_path: Path,
) -> None:
    """The session ends (cancelled) while a frame is being written: the write lands in
    the worker thread all the same, uncounted; the next session must not refuse the job."""
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        await replica.receive(_writes(1, 2, 0x91))
        await replica.make_durable()
        big = [
            Record.write("d", (3 + i) * 1024 * 1024, bytes([0x92]) * 1024 * 1024).with_lsn(3 + i, 1)
            for i in range(32)
        ]
        writing = asyncio.ensure_future(replica.receive(big))
        for _ in range(1000):  # until the write holds the replica
            if replica._apply_lock.locked():
                break
            await asyncio.sleep(0)
        writing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writing
        assert await replica.check_replica(adopt=False) == []
        assert replica.applied_lsn == 2  # what was not committed is sent again
        await replica.receive([*big, Record.epoch(1).with_lsn(35, 1)])
        await replica.make_durable()
        assert replica.applied_lsn == 35 and replica.state.consistent
    finally:
        await replica.aclose()


# a file nothing stamped yet needs no files.state before it is written (see will_write)
_FIRST_COMMIT = [
    ((replica_state, "save"), 1, "applied.state applying"),
    ((Applier, "apply_many"), 1, "replica write"),
    ((applier, "fsync_fd"), 1, "replica fsync"),
    ((ReplicaFiles, "save"), 1, "files.state stamps"),
    ((replica_state, "save"), 2, "applied.state applied LSN"),
]
# after a first commit the file is stamped: a crash later leaves it past its stamp (the
# first commit saved it in the writing list, with its stamp: no point cleared that yet)
_LATER_COMMIT = [
    ((Applier, "apply_many"), 1, "later replica write"),
    ((applier, "fsync_fd"), 1, "later replica fsync"),
    ((ReplicaFiles, "save"), 1, "later files.state stamps"),
    ((replica_state, "save"), 1, "later applied.state applied LSN"),
]


@pytest.mark.parametrize(
    ("step", "nth", "committed"),
    [pytest.param(step, nth, 0, id=name) for step, nth, name in _FIRST_COMMIT]
    + [pytest.param(step, nth, 2, id=name) for step, nth, name in _LATER_COMMIT],
)
async def test_killed_at_each_durable_step_of_a_first_sync_it_resumes_and_converges(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    step: tuple[Any, str],
    nth: int,
    committed: int,
) -> None:
    """Each durable step of a first sync's commit fails, and the process dies right there
    (nothing more is written: the failure leaves disk as a SIGKILL would). Reopened, the
    job claims nothing past its last commit, takes its own writes for its own, and the
    resend converges."""
    batch = [*_writes(1, 3, 0xA1), Record.epoch(1).with_lsn(4, 7)]
    replica = await JobReplica.open("job", _config(tmp_path))
    if committed:
        await replica.receive(batch[:committed])
        await replica.make_durable()
    calls = _fail_once(monkeypatch, *step, nth=nth)
    with pytest.raises(OSError):
        await replica.receive(batch[committed:])
        await replica.make_durable()
    assert calls() == nth
    await end_as_sigkill(replica)
    monkeypatch.undo()
    reopened = await JobReplica.open("job", _config(tmp_path))
    try:
        # no false "durable": what the sender sends again starts after the last commit
        assert reopened.received_lsn == reopened.applied_lsn == committed
        assert reopened.state.point_lsn == 0
        assert await reopened.check_replica(adopt=False) == []
        await reopened.receive(batch[committed:])
        await reopened.make_durable()
        assert reopened.applied_lsn == 4 and reopened.state.consistent
    finally:
        await reopened.aclose()
    assert _replica(tmp_path)[BLOCK:] == b"\xa1" * 3 * BLOCK


MiB = 1024 * 1024


def _mib_writes(first_lsn: int, count: int, fill: int, size: int = MiB) -> list[Record]:
    return [
        Record.write("d", n * size, bytes([fill]) * size).with_lsn(first_lsn + n, 1)
        for n in range(count)
    ]


async def test_a_first_sync_writes_past_the_page_cache_or_through_it_as_measured(
    tmp_path: Path,
) -> None:
    """The first window (8 MiB) goes past the page cache, the next is measured through it
    (engine/write_path.py), whatever this machine's costs: the way chosen is the way taken."""
    assert takes_o_direct(tmp_path / "replicas"), "this test needs a folder that takes O_DIRECT"
    writes = _mib_writes(1, 12, 0x5A)
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        for at in range(0, 12, 2):  # a Records frame of 2 MiB at a time, as a sender packs
            await replica.receive(writes[at : at + 2])
        replica_file = tmp_path / "replicas" / "job" / "d"
        pages = cached_pages(replica_file)
        per_mib = MiB // PAGE
        assert not any(pages[: 8 * per_mib]), "the first window went through the page cache"
        assert all(pages[8 * per_mib : 10 * per_mib]), "the page cache was never measured"
        await replica.receive([Record.epoch(1).with_lsn(13, 1)])
        await replica.make_durable()
        assert replica.applied_lsn == 13 and replica.state.consistent
        # durable now: the bulk left the page cache (nothing on the target reads it, and
        # later small writes into its large folios cost more: applier._drop_clean_pages);
        # what is left is what the receiver read back since (the image's head and tail,
        # for its format), not the 2-4 MiB written through the cache
        left = [page for page, cached in enumerate(cached_pages(replica_file)) if cached]
        assert len(left) <= 8, left
    finally:
        await replica.aclose()
    assert _replica(tmp_path) == b"\x5a" * 12 * MiB


async def test_a_page_cache_drop_that_fails_costs_only_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit drops a first sync's pages after their fsync (applier._drop_clean_pages):
    that step failing (EIO) fails nothing; the sync completes, consistent, the replica
    whole."""
    asked: list[int] = []

    def failing_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        asked.append(advice)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "posix_fadvise", failing_fadvise)
    writes = _mib_writes(1, 12, 0x3C)
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        for at in range(0, 12, 2):
            await replica.receive(writes[at : at + 2])
        await replica.receive([Record.epoch(1).with_lsn(13, 1)])
        await replica.make_durable()
        assert replica.applied_lsn == 13 and replica.state.consistent
    finally:
        await replica.aclose()
    assert os.POSIX_FADV_DONTNEED in asked  # the step was reached, and failed
    assert _replica(tmp_path) == b"\x3c" * 12 * MiB


@pytest.mark.parametrize("killed", [False, True], ids=["sent again", "killed there"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_a_first_sync_write_failing_past_the_page_cache_counts_nothing_and_converges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, killed: bool
) -> None:
    """The first 1 MiB of a first sync's 2 MiB record lands past the page cache, the second
    fails: nothing is counted, on disk either; the sender's next session (or, killed right
    there, the reopened job's) sends the records again and the replica converges."""
    batch = [*_mib_writes(1, 3, 0xC3, size=2 * MiB), Record.epoch(1).with_lsn(4, 1)]
    replica = await JobReplica.open("job", _config(tmp_path))
    asked = fail_direct_write(monkeypatch, err, nth=2)
    try:
        with pytest.raises(ApplyError):
            await replica.receive(batch)
            await replica.make_durable()
        assert asked == [0, MiB]  # the record's first half went past the cache, then the fault
        assert replica.applied_lsn == replica.received_lsn == 0
        saved = replica_state.load(tmp_path / "state" / "job", "job")
        assert saved is None or saved.applied_lsn == 0
        if not killed:
            await replica.receive(batch)
            await replica.make_durable()
            assert replica.applied_lsn == 4 and replica.state.consistent
    finally:
        await end_job(replica, killed=killed)
    if killed:
        monkeypatch.undo()
        reopened = await JobReplica.open("job", _config(tmp_path))
        try:
            assert reopened.received_lsn == reopened.applied_lsn == 0
            assert await reopened.check_replica(adopt=False) == []  # its own writes
            await reopened.receive(batch)
            await reopened.make_durable()
            assert reopened.applied_lsn == 4 and reopened.state.consistent
        finally:
            await reopened.aclose()
    assert _replica(tmp_path) == b"\xc3" * 6 * MiB
