"""``verify`` (no --repair) of a replica that holds records past its consistency point (a
sender killed between two barriers shipped them): the replica keeps its point, and the
answer is about the replica as those records will leave it. In one process: a sender's
journal, an in-process receiver."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from replicator.engine import replica_state
from replicator.engine.connectors import MemoryConnector
from replicator.engine.errors import RefusedError
from replicator.engine.fuse_folder import folder_job
from replicator.engine.job_replica import JobReplica
from replicator.engine.manifest import ManifestSet
from replicator.engine.receiver import Receiver, ReceiverConfig
from replicator.engine.replica_state import ReplicaState
from replicator.engine.sender import Sender, SenderConfig, SenderState
from replicator.engine.tree import walk
from replicator.engine.verify import verify
from replicator.engine.volumes import resolve_volumes
from replicator.journal import Record, RecordType

MiB = 1 << 20


@dataclass
class Job:
    disk: Path  # the source (a folder job's: its disk image)
    replica: Path
    state: Path  # the receiver's job state folder
    sender: Sender
    receiver: Receiver

    def point(self) -> ReplicaState:
        saved = replica_state.load(self.state, "job")
        assert saved is not None
        return saved

    async def captured(self, *records: Record, source: bool = True) -> None:
        """Journal ``records`` as a capture does, durably, with no barrier after them
        (``source``: their writes made at the source too, as the capture makes them)."""
        async with SenderState(self.sender.config) as state:
            assert state.journal is not None
            for record in records:
                await state.journal.append(record)
            await state.journal.sync()
        for record in records if source else ():
            if record.type is RecordType.WRITE:
                with (self.disk.parent / record.volume).open("r+b") as f:
                    f.seek(record.offset)
                    f.write(record.data)


@contextlib.asynccontextmanager
async def _replicated(tmp_path: Path, config: SenderConfig, disk: Path) -> AsyncIterator[Job]:
    """``config``'s job sent once to an in-process receiver: the replica at a consistency
    point (the first epoch)."""
    receiver = Receiver(ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate"))
    connector = MemoryConnector(receiver.handle)
    sender = Sender(config, connector)
    try:
        await sender.run_once()
        replica = tmp_path / "replicas/job" / disk.relative_to(tmp_path / "source")
        yield Job(disk, replica, tmp_path / "rstate/job", sender, receiver)
    finally:
        await connector.aclose()
        await receiver.aclose()


@pytest.fixture
async def job(tmp_path: Path) -> AsyncIterator[Job]:
    disk = tmp_path / "source" / "disk.img"
    disk.parent.mkdir()
    disk.write_bytes(os.urandom(4 * MiB))
    config = SenderConfig("memory", 0, "job", resolve_volumes([disk]), tmp_path / "state")
    async with _replicated(tmp_path, config, disk) as replicated:
        yield replicated


@pytest.fixture
async def folder(tmp_path: Path) -> AsyncIterator[Job]:
    """A folder job (FUSE capture's): a disk image and a configuration file in a folder."""
    source = tmp_path / "source"
    (source / "etc").mkdir(parents=True)
    (source / "disk.img").write_bytes(os.urandom(MiB))
    (source / "etc" / "vm.xml").write_text("<domain/>")
    config, _ = folder_job(SenderConfig("memory", 0, "job", [], tmp_path / "state"), source)
    async with _replicated(tmp_path, config, source / "disk.img") as replicated:
        yield replicated


async def test_the_point_is_kept_and_the_source_equals_what_the_records_make(job: Job) -> None:
    point = job.point()
    assert point.consistent and point.point_lsn == point.applied_lsn
    before = job.replica.read_bytes()
    await job.captured(Record.write("disk.img", MiB + 100, b"new" * 3000))
    result = await verify(job.sender, repair=False)
    assert result.identical, result.volumes  # the disk is what the record makes the replica
    last = point.applied_lsn + 1
    assert result.unapplied == (last, last)
    assert job.point() == point  # still at its point, and nothing written
    assert job.replica.read_bytes() == before


async def test_the_records_held_past_the_point_count_in_the_in_flight_budget(
    job: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verify session holds the records past the last barrier while it answers: they
    count in the receiver's in-flight budget with the frames (engine/in_flight.py), and
    go back to it when the session ends."""
    accounts = job.receiver.in_flight.accounts
    counted: list[tuple[int, int]] = []  # (bytes read, bytes counted) as they were read
    unapplied = JobReplica.unapplied

    async def spy(self: JobReplica) -> list[Record]:
        records = await unapplied(self)
        counted.append((sum(r.encoded_size for r in records), accounts.used))
        return records

    monkeypatch.setattr(JobReplica, "unapplied", spy)
    await job.captured(Record.write("disk.img", 0, os.urandom(3 * MiB)))
    result = await verify(job.sender, repair=False)
    assert result.identical, result.volumes
    assert counted and all(used >= size > 3 * MiB for size, used in counted), counted
    assert job.receiver.in_flight.accounts.used == 0  # all given back


async def test_a_source_change_the_records_do_not_make_is_reported(job: Job) -> None:
    point = job.point()
    await job.captured(Record.write("disk.img", 0, b"journaled" * 100))
    with job.disk.open("r+b") as f:  # a change no record carries
        f.seek(3 * MiB)
        f.write(b"behind")
    result = await verify(job.sender, repair=False)
    assert not result.identical
    assert result.volumes[0].extents == [(3 * MiB, 64 * 1024)]  # not the journaled one
    assert job.point() == point


async def test_records_the_source_does_not_have_are_reported(job: Job) -> None:
    """A capture killed between its journal append and its write of the source."""
    point = job.point()
    await job.captured(Record.write("disk.img", 2 * MiB, b"only journaled"), source=False)
    result = await verify(job.sender, repair=False)
    assert result.volumes[0].extents == [(2 * MiB, 64 * 1024)]
    assert job.point() == point


async def test_records_that_rename_are_refused_and_leave_the_point(job: Job) -> None:
    point = job.point()
    await job.captured(Record.rename("disk.img", "old.img"), source=False)
    with pytest.raises(RefusedError, match=r"unapplied.*RENAME 'disk.img'") as refused:
        await verify(job.sender, repair=False)
    assert f"past the last barrier it applied (lsn {point.applied_lsn})" in str(refused.value)
    assert job.point() == point
    assert job.replica.exists()


async def test_a_folder_is_listed_with_the_modes_its_records_set(folder: Job) -> None:
    point = folder.point()
    source = folder.disk.parent
    xml = folder.replica.parent / "etc" / "vm.xml"
    mode = xml.stat().st_mode & 0o777
    await folder.captured(
        Record.write("disk.img", 4096, b"tail"), Record.chmod("etc/vm.xml", 0o600)
    )
    (source / "etc" / "vm.xml").chmod(0o600)
    result = await verify(folder.sender, repair=False, folder=walk(source))
    assert result.identical and not result.layout, (result.layout, result.volumes)
    assert result.unapplied == (point.applied_lsn + 1, point.applied_lsn + 2)
    assert folder.point() == point
    assert xml.stat().st_mode & 0o777 == mode != 0o600  # left as it was


async def test_a_folder_whose_records_create_a_file_is_refused_before_it_is_listed(
    folder: Job,
) -> None:
    point = folder.point()
    await folder.captured(Record.create("new.txt", 0o644), source=False)
    (folder.disk.parent / "new.txt").write_bytes(b"")
    with pytest.raises(RefusedError, match=r"CREATE 'new.txt'\) changes the names"):
        await verify(folder.sender, repair=False, folder=walk(folder.disk.parent))
    assert folder.point() == point
    assert not (folder.replica.parent / "new.txt").exists()


async def test_verify_leaves_the_saved_manifests_unread(
    job: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify compares the source with the replica's manifests; it loaded the sender's
    own too, unused: 4 GiB more at its peak for a 16 TiB raw disk."""
    loads: list[Path] = []
    real = ManifestSet.load

    def counting(path: Path) -> ManifestSet | None:
        loads.append(path)
        return real(path)

    monkeypatch.setattr(ManifestSet, "load", staticmethod(counting))
    assert (await verify(job.sender, repair=False)).identical
    assert (await verify(job.sender, repair=True)).identical
    assert loads == []
    await job.sender.run_once()  # a send still builds on them
    assert loads == [job.sender.config.state_dir / "manifests.state"]
