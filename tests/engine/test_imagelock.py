"""One writer per image, checked with real QEMU tools on both sides of the lock."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from replicator.engine.errors import ConfigError
from replicator.engine.imagelock import ImageLock, ImageLocks, ReplicaGuard, session_mark
from tests.tools import idle_qemu_writer, qemu_img, require_tool

pytestmark = pytest.mark.tools


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    qemu_img("create", "-q", "-f", "raw", str(path), "1M")
    return path


def _qemu_io_write(path: Path) -> subprocess.CompletedProcess[str]:
    require_tool("qemu-io")
    return subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write 0 4k", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_sender_lock_on_the_same_image_is_refused(image: Path) -> None:
    first = ImageLock(image)
    first.acquire()
    try:
        with pytest.raises(ConfigError, match="already being replicated"):
            ImageLock(image).acquire()
        # the sender lock alone leaves QEMU alone: a VM keeps running under scan capture
        assert _qemu_io_write(image).returncode == 0
    finally:
        first.release()
    again = ImageLock(image)
    again.acquire()  # released with its descriptor
    again.release()


def test_serving_takes_qemus_write_lock(image: Path) -> None:
    lock = ImageLock(image)
    lock.acquire()
    lock.serve()
    try:
        out = _qemu_io_write(image)
        assert out.returncode != 0
        assert 'Failed to get "write" lock' in out.stderr + out.stdout
        assert qemu_img("info", str(image))  # readers still work
    finally:
        lock.release()
    assert _qemu_io_write(image).returncode == 0


def test_an_image_qemu_has_open_for_writing_is_not_served(image: Path) -> None:
    require_tool("qemu-io")
    qemu = subprocess.Popen(  # an interactive qemu-io keeps the image open, as a VM would
        ["qemu-io", "-f", "raw", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        time.sleep(0.5)
        lock = ImageLock(image)
        lock.acquire()
        try:
            with pytest.raises(ConfigError, match="open for writing by another program"):
                lock.serve()
        finally:
            lock.release()
    finally:
        assert qemu.stdin is not None
        qemu.stdin.write("quit\n")
        qemu.stdin.close()
        qemu.wait(timeout=30)


def test_locks_are_taken_all_or_none(tmp_path: Path, image: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * 4096)
    held = ImageLock(other)
    held.acquire()
    try:
        both = ImageLocks([image, other])
        with pytest.raises(ConfigError):
            both.acquire()
        alone = ImageLock(image)  # the first one was released when the second failed
        alone.acquire()
        alone.release()
    finally:
        held.release()


def _qemu_io(fmt: str, path: Path, command: str) -> subprocess.CompletedProcess[str]:
    require_tool("qemu-io")
    return subprocess.run(
        ["qemu-io", "-f", fmt, "-c", command, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_replica_guard_stops_qemu_writers_and_lets_readers_in(tmp_path: Path) -> None:
    """A receiver's replica: a VM started on it by hand (here qemu-io writing), or a
    rebase, fails with QEMU's own lock error; info, compare and an overlay that reads it as
    its backing file work without -U; released (a failover), it is an ordinary image."""
    replica = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(replica), "4M")
    guard = ReplicaGuard()
    guard.hold("vm.qcow2", os.open(replica, os.O_RDONLY))
    try:
        for command in ("write 0 4k", "truncate 8M"):
            out = _qemu_io("qcow2", replica, command)
            assert out.returncode != 0, command
            assert 'Failed to get "write" lock' in out.stderr + out.stdout
        rebase = subprocess.run(
            ["qemu-img", "rebase", "-u", "-b", "", str(replica)], capture_output=True, text=True
        )
        assert rebase.returncode != 0 and "lock" in rebase.stderr
        assert "virtual size: 4 MiB" in qemu_img("info", str(replica))
        assert "identical" in qemu_img("compare", str(replica), str(replica))
        overlay = tmp_path / "test-boot.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(replica), "-F", "qcow2", str(overlay))
        assert _qemu_io("qcow2", overlay, "write 0 4k").returncode == 0
        assert guard.writers() == []
    finally:
        guard.release()
    assert _qemu_io("qcow2", replica, "write 0 4k").returncode == 0


def test_the_replica_guard_names_a_writer_that_came_first(image: Path) -> None:
    vm = idle_qemu_writer("raw", image)
    guard = ReplicaGuard()
    try:
        guard.hold("disk.img", os.open(image, os.O_RDONLY))
        assert guard.writers() == ["disk.img"]
    finally:
        vm.kill()
        vm.wait()
    assert guard.writers() == []  # its locks went with it
    guard.release()


def test_the_replica_guard_lets_go_of_what_is_gone(tmp_path: Path, image: Path) -> None:
    """A replica removed or renamed away is let go (a descriptor kept would keep a deleted
    image's space); a file that is not an image is remembered by inode, not held."""
    before = len(os.listdir("/proc/self/fd"))
    guard = ReplicaGuard()
    guard.hold("disk.img", os.open(image, os.O_RDONLY))
    ino = image.stat().st_ino
    assert not guard.wants("disk.img", ino) and guard.wants("disk.img", ino + 1)
    guard.pass_over("vm.xml", 7)
    assert not guard.wants("vm.xml", 7) and guard.wants("vm.xml", 8)
    assert len(os.listdir("/proc/self/fd")) == before + 1
    guard.keep_only({"vm.xml"})
    assert len(os.listdir("/proc/self/fd")) == before
    assert guard.wants("disk.img", ino) and not guard.wants("vm.xml", 7)
    guard.release()
    assert guard.wants("vm.xml", 7)


def test_a_lock_follows_its_image_when_the_file_is_replaced(tmp_path: Path, image: Path) -> None:
    lock = ImageLock(image)
    lock.acquire()
    assert not lock.follow()  # the same file
    (tmp_path / "new.img").write_bytes(b"\0" * 4096)
    (tmp_path / "new.img").rename(image)
    other = ImageLock(image)
    other.acquire()  # nobody holds the new file yet: a second sender got in
    with pytest.raises(ConfigError, match="was replaced by another file, which another"):
        lock.follow()
    other.release()
    assert lock.follow()
    with pytest.raises(ConfigError, match="already being replicated"):
        ImageLock(image).acquire()
    assert not lock.follow()
    lock.release()


def test_a_replica_that_is_the_senders_own_source_is_named_by_its_mark(image: Path) -> None:
    """The receiver's --dir holding the sources themselves (one folder on one host, a
    datastore both hosts mount): the session's mark says whose lock is on the replica."""
    locks = ImageLocks([image])
    locks.acquire()
    other = ImageLocks([])  # another sender, e.g. one that reads the replica onward
    assert session_mark(locks.session_id()) == locks.mark != other.mark
    assert session_mark("not-hex!" + "0" * 24) is None
    guard = ReplicaGuard()
    try:
        guard.hold("disk.img", os.open(image, os.O_RDONLY))
        assert guard.sources(locks.mark) == ["disk.img"]
        assert guard.sources(other.mark) == []
        locks.release()
        assert guard.sources(locks.mark) == []
    finally:
        guard.release()
        locks.release()


def test_the_locks_of_a_removed_image_are_let_go(tmp_path: Path, image: Path) -> None:
    """FUSE capture: an image unlinked through the mount kept its space taken, held by the
    sender lock's descriptor, until the sender stopped."""
    other = tmp_path / "other.img"
    qemu_img("create", "-q", "-f", "raw", str(other), "1M")
    locks = ImageLocks([image, other])
    locks.acquire()
    try:
        gone = os.stat(image)
        image.unlink()
        locks.let_go(gone)
        assert f"{image} (deleted)" not in _open_files()
        assert locks.locks[other].holds(os.stat(other))  # the others stay
        with pytest.raises(ConfigError, match="already being replicated"):
            ImageLock(other).acquire()
    finally:
        locks.release()


def _open_files() -> list[str]:
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            found.append(os.readlink(fd))
    return found
