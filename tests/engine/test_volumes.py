from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.engine.errors import ConfigError
from replicator.engine.read_plan import data_ranges
from replicator.engine.volumes import (
    ExtentState,
    VolumeKind,
    Zeroing,
    digest_runs,
    extent_digest,
    iter_extents,
    pread_all,
    pwrite_all,
    resolve_volumes,
    zero_digest,
)
from replicator.transport.messages import DIGEST_SIZE

EXT = 64 * 1024


def _sparse(path: Path, size: int, writes: dict[int, bytes]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)


def test_iter_extents_classifies_holes_zeros_and_data(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    size = 64 * EXT + 1000  # a partial last extent
    data = os.urandom(EXT)
    _sparse(path, size, {3 * EXT: data, 10 * EXT: bytes(EXT), 64 * EXT: b"tail" * 250})
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = list(iter_extents(fd, size, EXT))
    finally:
        os.close(fd)
    assert [e.index for e in extents] == list(range(65))
    by_index = {e.index: e for e in extents}
    assert by_index[3].state is ExtentState.DATA
    assert by_index[3].digest == extent_digest(data)
    assert by_index[10].state in (ExtentState.ZERO, ExtentState.HOLE)
    assert by_index[10].digest == zero_digest(EXT)
    assert by_index[20].state is ExtentState.HOLE
    assert by_index[64].length == 1000
    assert by_index[64].digest == extent_digest(b"tail" * 250)
    assert sum(e.length for e in extents) == size


def test_data_ranges_skip_holes(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    _sparse(path, 100 * 1024 * 1024, {50 * 1024 * 1024: b"x" * 4096})
    fd = os.open(path, os.O_RDONLY)
    try:
        ranges = data_ranges(fd, 100 * 1024 * 1024)
    finally:
        os.close(fd)
    assert sum(end - start for start, end in ranges) < 1024 * 1024
    assert any(start <= 50 * 1024 * 1024 < end for start, end in ranges)


def test_punch_hole_reads_zeros_and_keeps_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\xff" * (4 * EXT))
    fd = os.open(path, os.O_RDWR)
    try:
        assert Zeroing().punch(fd, EXT, 2 * EXT)
    finally:
        os.close(fd)
    content = path.read_bytes()
    assert len(content) == 4 * EXT
    assert content[EXT : 3 * EXT] == bytes(2 * EXT)
    assert content[:EXT] == b"\xff" * EXT and content[3 * EXT :] == b"\xff" * EXT


def test_resolve_volumes_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_volumes([tmp_path / "missing.vhd"])
    (tmp_path / "dangling.vhd").symlink_to(tmp_path / "moved" / "disk.vhd")
    with pytest.raises(ConfigError, match=r"is a symbolic link to .*moved/disk\.vhd, which does"):
        resolve_volumes([tmp_path / "dangling.vhd"])
    with pytest.raises(ConfigError, match="not a regular file") as folder:
        resolve_volumes([tmp_path])
    assert folder.value.hint is not None and "--capture fuse" in folder.value.hint
    device = tmp_path / "lv"
    os.mknod(device, stat.S_IFBLK | 0o600, os.makedev(7, 0))  # as root, like the suite
    with pytest.raises(ConfigError, match="not a regular file") as block:
        resolve_volumes([device])
    assert block.value.hint is not None and "not block devices" in block.value.hint
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "disk.img").write_bytes(b"x")
    (tmp_path / "b" / "disk.img").write_bytes(b"y")
    with pytest.raises(ConfigError, match="share the name"):
        resolve_volumes([tmp_path / "a" / "disk.img", tmp_path / "b" / "disk.img"])
    # one file under two names: the second lock used to say "another replicator sender"
    os.link(tmp_path / "a" / "disk.img", tmp_path / "a" / "copy.img")
    (tmp_path / "a" / "current.img").symlink_to("disk.img")
    for other in ("copy.img", "current.img", "./disk.img"):
        with pytest.raises(ConfigError, match="are the same file") as same:
            resolve_volumes([tmp_path / "a" / "disk.img", tmp_path / "a" / other])
        assert same.value.hint == "name each disk once"


def test_classify_disks_and_config_files(tmp_path: Path) -> None:
    xml = tmp_path / "vm.xml"
    xml.write_text("<domain/>")
    raw = tmp_path / "disk0.img"
    raw.write_bytes(b"\0" * 4096)
    qcow = tmp_path / "noext"
    qcow.write_bytes(b"QFI\xfb" + b"\0" * 100)
    kinds = {v.name: v.kind for v in resolve_volumes([xml, raw, qcow])}
    assert kinds == {
        "vm.xml": VolumeKind.FILE,
        "disk0.img": VolumeKind.DISK,
        "noext": VolumeKind.DISK,
    }


def test_pwrite_all_finishes_short_writes_and_refuses_a_stuck_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite
    calls: list[int] = []

    def short(fd: int, data: Any, offset: int) -> int:
        calls.append(len(data))
        return real(fd, memoryview(data)[:3], offset)

    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        monkeypatch.setattr(os, "pwrite", short)
        pwrite_all(fd, b"0123456789", 5)
        assert calls == [10, 7, 4, 1]
        monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
        with pytest.raises(OSError, match="wrote nothing"):
            pwrite_all(fd, b"x", 0)
        monkeypatch.setattr(os, "pwrite", real)
        assert pread_all(fd, 100, 5) == b"0123456789"
    finally:
        os.close(fd)


def _as_digests(values: list[int]) -> bytes:
    return b"".join(bytes([v]) * DIGEST_SIZE for v in values)


@given(
    new=st.lists(st.integers(0, 2), max_size=80),
    old=st.lists(st.integers(0, 2), max_size=80),
    block=st.integers(1, 9),
)
def test_digest_runs_say_what_comparing_one_by_one_says(
    new: list[int], old: list[int], block: int
) -> None:
    """Runs cover all of ``new`` in order, alternate between same and not, and say of each
    extent what comparing it alone says (past the end of ``old``: not the same)."""
    runs = list(digest_runs(_as_digests(old), _as_digests(new), block))
    flat = [same for lo, hi, same in runs for _ in range(lo, hi)]
    assert flat == [k < len(old) and old[k] == v for k, v in enumerate(new)]
    assert all(lo < hi for lo, hi, _ in runs)
    assert [lo for lo, _, _ in runs[1:]] == [hi for _, hi, _ in runs[:-1]]
    assert all(a[2] != b[2] for a, b in itertools.pairwise(runs))
