"""The differential scan's helper processes (engine/extent_hasher.py, hashing_helper.py).

The oracle is ``volumes.iter_extents``: whatever the helpers do (hash everything, die part
way, give up because most of it changed), the extents that come out are the same, in the
same order, and every extent whose digest differs from the basis carries the bytes the
file holds.
"""

from __future__ import annotations

import io
import os
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.engine import extent_hasher, hashing_helper, read_plan
from replicator.engine.extent_hasher import iter_extents_against
from replicator.engine.read_plan import deal
from replicator.engine.volumes import (
    Extent,
    ExtentState,
    Holes,
    Unchanged,
    extent_digest,
    hole_digests,
    iter_extents,
    iter_runs,
    pread_all,
    zero_digest,
    zeros,
)
from replicator.transport.messages import DIGEST_SIZE

EXT = 4096


def _layout(path: Path, size: int, pieces: list[tuple[int, str]]) -> None:
    """A sparse file: ``pieces`` are (extent, kind) with kind data, zeros or hole."""
    with path.open("wb") as f:
        f.truncate(size)
        for index, kind in pieces:
            if kind == "hole":
                continue
            f.seek(index * EXT)
            body = os.urandom(EXT) if kind == "data" else bytes(EXT)
            f.write(body[: max(0, min(EXT, size - index * EXT))])


def _oracle(fd: int, size: int) -> list[tuple[int, ExtentState, bytes]]:
    return [(e.index, e.state, e.digest) for e in iter_extents(fd, size, EXT)]


Row = tuple[int, ExtentState | None, bytes]  # index, state (None: in a run), digest


def _split(digests: bytes) -> list[bytes]:
    return [digests[k : k + DIGEST_SIZE] for k in range(0, len(digests), DIGEST_SIZE)]


def _rows(got: list[Extent | Unchanged | Holes], size: int) -> list[Row]:
    """Every extent, runs of unchanged ones one by one (their state is not given), holes
    one by one."""
    rows: list[Row] = []
    for e in got:
        if isinstance(e, Holes):
            rows += [
                (k, ExtentState.HOLE, digest)
                for k, digest in zip(
                    range(e.first, e.first + e.count),
                    _split(hole_digests(size, EXT, e.first, e.count)),
                    strict=True,
                )
            ]
        elif isinstance(e, Unchanged):
            digests = e.digests
            rows += [
                (e.first + k, None, digests[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE])
                for k in range(e.count)
            ]
        else:
            rows.append((e.index, e.state, e.digest))
    return rows


def _check(
    fd: int, size: int, basis: bytes | bytearray, got: list[Extent | Unchanged | Holes]
) -> None:
    """Same extents as the oracle; data exactly where the digest moved from the basis; in
    a run only extents whose digest did not."""
    rows, oracle = _rows(got, size), _oracle(fd, size)
    assert [(i, d) for i, _, d in rows] == [(i, d) for i, _, d in oracle]
    for (index, state, digest), (_, want, _) in zip(rows, oracle, strict=True):
        if state is None:
            assert basis[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] == digest
        else:
            assert state is want
    for e in got:
        if not isinstance(e, Extent):
            continue
        moved = basis[e.index * DIGEST_SIZE : (e.index + 1) * DIGEST_SIZE] != e.digest
        if e.state is ExtentState.DATA and moved:
            assert e.data is not None
            assert bytes(e.data) == pread_all(fd, e.length, e.offset).ljust(e.length, b"\0")


def _slicer(basis: bytes | bytearray) -> Callable[[int, int], bytes]:
    """``basis`` as ``ExtentManifest.slice`` gives a manifest's digests."""
    return lambda first, count: bytes(basis[first * DIGEST_SIZE : (first + count) * DIGEST_SIZE])


def _scan(
    fd: int, size: int, basis: bytes | bytearray, helpers: int = 2
) -> list[Extent | Unchanged | Holes]:
    out: list[Extent | Unchanged | Holes] = []
    for e in iter_extents_against(fd, size, _slicer(basis), EXT, helpers=helpers, min_size=0):
        if isinstance(e, Extent) and e.data is not None:
            e.data = memoryview(bytes(e.data))  # iter_extents' views die with the next chunk
        out.append(e)
    return out


def _with_data(got: list[Extent | Unchanged | Holes]) -> list[Extent]:
    return [e for e in got if isinstance(e, Extent) and e.data is not None]


def _basis(fd: int, size: int, keep: list[bool]) -> bytearray:
    """The oracle's digests, with the ones ``keep`` says False about replaced."""
    digests = bytearray()
    for (_, _, digest), kept in zip(_oracle(fd, size), keep + [True] * size, strict=False):
        digests += digest if kept else b"\x01" * DIGEST_SIZE
    return digests


def _scan_checked(disk: tuple[Path, int], keep: list[bool]) -> list[Extent | Unchanged | Holes]:
    """Scan ``disk`` against its own digests but where ``keep`` is False, and check it."""
    path, size = disk
    fd = os.open(path, os.O_RDONLY)
    try:
        basis = _basis(fd, size, keep)
        got = _scan(fd, size, basis)
        _check(fd, size, basis, got)
        return got
    finally:
        os.close(fd)


kinds = st.sampled_from(["data", "data", "zeros", "hole"])


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    extents=st.integers(1, 300),
    tail=st.integers(0, EXT - 1),
    pieces=st.lists(st.tuples(st.integers(0, 300), kinds), max_size=60),
    keep=st.lists(st.booleans(), max_size=300),
    short_basis=st.integers(0, 300),
    helpers=st.integers(1, 3),
)
def test_the_same_extents_as_one_reading_pass(
    tmp_path: Path,
    extents: int,
    tail: int,
    pieces: list[tuple[int, str]],
    keep: list[bool],
    short_basis: int,
    helpers: int,
) -> None:
    size = extents * EXT + tail
    path = tmp_path / f"disk-{extents}-{tail}-{len(pieces)}"
    _layout(path, size, pieces)
    fd = os.open(path, os.O_RDONLY)
    try:
        basis = _basis(fd, size, keep)[: short_basis * DIGEST_SIZE or None]
        _check(fd, size, basis, _scan(fd, size, basis, helpers))
    finally:
        os.close(fd)
        path.unlink()


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, int]:
    size = 2000 * EXT + 123
    path = tmp_path / "disk.raw"
    _layout(path, size, [(i, "data") for i in range(0, 2001, 3)] + [(7, "zeros")])
    return path, size


def test_unchanged_extents_come_without_data_and_changed_ones_with(disk: tuple[Path, int]) -> None:
    got = _scan_checked(disk, [i % 50 != 0 for i in range(2001)])  # 2%: helpers to the end
    with_data = {e.index for e in _with_data(got)}
    assert with_data == {i for i in range(0, 2001, 50) if i % 3 == 0}


def test_extents_that_did_not_change_come_in_runs(tmp_path: Path) -> None:
    """A walk over every extent of the image costs one object per run, not per extent:
    only the changed ones come one by one (engine/scan.py visits every item)."""
    path = tmp_path / "full.raw"
    path.write_bytes(os.urandom(2001 * EXT))
    moved = {0, 17, 18, 500, 1999, 2000}
    got = _scan_checked((path, 2001 * EXT), [i not in moved for i in range(2001)])
    assert {e.index for e in got if isinstance(e, Extent)} == moved
    runs = [e for e in got if isinstance(e, Unchanged)]
    assert sum(run.count for run in runs) == 2001 - len(moved)
    # between the changed ones, and where a helper's run of extents (a read chunk) ends
    assert len(runs) <= len(moved) + 2001 * EXT // read_plan.READ_CHUNK + 1


def test_a_helper_that_dies_part_way_leaves_the_rest_to_the_threads(
    disk: tuple[Path, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """It answers its first run of extents, then dies (SIGKILL, as the kernel's OOM killer
    would kill it)."""
    script = tmp_path / "dying_helper.py"
    script.write_text(
        textwrap.dedent(
            """
            import io, os, signal, sys
            from replicator.engine import hashing_helper as m
            req = sys.stdin.buffer.read()
            size, ext, dsz, n = m.HEAD.unpack_from(req)
            first = m.RUN.unpack_from(req, m.HEAD.size)
            one = io.BytesIO(m.request(size, ext, dsz, [first]))
            m.serve(int(sys.argv[1]), one, sys.stdout.buffer)
            os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    monkeypatch.setattr(hashing_helper, "COMMAND", [sys.executable, str(script)])
    _scan_checked(disk, [i % 50 != 0 for i in range(2001)])


def test_a_helper_that_exits_before_taking_its_work_leaves_it_to_the_threads(
    disk: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether its start sees the broken pipe (``spawn`` raises) or the scan sees its
    output end at once, the extents are the oracle's."""
    monkeypatch.setattr(hashing_helper, "COMMAND", [sys.executable, "-c", "pass"])
    _scan_checked(disk, [i % 50 != 0 for i in range(2001)])


def test_spawn_says_when_a_helper_died_before_taking_its_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request larger than the pipe, to a helper that exits at once: the write meets
    the closed pipe, and ``spawn`` raises instead of returning a dead helper."""
    monkeypatch.setattr(hashing_helper, "COMMAND", [sys.executable, "-c", "pass"])
    path = tmp_path / "f"
    path.write_bytes(bytes(EXT))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            hashing_helper.spawn(fd, bytes(4 * 1024 * 1024), pipe_bytes=0)
    finally:
        os.close(fd)


def test_a_digest_a_helper_saw_is_never_the_one_kept_for_a_changed_extent(
    disk: tuple[Path, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The extent changes between a helper's hash and the scan's read (here: the helper
    reports a digest nobody will find): the scan ships what it reads and keeps that
    read's digest, so the manifest never names bytes the replica did not get."""
    script = tmp_path / "stale_helper.py"
    script.write_text(
        textwrap.dedent(
            """
            import io, sys
            from replicator.engine import hashing_helper as m
            out = io.BytesIO()
            m.serve(int(sys.argv[1]), sys.stdin.buffer, out)
            digests = bytearray(out.getvalue())
            digests[4 * 16 : 5 * 16] = b"\\x07" * 16  # its fifth extent: seen before a write
            sys.stdout.buffer.write(digests)
            """
        )
    )
    monkeypatch.setattr(hashing_helper, "COMMAND", [sys.executable, str(script)])
    got = _scan_checked(disk, [True] * 2001)  # nothing changed against the basis
    with_data = _with_data(got)
    assert len(with_data) == 2  # the fifth extent of each of the two helpers' hands
    path, _ = disk
    for e in with_data:
        assert e.digest == extent_digest(path.read_bytes()[e.offset : e.offset + e.length])


def test_a_helper_that_cannot_start_leaves_it_all_to_the_threads(
    disk: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hashing_helper, "COMMAND", ["/nonexistent/python"])
    path, size = disk
    fd = os.open(path, os.O_RDONLY)
    try:
        basis = _basis(fd, size, [True] * 2001)
        _check(fd, size, basis, _scan(fd, size, basis))
    finally:
        os.close(fd)


def test_mostly_changed_goes_over_to_one_reading_pass(
    disk: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    switched: list[int] = []
    real = iter_runs

    def spy(*args: object, first: int = 0, **kwargs: object) -> object:
        switched.append(first)
        return real(*args, first=first, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(extent_hasher, "iter_runs", spy)
    _scan_checked(disk, [False] * 2001)  # nothing as it was
    assert len(switched) == 1 and 0 < switched[0] < 2001 // 2


def test_a_file_shorter_than_the_scan_reads_as_zeros_at_its_end(tmp_path: Path) -> None:
    """The size was taken before the file shrank: both scans see zeros past its end."""
    path = tmp_path / "shrunk.raw"
    path.write_bytes(os.urandom(100 * EXT + 10))
    size = 300 * EXT
    fd = os.open(path, os.O_RDONLY)
    try:
        basis = bytearray(b"\x02" * DIGEST_SIZE * 40) + _basis(fd, size, [])[40 * DIGEST_SIZE :]
        got = _scan(fd, size, basis)
        _check(fd, size, basis, got)
        rows = _rows(got, size)  # the last bytes and zeros after them, then zeros
        assert rows[100][2] == extent_digest(path.read_bytes()[100 * EXT :].ljust(EXT, b"\0"))
        assert rows[101][2] == zero_digest(EXT)
    finally:
        os.close(fd)


@given(
    runs=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 64)), max_size=30),
    parts=st.integers(1, 4),
)
def test_deal_gives_every_run_to_one_helper_in_turns(
    runs: list[tuple[int, int]], parts: int
) -> None:
    hands = deal(runs, parts)
    assert len(hands) == min(parts, len(runs)) and all(hands)
    assert sorted(run for hand in hands for run in hand) == sorted(runs)
    for k, hand in enumerate(hands):
        assert hand == runs[k::parts]


def test_helpers_that_may_run_only_a_little_ahead_give_the_same_extents(
    disk: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for three digests beyond what the scan took, the readers stop and go
    all the time (the helpers wait on full pipes): nothing is lost or reordered."""
    monkeypatch.setattr(extent_hasher, "AHEAD", 3 * DIGEST_SIZE)
    _scan_checked(disk, [i % 50 != 0 for i in range(2001)])


@pytest.mark.parametrize("read", [hashing_helper.READ, 1024])
def test_the_helper_process_hashes_what_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read: int
) -> None:
    """hashing_helper on its own: one digest per extent asked for, zero-padded past the
    file's end, in the order asked; extents larger than its buffer too (``read``)."""
    monkeypatch.setattr(hashing_helper, "READ", read)
    monkeypatch.setattr(hashing_helper, "_zero_digests", {})  # computed with this READ
    body = os.urandom(5 * EXT + 7)
    path = tmp_path / "f"
    path.write_bytes(body)
    fd = os.open(path, os.O_RDONLY)
    try:
        out = io.BytesIO()
        size = 8 * EXT
        runs = [(4, 3), (0, 1), (7, 1)]
        hashing_helper.serve(
            fd, io.BytesIO(hashing_helper.request(size, EXT, DIGEST_SIZE, runs)), out
        )
        want = [
            extent_digest(body[4 * EXT : 5 * EXT]),
            extent_digest(body[5 * EXT :] + zeros(EXT - 7)),
            extent_digest(zeros(EXT)),
            extent_digest(body[:EXT]),
            extent_digest(zeros(EXT)),  # wholly past the file's end
        ]
        assert out.getvalue() == b"".join(want)
    finally:
        os.close(fd)


class _CountingHasher:
    """blake3.blake3 that records, at each digest, how many bytes it was given."""

    hashed: list[int] = []  # per test: each replaces it
    real = blake3.blake3

    def __init__(self, data: bytes | memoryview = b"") -> None:
        self._inner = self.real(data)
        self._bytes = len(data)

    def update(self, data: bytes | memoryview) -> None:
        self._inner.update(data)
        self._bytes += len(data)

    def digest(self, length: int) -> bytes:
        self.hashed.append(self._bytes)
        return bytes(self._inner.digest(length))


@pytest.mark.parametrize("read", [hashing_helper.READ, 4096])
def test_the_helper_hashes_no_extent_of_zeros(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read: int
) -> None:
    """A zero extent gets the zero digest without being hashed (one hash per length, for
    the digest itself); extents that only start with zeros, or end with a byte set, are
    hashed, and every digest is the one of the bytes there. Read in pieces smaller than an
    extent too (``read``), as an extent larger than the helper's buffer is."""
    monkeypatch.setattr(hashing_helper, "READ", read)
    ext = 16 * 1024
    pieces = [
        bytes(ext),  # zeros
        os.urandom(ext),
        bytes(64) + os.urandom(ext - 64),  # starts with zeros
        bytes(ext - 1) + b"\x01",  # one byte set, at its end
        bytes(ext),
        bytes(4000),  # a last extent, shorter, of zeros
    ]
    path = tmp_path / "f"
    path.write_bytes(b"".join(pieces))
    monkeypatch.setattr(_CountingHasher, "hashed", [])
    monkeypatch.setattr(blake3, "blake3", _CountingHasher)  # the module the helper calls
    monkeypatch.setattr(hashing_helper, "_zero_digests", {})  # as in a helper just started
    fd = os.open(path, os.O_RDONLY)
    try:
        out = io.BytesIO()
        size = path.stat().st_size
        request = hashing_helper.request(size, ext, DIGEST_SIZE, [(0, 6)])
        hashing_helper.serve(fd, io.BytesIO(request), out)
    finally:
        os.close(fd)
    real = _CountingHasher.real
    assert out.getvalue() == b"".join(real(p).digest(DIGEST_SIZE) for p in pieces)
    # 3 with data, and 2 zero digests (one per length)
    assert sorted(_CountingHasher.hashed) == sorted([ext, ext, ext, ext, 4000])


def test_the_scan_ends_without_waiting_for_its_helpers_to_die(
    disk: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A helper takes milliseconds to die: the scan kills its helpers and returns; each is
    reaped in a thread of its own, and none is left."""
    released = threading.Event()
    helpers: list[extent_hasher._Helper] = []
    waited_for_release: list[bool] = []
    reap = extent_hasher._Helper._reap

    def slow_reap(self: extent_hasher._Helper) -> None:
        helpers.append(self)
        waited_for_release.append(released.wait(10))  # False: the scan waited for this
        reap(self)

    monkeypatch.setattr(extent_hasher._Helper, "_reap", slow_reap)
    _scan_checked(disk, [i % 5 != 0 for i in range(2001)])
    released.set()  # the scan has returned: only now may a reaping go on
    for _ in range(500):
        if len(waited_for_release) == len(helpers) == read_plan.HELPERS:
            break
        time.sleep(0.01)
    assert waited_for_release == [True] * read_plan.HELPERS
    for helper in helpers:
        assert helper.proc.wait(5) is not None  # killed, and reaped
