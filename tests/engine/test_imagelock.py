"""One writer per image, checked with real QEMU tools on both sides of the lock."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from replicator.engine.errors import ConfigError
from replicator.engine.imagelock import ImageLock, ImageLocks
from tests.tools import qemu_img, require_tool

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
