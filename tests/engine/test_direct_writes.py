"""Large aligned writes reach a replica past the page cache; everything else, and every file
system that refuses O_DIRECT, the ordinary way; the file's bytes are the same either way."""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.engine.applier import Applier
from replicator.engine.direct_writes import ALIGN, DIRECT_MIN
from replicator.journal import Record
from tests.engine.page_cache import PAGE, cached_pages, takes_o_direct

MiB = 1024 * 1024


def apply(folder: Path, records: list[Record], *, journaled: bool = True) -> None:
    applier = Applier(folder)
    try:
        if journaled:
            applier.apply_many(records, past_cache=True)
        else:
            applier.apply_many(records)  # a first sync's records, applied as they arrive
        applier.barrier()
    finally:
        applier.close()


def test_a_large_aligned_write_passes_the_page_cache_and_a_small_one_does_not(
    tmp_path: Path,
) -> None:
    assert takes_o_direct(tmp_path), f"{tmp_path}'s file system must take O_DIRECT here"
    big = os.urandom(MiB)
    apply(tmp_path / "job", [Record.write("disk", 0, big), Record.write("disk", 2 * MiB + 5, b"x")])
    disk = tmp_path / "job" / "disk"
    pages = cached_pages(disk)  # before anything reads the file
    assert not any(pages[: MiB // PAGE]), "the 1 MiB write went through the page cache"
    assert pages[(2 * MiB + 5) // PAGE], "the 1-byte write was expected in the page cache"
    data = disk.read_bytes()
    assert data[:MiB] == big and data[2 * MiB + 5 :] == b"x"
    assert data[MiB : 2 * MiB + 5] == bytes(MiB + 5)


@pytest.mark.parametrize(
    ("offset", "length", "journaled"),
    [(0, DIRECT_MIN - ALIGN, True), (512, MiB, True), (0, MiB + 512, True), (0, MiB, False)],
    ids=["too small", "offset unaligned", "length unaligned", "a first sync's"],
)
def test_small_unaligned_or_first_sync_writes_keep_the_page_cache(
    tmp_path: Path, offset: int, length: int, journaled: bool
) -> None:
    apply(tmp_path / "job", [Record.write("disk", offset, b"y" * length)], journaled=journaled)
    disk = tmp_path / "job" / "disk"
    assert all(cached_pages(disk)[offset // PAGE : (offset + length) // PAGE])
    assert disk.read_bytes()[offset:] == b"y" * length


def _refusing(
    real: Callable[..., Any], direct: Callable[..., bool], calls: list[object]
) -> Callable[..., Any]:
    """``real`` (os.open or os.pwrite, patched for the whole process), except that calls
    about O_DIRECT are counted and refused as a file system without it refuses them."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if direct(*args):
            calls.append(args[0])
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(*args, **kwargs)

    return wrapper


def _is_direct(fd: int, *_: object) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def test_a_file_system_refusing_o_direct_at_open_is_written_as_usual_and_not_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opens: list[object] = []
    fake = _refusing(os.open, lambda path, flags, *_: bool(flags & os.O_DIRECT), opens)
    monkeypatch.setattr(os, "open", fake)
    first, second = os.urandom(MiB), os.urandom(MiB)
    apply(tmp_path / "job", [Record.write("a", 0, first), Record.write("b", MiB, second)])
    assert (tmp_path / "job" / "a").read_bytes() == first
    assert (tmp_path / "job" / "b").read_bytes()[MiB:] == second
    assert len(opens) == 1, "a file system that refused was asked again"


def test_a_direct_write_refused_at_the_first_write_is_written_as_usual(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[object] = []
    monkeypatch.setattr(os, "pwrite", _refusing(os.pwrite, _is_direct, writes))
    first, second = os.urandom(MiB), os.urandom(MiB)
    apply(tmp_path / "job", [Record.write("disk", 0, first), Record.write("disk", MiB, second)])
    assert (tmp_path / "job" / "disk").read_bytes() == first + second
    assert len(writes) == 1, "a file system that refused a direct write was asked again"


def test_a_short_direct_write_is_finished_the_usual_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite
    shortened: list[int] = []

    def short(fd: int, data: memoryview, offset: int) -> int:
        if not _is_direct(fd):
            return real(fd, data, offset)
        shortened.append(offset)
        return real(fd, data[:ALIGN], offset)  # what a nearly full disk may do

    monkeypatch.setattr(os, "pwrite", short)
    big = os.urandom(3 * MiB)  # longer than the bounce buffer too
    apply(tmp_path / "job", [Record.write("disk", 0, big)])
    assert (tmp_path / "job" / "disk").read_bytes() == big
    assert shortened == [0]


_writes = st.lists(
    st.one_of(  # large aligned (direct), small unaligned (page cache), overlapping both
        st.tuples(st.integers(0, 8).map(lambda n: n * 64 * 1024), st.sampled_from([4, 8, 16])),
        st.tuples(st.integers(0, 700_000), st.integers(1, 9000)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(_writes)
def test_any_mix_of_direct_and_ordinary_writes_leaves_the_bytes_written_last(
    writes: list[tuple[int, int]],
) -> None:
    model = bytearray()
    records = []
    for n, (offset, size) in enumerate(writes):
        length = size * 64 * 1024 if size in (4, 8, 16) and offset % ALIGN == 0 else size
        data = bytes([n + 1]) * length
        records.append(Record.write("disk", offset, data))
        model.extend(bytes(max(0, offset + length - len(model))))
        model[offset : offset + length] = data
    with tempfile.TemporaryDirectory() as folder:
        apply(Path(folder) / "job", records)
        assert (Path(folder) / "job" / "disk").read_bytes() == bytes(model)
