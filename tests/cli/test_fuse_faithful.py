"""A FUSE job's replica folder as the source has it, at the edges a probe of the filter
found: names the apply's temp file collided with or made too long, folder modes, a folder
that became a file before a reconnect, a journal reopened with a smaller cap."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.tools import (
    ReceiverProc,
    b3,
    fuse_folder,  # noqa: F401  (the fixture `folder`)
    is_mounted,
    start_fuse_sender,
    start_receiver,
)


def _until(done: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 60  # a FUSE round trip and a cycle, on a loaded machine
    while not done():
        assert proc.poll() is None, f"{what}: the sender exited: " + (
            proc.stderr.read()[-3000:] if proc.stderr else ""
        )
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[str], mnt: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert rc == 0, proc.stderr.read()[-3000:] if proc.stderr else rc


def _same(source: Path, replica: Path) -> bool:
    """Names, kinds, modes and file contents of the two trees are equal."""

    def tree(root: Path) -> dict[str, tuple[int, str]]:
        out: dict[str, tuple[int, str]] = {}
        for path in root.rglob("*"):
            st = path.lstat()
            content = b3(path) if stat.S_ISREG(st.st_mode) else ""
            out[str(path.relative_to(root))] = (st.st_mode, content)
        return out

    return replica.is_dir() and tree(source) == tree(replica)


def test_names_the_apply_used_for_its_temp_file_are_replicated_like_any_other(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """A small file goes whole (temp file, fsync, rename). Its temp was `.NAME.tmp`, which
    deleted a file of that name beside NAME while both sides said caught up; and NAME of
    251 to 255 bytes made the temp's name too long, wedging the job for good."""
    source, mnt = folder
    (source / ".vm.xml.tmp").write_text("a file the admin keeps")
    longest = "z" * 255
    (source / longest).write_text("a name as long as ext4 allows")
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    replica = receiver.dir / "fvm"
    try:
        _until(lambda: _same(source, replica), proc, "the initial sync")
        (mnt / ("y" * 253)).write_text("written live")
        (mnt / "vm.xml").write_text("<domain><name>vm2</name></domain>\n")
        _until(lambda: _same(source, replica), proc, "the live writes")
    finally:
        _stop(proc, mnt)
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)  # sent whole again: a restart
    try:
        (mnt / ".vm.xml.tmp").write_text("changed while the job runs")
        _until(lambda: _same(source, replica), proc, "after the restart")
    finally:
        _stop(proc, mnt)


def test_folder_modes_are_the_sources_whatever_the_umask_and_setgid(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """mkdir on the receiver applied its umask (0o022) and dropped setgid: 2775 became 755,
    1777 became 1755, while the receiver said it held a consistency point."""
    source, mnt = folder
    for name, mode in (("shared", 0o2775), ("tmp", 0o1777), ("open", 0o777)):
        (source / name).mkdir()
        os.chmod(source / name, mode)
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    replica = receiver.dir / "fvm"
    old = os.umask(0)
    try:
        _until(lambda: _same(source, replica), proc, "the initial sync")
        (mnt / "live777").mkdir(0o777)
        (mnt / "live770").mkdir(0o770)
        (mnt / "shared" / "inner").mkdir(0o2770)
        _until(lambda: _same(source, replica), proc, "folders made live")
    finally:
        os.umask(old)
        _stop(proc, mnt)
    assert stat.S_IMODE((replica / "live777").stat().st_mode) == 0o777


def test_a_folder_that_became_a_file_does_not_stop_the_sender_at_a_reconnect(
    tmp_path: Path, folder: tuple[Path, Path]
) -> None:
    """The sender stated every file it had at start when it connected again: `d/f`, whose
    folder `d` is a file now, raised ENOTDIR, and the live sender exited 9 and unmounted
    the VM's folder."""
    source, mnt = folder
    (source / "d").mkdir()
    (source / "d" / "f").write_text("x")
    receiver = start_receiver(tmp_path / "target")
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    replica = receiver.dir / "fvm"
    try:
        _until(lambda: _same(source, replica), proc, "the initial sync")
        (mnt / "d" / "f").unlink()
        (mnt / "d").rmdir()
        (mnt / "d").write_text("now a file")
        receiver.stop(signal.SIGKILL)
        receiver = start_receiver(receiver.dir, port=receiver.port)
        _until(lambda: _same(source, replica), proc, "the replica after the reconnect")
        assert is_mounted(mnt)
    finally:
        try:
            _stop(proc, mnt)
        finally:  # also when the sender failed: no receiver left running
            receiver.stop()


def test_a_journal_reopened_with_a_smaller_cap_makes_room_instead_of_waiting(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """Stopped with 20 MiB of applied records in its journal's active segment, restarted
    with --journal-max 8M: no ack was coming that would trim it, and the restart's sync
    waited for room for ever, silently, never mounting."""
    source, mnt = folder
    disk = source / "d.raw"
    disk.write_bytes(b"\0" * (32 << 20))
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    replica = receiver.dir / "fvm"
    try:
        with (mnt / "d.raw").open("r+b") as f:
            f.write(os.urandom(20 << 20))
        _until(lambda: _same(source, replica), proc, "20 MiB written")
    finally:
        _stop(proc, mnt)
    proc = start_fuse_sender(receiver, tmp_path, source, mnt, extra=("--journal-max", "8M"))
    try:
        with (mnt / "d.raw").open("r+b") as f:
            f.write(os.urandom(1 << 20))
        _until(lambda: _same(source, replica), proc, "a write after the restart")
        assert sum(p.stat().st_size for p in (tmp_path / "state" / "journal").iterdir()) <= (
            8 << 20
        )
    finally:
        _stop(proc, mnt)


def test_a_restart_after_a_kill_is_not_taken_for_a_restored_state_folder(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """Records the receiver had were trimmed from the journal past the manifests of the
    last sync; SIGKILLed, the sender saved no newer ones. The restart compares with the
    replica, as it must, but warned "the journal does not hold lsn ... (was it restored
    from an older copy?)" after every kill."""
    source, mnt = folder
    (source / "d.raw").write_bytes(b"\0" * (16 << 20))
    small = ("--journal-max", "8M")  # 2 MiB segments: trimmed as they are applied
    proc = start_fuse_sender(receiver, tmp_path, source, mnt, extra=small)
    replica = receiver.dir / "fvm"
    try:
        with (mnt / "d.raw").open("r+b") as f:
            f.write(os.urandom(12 << 20))
        _until(lambda: _same(source, replica), proc, "12 MiB written")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    proc = start_fuse_sender(receiver, tmp_path, source, mnt, extra=small)
    try:
        with (mnt / "d.raw").open("r+b") as f:
            f.write(os.urandom(1 << 20))
        _until(lambda: _same(source, replica), proc, "a write after the restart")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read() if proc.stderr else ""
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert '"sender.journal_gap"' not in err, err[-3000:]
