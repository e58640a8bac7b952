from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

import pytest

from replicator.engine import volumes
from replicator.engine.applier import Applier, ApplyError
from replicator.engine.replica_files import ReplicaDiverged
from replicator.journal import Record
from replicator.journal.locking import lock_directory
from tests.tools import allocated, tmpfs


def test_apply_is_idempotent_and_sparse(tmp_path: Path) -> None:
    records = [
        Record.resize("disk", 1 << 20),
        Record.write("disk", 4096, b"a" * 8192),
        Record.zero("disk", 8192, 4096),
        Record.file("vm.xml", b"<domain/>", 0o640),
        Record.epoch(1),
    ]
    applier = Applier(tmp_path / "job")
    for _ in range(2):  # re-applying after a crash must give the same result
        applier.apply_many(records)
        applier.barrier()
    applier.close()
    disk = (tmp_path / "job" / "disk").read_bytes()
    assert len(disk) == 1 << 20
    assert disk[4096:8192] == b"a" * 4096 and disk[8192:12288] == bytes(4096)
    assert (tmp_path / "job" / "vm.xml").read_bytes() == b"<domain/>"
    assert os.stat(tmp_path / "job" / "vm.xml").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "job" / "disk").st_blocks * 512 < 1 << 19  # stayed sparse


@pytest.mark.parametrize("name", ["../escape", "/etc/escape", "a/./b", "a\\b"])
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    applier = Applier(tmp_path / "job")
    with pytest.raises(ApplyError):
        applier.apply(Record.write(name, 0, b"x"))
    with pytest.raises(ApplyError):
        applier.apply(Record.file(name, b"x"))
    applier.close()
    assert not (tmp_path / "escape").exists()


def test_file_system_operations_replay(tmp_path: Path) -> None:
    records = [
        Record.mkdir("vm", 0o750),
        Record.create("vm/vm.xml.tmp", 0o644),
        Record.write("vm/vm.xml.tmp", 0, b"<domain v='2'/>"),
        Record.rename("vm/vm.xml.tmp", "vm/vm.xml"),  # editor-style save
        Record.write("vm/disks/d0.raw", 1 << 20, b"z" * 512),  # parents are created
        Record.symlink("vm/current", "vm.xml"),
        Record.chmod("vm/vm.xml", 0o600),
        Record.create("vm/scratch", 0o644),
        Record.unlink("vm/scratch"),
        Record.mkdir("vm/old", 0o755),
        Record.rmdir("vm/old"),
        Record.flush(),
    ]
    applier = Applier(tmp_path / "job")
    for _ in range(2):  # idempotent
        applier.apply_many(records)
        applier.barrier()
    applier.close()
    vm = tmp_path / "job" / "vm"
    assert (vm / "vm.xml").read_bytes() == b"<domain v='2'/>"
    assert not (vm / "vm.xml.tmp").exists() and not (vm / "scratch").exists()
    assert not (vm / "old").exists()
    assert os.readlink(vm / "current") == "vm.xml"
    assert os.stat(vm / "vm.xml").st_mode & 0o777 == 0o600
    assert (vm / "disks" / "d0.raw").stat().st_size == (1 << 20) + 512


def test_symlinks_never_lead_outside_the_replica(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    applier = Applier(tmp_path / "job")
    applier.apply(Record.symlink("escape", str(outside)))
    applier.apply(Record.symlink("file", str(outside / "victim")))
    for record in (
        Record.write("escape/victim", 0, b"x"),
        Record.write("file", 0, b"x"),
        Record.create("escape/new", 0o644),
        Record.mkdir("escape/dir", 0o755),
    ):
        with pytest.raises(ApplyError):
            applier.apply_many([record])
    applier.close()
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("path", ["/abs", "a/../../b", "a//b", "./a"])
def test_bad_paths_are_refused(tmp_path: Path, path: str) -> None:
    applier = Applier(tmp_path / "job")
    with pytest.raises(ApplyError):
        applier.apply(Record.write(path, 0, b"x"))
    with pytest.raises(ApplyError):
        applier.apply(Record.rename("ok", path))
    applier.close()


@pytest.mark.parametrize("kind", ["FIFO", "character device", "socket", "symlink"])
def test_anything_but_a_file_planted_under_a_replica_name_is_refused(
    tmp_path: Path, kind: str
) -> None:
    """Not written through: a FIFO failed the write with ESPIPE, a device node (here a
    second /dev/null) took the bytes and the record counted as applied."""
    job = tmp_path / "job"
    job.mkdir()
    planted = job / "disk.img"
    if kind == "FIFO":
        os.mkfifo(planted)
    elif kind == "character device":
        os.mknod(planted, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    elif kind == "symlink":
        planted.symlink_to(tmp_path / "victim")
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(planted))
        sock.close()
    applier = Applier(job)
    with pytest.raises(ApplyError, match=f"disk.img is a {kind}, not a regular file"):
        applier.apply_many([Record.write("disk.img", 0, b"x" * 4096)])
    applier.close()
    assert not stat.S_ISREG(planted.lstat().st_mode)  # left for the operator to look at


@pytest.mark.parametrize("kind", ["symlink", "FIFO", "regular file"])
def test_a_path_through_anything_but_a_folder_is_refused_naming_it(
    tmp_path: Path, kind: str
) -> None:
    job = tmp_path / "job"
    (job / "vm").mkdir(parents=True)
    planted = job / "vm" / "disks"
    if kind == "symlink":
        planted.symlink_to(tmp_path)
    elif kind == "FIFO":
        os.mkfifo(planted)
    else:
        planted.write_bytes(b"x")
    applier = Applier(job)
    with pytest.raises(ApplyError, match=f"passes through 'disks', a {kind}, in {job}/vm "):
        applier.apply_many([Record.write("vm/disks/a.img", 0, b"x")])
    applier.close()
    assert list(tmp_path.iterdir()) == [job]  # nothing written through it


def test_a_planted_temp_symlink_cannot_redirect_a_file_record(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    applier = Applier(tmp_path / "job")
    applier.apply(Record.symlink(".vm.xml.tmp", str(victim)))  # the temp name of vm.xml
    applier.apply(Record.file("vm.xml", b"<domain/>"))
    applier.barrier()
    applier.close()
    assert victim.read_text() == "precious"
    assert (tmp_path / "job" / "vm.xml").read_bytes() == b"<domain/>"


def test_open_files_stay_bounded_and_data_stays_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from replicator.engine import applier as applier_module

    monkeypatch.setattr(applier_module, "MAX_OPEN_FILES", 8)
    applier = Applier(tmp_path / "job")
    for i in range(100):
        applier.apply(Record.write(f"f{i:03}", 0, bytes([i]) * 100))
        assert len(applier._fds) <= 8
    applier.barrier()
    applier.close()
    for i in range(100):
        assert (tmp_path / "job" / f"f{i:03}").read_bytes() == bytes([i]) * 100


def test_open_readonly_never_leaves_the_replica(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    applier = Applier(tmp_path / "job")
    applier.apply(Record.write("dir/ok", 0, b"ok"))
    applier.apply(Record.symlink("link", str(outside)))
    applier.apply(Record.symlink("dir/file-link", str(outside / "secret")))
    fd = applier.open_readonly("dir/ok")
    assert fd is not None
    os.close(fd)
    for path in ("link/secret", "dir/file-link", "../outside/secret", "missing"):
        assert applier.open_readonly(path) is None
    applier.close()


@pytest.mark.parametrize(
    "record",
    [
        Record.write("vm/other/disk.img", 0, b"x" * 512),
        Record.unlink("vm/other/disk.img"),
        Record.rmdir("vm/other/empty"),
        Record.rmdir("vm/other"),
        Record.rename("vm/other", "vm/moved"),
        Record.rename("vm/x", "vm/other"),
    ],
    ids=["write-into", "unlink-in", "rmdir-in", "rmdir-it", "rename-it", "rename-onto"],
)
def test_a_folder_another_replicator_process_holds_is_never_touched(
    tmp_path: Path, record: Record
) -> None:
    """Another receiver's --dir (or a state folder) nested inside this job's folder: a
    folder job's first sync removes what its source lacks, which was that receiver's
    replicas and journals. Every receiver and sender holds its folders with a flock."""
    other = tmp_path / "job" / "vm" / "other"
    (other / "empty").mkdir(parents=True)
    (other / "disk.img").write_bytes(b"replica")
    (tmp_path / "job" / "vm" / "x").mkdir()
    held = lock_directory(other)
    assert held is not None
    try:
        applier = Applier(tmp_path / "job")
        with pytest.raises(ApplyError, match="held by another replicator process"):
            applier.apply(record)
        applier.close()
        assert (other / "disk.img").read_bytes() == b"replica"
        assert (other / "empty").is_dir()
    finally:
        os.close(held)
    applier = Applier(tmp_path / "job")  # let go: an ordinary folder again
    try:
        applier.apply(record)
    except OSError as exc:  # what a folder with files in it answers, nothing of ours
        assert exc.errno == errno.ENOTEMPTY, exc
    applier.close()


def test_a_job_folder_another_replicator_process_holds_is_refused(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    held = lock_directory(job)
    try:
        with pytest.raises(ApplyError, match="the job folder is held by another"):
            Applier(job)
    finally:
        assert held is not None
        os.close(held)


@pytest.mark.timeout(30)
def test_a_fifo_planted_under_a_replica_name_hangs_nothing(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer: the compare (and ``adopt``) of a
    replica name someone replaced with one must not wait forever."""
    applier = Applier(tmp_path / "job")
    os.mkfifo(tmp_path / "job" / "disk.img")
    fd = applier.open_readonly("disk.img")
    assert fd is not None
    os.close(fd)
    applier.adopt("disk.img")  # not a regular file: not adopted
    assert "disk.img" not in applier.files.stamps
    applier.apply(Record.chmod("disk.img", 0o640))  # nor does a mode change hang on it
    assert stat.S_IMODE(os.lstat(tmp_path / "job" / "disk.img").st_mode) == 0o640
    applier.close()


def test_the_new_durable_steps_failing_stamp_nothing_and_a_retry_converges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CHMOD's fsync and an adoption's fsync (both before a stamp) fail with EIO: the
    stamp stays the last durable one, and the same work redone succeeds."""
    from replicator.engine import applier as applier_mod

    applier = Applier(tmp_path / "job")
    applier.apply_many([Record.create("notes", 0o600), Record.epoch(1)])
    applier.barrier()
    durable = applier.files.stamps["notes"]

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(applier_mod, "fsync_fd", eio)
    with pytest.raises(OSError):
        applier.apply(Record.chmod("notes", 0o644))
    with pytest.raises(OSError):
        applier.adopt("notes")
    assert applier.files.stamps["notes"] == durable
    monkeypatch.undo()
    applier.apply_many([Record.chmod("notes", 0o644), Record.epoch(2)])
    applier.barrier()
    applier.adopt("notes")
    applier.files.check("notes", os.lstat(tmp_path / "job" / "notes"))
    assert stat.S_IMODE(os.lstat(tmp_path / "job" / "notes").st_mode) == 0o644
    applier.close()


def test_files_in_a_renamed_folder_stay_guarded(tmp_path: Path) -> None:
    """A folder's rename moves its files' stamps with it: an edit outside replication of
    a file in it is still refused (the stamps were dropped with the folder's rename)."""
    job = tmp_path / "job"
    applier = Applier(job)
    applier.apply_many([Record.mkdir("vm", 0o755), Record.create("vm/disk", 0o600)])
    applier.apply_many([Record.write("vm/disk", 0, b"a" * 4096), Record.epoch(1)])
    applier.barrier()
    applier.apply_many([Record.rename("vm", "vm.old"), Record.epoch(2)])
    applier.barrier()
    assert "vm.old/disk" in applier.files.stamps
    applier.close()
    with (job / "vm.old" / "disk").open("r+b") as f:
        f.write(b"hand edit")
    applier = Applier(job, applier.files)
    with pytest.raises(ReplicaDiverged, match="changed outside replication"):
        applier.apply(Record.write("vm.old/disk", 0, b"b" * 4096))
    applier.close()


def test_a_renamed_file_is_fsynced_before_its_new_ctime_is_stamped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename moves the file's ctime; nothing written, so only an fsync of the file
    itself puts that ctime on disk before the stamp naming it (btrfs's fsync of the
    folder does not: tests/engine/test_applier_power_cut.py)."""
    from replicator.engine import applier as applier_mod
    from replicator.journal.durable import fsync_fd as real

    applier = Applier(tmp_path / "job")
    applier.apply_many([Record.create("notes", 0o600), Record.epoch(1)])
    applier.barrier()
    synced: list[int] = []

    def noting(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(applier_mod, "fsync_fd", noting)
    applier.apply_many([Record.rename("notes", "notes.old"), Record.epoch(2)])
    applier.barrier()
    assert os.lstat(tmp_path / "job" / "notes.old").st_ino in synced
    applier.close()


def test_a_renamed_files_fsync_failing_stamps_nothing_and_the_redo_converges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The barrier's fsync of a file that was only renamed fails with EIO: the barrier
    fails before any stamp moves (the receiver saves none, and its redo applies the round
    again from the journal); the same round redone stamps the file as it is."""
    from replicator.engine import applier as applier_mod
    from replicator.journal.durable import fsync_fd as real

    job = tmp_path / "job"
    applier = Applier(job)
    applier.apply_many([Record.create("notes", 0o600), Record.epoch(1)])
    applier.barrier()
    before = dict(applier.files.stamps)
    renamed = os.lstat(job / "notes").st_ino

    def eio_for_the_renamed(fd: int) -> None:
        if os.fstat(fd).st_ino == renamed:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(applier_mod, "fsync_fd", eio_for_the_renamed)
    round_ = [Record.rename("notes", "notes.old"), Record.epoch(2)]
    applier.apply_many(round_)
    with pytest.raises(OSError):
        applier.barrier()
    # not stamped afresh: the stamp moved with the name still names the old ctime
    assert applier.unstamped == {"notes.old"}
    assert applier.files.stamps["notes.old"] == before["notes"]
    applier.close()
    monkeypatch.undo()
    redo = Applier(job)  # the receiver's redo: a fresh applier, the round from the journal
    redo.files.stamps.update(before)
    redo.apply_many(round_)
    redo.barrier()
    redo.files.check("notes.old", os.lstat(job / "notes.old"))
    assert "notes" not in redo.files.stamps
    redo.close()


def test_folders_get_the_records_mode_and_a_planted_link_is_refused(tmp_path: Path) -> None:
    """mkdir applies the process's umask and drops setgid: the mode is set after it, also
    on a folder that already exists; never through a link planted at the name."""
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    job = tmp_path / "job"
    job.mkdir()
    (job / "link").symlink_to(outside)
    old = os.umask(0o077)
    try:
        applier = Applier(job)
        applier.apply_many(
            [
                Record.mkdir("shared", 0o2775),
                Record.mkdir("sticky", 0o1777),
                Record.mkdir("locked", 0o000),
                Record.mkdir("shared", 0o2770),  # already there: takes the new mode
            ]
        )
        with pytest.raises(ApplyError, match="something else is there"):
            applier.apply(Record.mkdir("link", 0o777))
        applier.close()
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in job.iterdir() if not p.is_symlink()}
    assert modes == {"shared": 0o2770, "sticky": 0o1777, "locked": 0o000}
    assert stat.S_IMODE(outside.stat().st_mode) == 0o700


def test_a_hard_link_planted_under_a_replica_name_is_refused(tmp_path: Path) -> None:
    """A second name of a file outside the replica folder: written through, the outside
    file would take the replica's bytes (and a RESIZE its size)."""
    victim = tmp_path / "victim.raw"
    victim.write_bytes(b"v" * 65536)
    job = tmp_path / "job"
    job.mkdir()
    os.link(victim, job / "disk.img")
    for record in (Record.write("disk.img", 0, b"x" * 4096), Record.resize("disk.img", 0)):
        applier = Applier(job)
        with pytest.raises(ApplyError, match=r"disk\.img has 1 other hard link"):
            applier.apply_many([record])
        applier.close()
    assert victim.read_bytes() == b"v" * 65536


def test_files_never_get_set_id_bits_and_folders_keep_theirs(tmp_path: Path) -> None:
    """The owner is not replicated: a set-id file would run as the receiver's user (root)."""
    job = tmp_path / "job"
    applier = Applier(job)
    applier.apply_many(
        [
            Record.file("whole", b"#!/bin/sh\n", 0o4755),
            Record.create("created", 0o6750),
            Record.file("chmodded", b"x", 0o644),
            Record.chmod("chmodded", 0o2711),
            Record.mkdir("shared", 0o2775),
            Record.chmod("shared", 0o3770),
        ]
    )
    applier.close()
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in job.iterdir()}
    assert modes == {"whole": 0o755, "created": 0o750, "chmodded": 0o711, "shared": 0o3770}


@pytest.mark.parametrize("step", ["barrier", "adopt"])
def test_a_failed_fsync_of_a_replica_file_names_it(tmp_path: Path, step: str) -> None:
    """An fsync's OSError names no file: the receiver's error read "receiver cannot
    apply: [Errno 5] Input/output error", whatever disk it was. It names the file now."""
    from tests.faultfs import FaultFS

    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        applier = Applier(fs.mountpoint / "job")
        try:
            applier.apply_many([Record.write("disk", 0, b"a" * 4096)])
            if step == "adopt":
                applier.barrier()
            rule = fs.add("fsync", errno.EIO, path="job/disk", times=1)
            with pytest.raises(OSError) as caught:
                if step == "barrier":
                    applier.detach_dirty().sync()
                else:
                    applier.adopt("disk")
            assert fs.hits()[str(rule)] == 1
            assert caught.value.errno == errno.EIO
            assert caught.value.filename == str(fs.mountpoint / "job" / "disk")
        finally:
            applier.close()


@pytest.mark.parametrize("where", ["ext4", "tmpfs", "no-fallocate"])
def test_zero_stays_allocated_and_trim_is_punched(
    tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZERO zeroes in place and keeps the blocks, TRIM punches them (journal/records.py),
    on a hole as on data, re-applied the same: with FALLOC_FL_ZERO_RANGE (ext4), without
    it (tmpfs: a hole punched and allocated again), and with no fallocate at all (zeros
    written: the TRIM's range then stays allocated too, more space and never less)."""
    kib = 1024
    root = tmp_path
    with contextlib.ExitStack() as stack:
        if where == "tmpfs":
            root = stack.enter_context(tmpfs(tmp_path / "mnt", "16m"))
        if where == "no-fallocate":

            def refused(fd: int, mode: int, offset: int, length: int) -> None:
                raise OSError(errno.EOPNOTSUPP, "not here")

            monkeypatch.setattr(volumes, "fallocate", refused)
        records = [
            Record.resize("disk", 2048 * kib),
            Record.write("disk", 0, b"\xaa" * (1024 * kib)),
            Record.zero("disk", 256 * kib, 256 * kib),  # over data
            Record.trim("disk", 512 * kib, 256 * kib),
            Record.zero("disk", 1536 * kib, 256 * kib),  # over a hole
            Record.zero("disk", 1920 * kib, 1024 * kib),  # clipped at the end
        ]
        applier = Applier(root / "job")
        for _ in range(2):
            applier.apply_many(records)
            applier.barrier()
        applier.close()
        disk = root / "job" / "disk"
        content = disk.read_bytes()
        assert len(content) == 2048 * kib
        assert content[: 256 * kib] == content[768 * kib : 1024 * kib] == b"\xaa" * 256 * kib
        assert content[256 * kib : 768 * kib] == bytes(512 * kib)
        assert not any(content[1024 * kib :])
        if where == "no-fallocate":
            want = [(0, 1024 * kib), (1536 * kib, 1792 * kib), (1920 * kib, 2048 * kib)]
        else:
            want = [(0, 512 * kib), (768 * kib, 1024 * kib), (1536 * kib, 1792 * kib),
                    (1920 * kib, 2048 * kib)]  # fmt: skip
        if where == "tmpfs":  # no FIEMAP, and SEEK_DATA calls fallocated pages holes
            assert disk.stat().st_blocks * 512 == sum(end - start for start, end in want)
        else:
            assert allocated(disk) == want
