"""The folder guard of FUSE capture, checked with real QEMU tools on the guarded files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from replicator.engine.folder_guard import FolderGuard
from tests.tools import qemu_img, require_tool

pytestmark = pytest.mark.tools


def _writable(path: Path) -> bool:
    """Whether ``qemu-io`` may open ``path`` for writing (asserting why when it may not)."""
    require_tool("qemu-io")
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write 0 1", str(path)],  # within any file
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        assert 'Failed to get "write" lock' in out.stdout + out.stderr, out.stdout + out.stderr
    return out.returncode == 0


def _readable(path: Path) -> bool:
    """Whether ``qemu-img info`` opens ``path`` without -U."""
    out = subprocess.run(["qemu-img", "info", str(path)], capture_output=True, timeout=60)
    return out.returncode == 0


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    source = tmp_path / "vm"
    (source / "sub").mkdir(parents=True)
    qemu_img("create", "-q", "-f", "raw", str(source / "a.img"), "1M")
    qemu_img("create", "-q", "-f", "raw", str(source / "sub" / "b.img"), "1M")
    (source / "vm.xml").write_text("<domain/>\n")
    return source


def test_images_are_kept_from_writers_and_open_to_readers(folder: Path) -> None:
    guard = FolderGuard(folder)
    guard.hold_all(["a.img", "sub/b.img", "vm.xml"])
    try:
        assert "a.img" in guard and "sub/b.img" in guard
        assert "vm.xml" not in guard  # a configuration file: nothing a lock would stop
        assert not _writable(folder / "a.img") and not _writable(folder / "sub" / "b.img")
        assert _readable(folder / "a.img")
        assert _writable(folder / "vm.xml")
    finally:
        guard.release()
    assert len(guard) == 0 and _writable(folder / "a.img")
    guard.release()  # again: nothing


def test_the_guard_follows_renames_and_lets_go_of_what_is_removed(folder: Path) -> None:
    guard = FolderGuard(folder)
    guard.hold_all(["a.img", "sub/b.img"])
    try:
        os.rename(folder / "sub", folder / "moved")  # a folder: its images go with it
        guard.moved("sub", "moved")
        assert "moved/b.img" in guard and not _writable(folder / "moved" / "b.img")
        os.rename(folder / "a.img", folder / "moved" / "b.img")  # over a guarded image
        guard.moved("a.img", "moved/b.img")
        assert len(guard) == 1 and not _writable(folder / "moved" / "b.img")
        held = _deleted_open(folder)
        assert held == [], held  # the image renamed over is let go, with its space
        os.unlink(folder / "moved" / "b.img")
        guard.removed("moved/b.img")
        assert len(guard) == 0 and _deleted_open(folder) == []
        qemu_img("create", "-q", "-f", "raw", str(folder / "moved" / "b.img"), "1M")
        assert guard.hold("moved/b.img") and not _writable(folder / "moved" / "b.img")
    finally:
        guard.release()


def test_the_owner_is_told_of_each_guarded_image_removed(folder: Path) -> None:
    told: list[tuple[int, int]] = []
    guard = FolderGuard(folder, gone=lambda st: told.append((st.st_dev, st.st_ino)))
    guard.hold_all(["a.img", "sub/b.img"])
    a, b = os.stat(folder / "a.img"), os.stat(folder / "sub" / "b.img")
    try:
        os.rename(folder / "a.img", folder / "sub" / "b.img")
        guard.moved("a.img", "sub/b.img")
        assert told == [(b.st_dev, b.st_ino)]
        os.unlink(folder / "sub" / "b.img")
        guard.removed("sub/b.img")
        guard.removed("vm.xml")  # never guarded: nothing to tell
        assert told == [(b.st_dev, b.st_ino), (a.st_dev, a.st_ino)]
    finally:
        guard.release()
    assert len(told) == 2  # a release is no removal


def test_a_file_replaced_before_the_mount_is_followed(folder: Path) -> None:
    guard = FolderGuard(folder)
    guard.hold_all(["a.img", "sub/b.img"])
    try:
        os.unlink(folder / "sub" / "b.img")
        (folder / "a.img").rename(folder / "old.img")
        qemu_img("create", "-q", "-f", "raw", str(folder / "a.img"), "1M")
        guard.follow()
        assert "a.img" in guard and "sub/b.img" not in guard
        assert not _writable(folder / "a.img") and _writable(folder / "old.img")
        assert _deleted_open(folder) == []
    finally:
        guard.release()


def test_a_file_is_guarded_once_it_is_an_image(folder: Path) -> None:
    guard = FolderGuard(folder)
    data = folder / "data"
    data.write_bytes(b"small")
    try:
        assert not guard.hold("data") and _writable(data)
        os.truncate(data, 2 * 1024 * 1024)  # larger than a configuration file may be
        with data.open("rb") as f:
            assert guard.hold("data", f.fileno())
        assert not _writable(data)
        assert not guard.hold("missing") and not guard.hold("sub")  # gone; a folder
    finally:
        guard.release()


def test_past_its_limit_the_guard_holds_no_more(folder: Path) -> None:
    guard = FolderGuard(folder, max_files=1)
    try:
        assert guard.hold("a.img") and not guard.hold("sub/b.img")
        assert _writable(folder / "sub" / "b.img")
    finally:
        guard.release()


def _deleted_open(folder: Path) -> list[str]:
    """Files of ``folder`` this process still has open after they were deleted."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(folder)) and target.endswith(" (deleted)"):
            found.append(target)
    return found
