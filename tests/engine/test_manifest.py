from __future__ import annotations

import os
import tracemalloc
from pathlib import Path
from typing import Any

import lz4.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.engine.manifest import UNKNOWN, ExtentManifest, ManifestSet
from replicator.engine.volumes import digest_runs, hole_digests, zero_digest
from replicator.journal.durable import StateFileError, write_state
from tests.tools import peak_traced


def test_invalidate_marks_overlapping_extents() -> None:
    m = ExtentManifest(100, 1000, bytearray(b"\x01" * 160))
    m.invalidate(150, 100)  # touches extents 1 and 2
    assert [m.get(i) == UNKNOWN for i in range(10)] == [
        False, True, True, False, False, False, False, False, False, False
    ]  # fmt: skip


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(1, 512))
def test_resize_keeps_count_and_unknowns_partial_extents(old: int, new: int, ext: int) -> None:
    m = ExtentManifest(ext, old, bytearray(b"\x07" * (16 * ((old + ext - 1) // ext))))
    m.resize(new)
    assert len(m.slice(0, m.count + 1)) == 16 * m.count
    if new % ext and m.count:
        assert m.get(m.count - 1) == UNKNOWN


def test_differing_treats_unknown_as_changed() -> None:
    a = ExtentManifest(10, 30, bytearray(b"\x01" * 48))
    b = ExtentManifest(10, 30, bytearray(b"\x01" * 48))
    assert list(a.differing(b)) == []
    a.set(1, UNKNOWN)
    b.set(1, UNKNOWN)
    assert list(a.differing(b)) == [1]
    c = ExtentManifest(10, 50, bytearray(b"\x01" * 80))
    assert list(a.differing(c)) == [1, 3, 4]


def test_manifest_set_round_trip(tmp_path: Path) -> None:
    s = ManifestSet(
        42, 64, 3, {"d": ExtentManifest(64, 200, bytearray(range(64)))}, {"f": b"x" * 16}
    )
    s.save(tmp_path / "m.state")
    loaded = ManifestSet.load(tmp_path / "m.state")
    assert loaded == s
    assert ManifestSet.load(tmp_path / "missing") is None


MiB = 1024 * 1024
HOLE = bytes(range(16))  # every hole extent of a sparse image has this one digest


def _flat(manifest: ExtentManifest) -> bytes:
    """All of a manifest's digests, one after the other."""
    return manifest.slice(0, manifest.count)


def _sparse(size: int) -> ExtentManifest:
    m = ExtentManifest(65536, size, bytearray(HOLE * -(-size // 65536)))
    if m.count > 3:
        m.set(3, os.urandom(16))  # a little data among the holes
    return m


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 1024 * MiB), st.booleans())
def test_manifests_round_trip_at_rest_sparse_or_dense(size: int, dense: bool) -> None:
    """Each extent's digest comes back, whether the digests were kept as they are (dense:
    random digests do not compress) or compressed (a sparse image's repeated hole digest)."""
    count = -(-size // 65536)
    digests = bytearray(os.urandom(16 * count)) if dense else _flat(_sparse(size))
    m = ExtentManifest(65536, size, bytearray(digests))
    state = m.to_state()
    assert ("digests_lz4" in state) == (not dense and len(digests) >= 64 * 1024)
    assert ExtentManifest.from_state(state) == m


def test_a_sparse_images_manifest_is_small_at_rest(tmp_path: Path) -> None:
    """2 TiB of holes: 512 MiB of digests in memory, a few MiB in manifests.state."""
    s = ManifestSet(7, 65536, 1, {"big.raw": _sparse(2 * 1024 * MiB * 1024)})
    path = tmp_path / "manifests.state"
    s.save(path)
    assert path.stat().st_size < 4 * MiB
    assert ManifestSet.load(path) == s


def test_manifests_saved_before_compression_still_load(tmp_path: Path) -> None:
    m = _sparse(512 * MiB)
    write_state(
        tmp_path / "old.state",
        {"kind": "manifests", "lsn": 3, "epoch": 1, "extent_size": 65536,
         "disks": {"d.img": {"extent_size": 65536, "size": m.size, "digests": _flat(m)}},
         "files": {}},
    )  # fmt: skip
    loaded = ManifestSet.load(tmp_path / "old.state")
    assert loaded is not None and loaded.disks["d.img"] == m


@pytest.mark.parametrize("damage", ["garbage", "short", "long"])
def test_compressed_digests_that_do_not_fit_are_damage_not_a_basis(
    tmp_path: Path, damage: str
) -> None:
    """A state file whose checksum holds but whose compressed digests do not decode to the
    size's count (a bug, or a hand-made file) is refused, never taken short or long."""
    m = _sparse(512 * MiB)  # 128 KiB of digests: compressed
    packed = bytes(m.to_state()["digests_lz4"])
    other = _sparse(256 * MiB if damage == "short" else 1024 * MiB).to_state()["digests_lz4"]
    digests = {"garbage": packed[:20] + b"\xff" * 40, "short": other, "long": other}[damage]
    write_state(
        tmp_path / "m.state",
        {"kind": "manifests", "lsn": 3, "epoch": 1, "extent_size": 65536,
         "disks": {"d.img": {"extent_size": 65536, "size": m.size, "digests_lz4": digests}},
         "files": {}},
    )  # fmt: skip
    with pytest.raises(StateFileError, match="compressed digests"):
        ManifestSet.load(tmp_path / "m.state")


def _by_extent(a: ExtentManifest, b: ExtentManifest) -> list[int]:
    """``differing`` by its definition, one extent at a time."""
    return [i for i in range(max(a.count, b.count)) if a.get(i) != b.get(i) or a.get(i) == UNKNOWN]


# digests to build manifests from: two that meet as 16 zero bytes off a digest's start
_PIECES = [b"a" * 16, b"b" * 16, UNKNOWN, b"c" * 8 + b"\0" * 8, b"\0" * 8 + b"d" * 8]


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 9000),
    st.integers(0, 9000),
    st.lists(st.tuples(st.integers(0, 9000), st.integers(0, 4), st.booleans()), max_size=12),
)
def test_differing_in_blocks_is_differing_by_extent(
    count_a: int, count_b: int, changes: list[tuple[int, int, bool]]
) -> None:
    """Blocks of 4096 extents compared at once: a difference or an UNKNOWN anywhere in
    one, at its edges, past the shorter side or off a digest's start, is still found."""
    base = b"a" * 16 * max(count_a, count_b)
    a = ExtentManifest(64, count_a * 64, bytearray(base[: count_a * 16]))
    b = ExtentManifest(64, count_b * 64, bytearray(base[: count_b * 16]))
    for index, piece, on_a in changes:
        target = a if on_a else b
        if index < target.count:
            target.set(index, _PIECES[piece])
    assert list(a.differing(b)) == _by_extent(a, b)


def test_differing_reads_no_extent_of_a_block_that_matches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Extent by extent, a 16 TiB sparse image (268 million extents) took `verify` 165 s
    of CPU; a block that matches whole is one memcmp."""
    count = 100_000
    digests = bytearray(b"h" * 16 * count)
    a, b = ExtentManifest(64, count * 64, digests), ExtentManifest(64, count * 64, digests[:])
    b.set(70_000, b"x" * 16)
    looked = [0]
    real = ExtentManifest.get

    def counting(self: ExtentManifest, index: int) -> bytes:
        looked[0] += 1
        return real(self, index)

    monkeypatch.setattr(ExtentManifest, "get", counting)
    assert list(a.differing(b)) == [70_000]
    assert looked[0] <= 2 * 4096  # the one block that differs


def test_a_sparse_sources_manifest_is_held_once_while_it_is_built(tmp_path: Path) -> None:
    """verify built its source manifest as parts, joined, then copied: three copies of
    16 bytes per extent at once (a 12.6 GB peak for a 16 TiB image)."""

    from replicator.engine.verify import _source_manifest

    image = tmp_path / "sparse.img"
    with image.open("wb") as f:
        f.truncate(256 << 30)  # 4 million extents, 64 MiB of digests
        f.seek(1 << 30)
        f.write(b"data")
    digests = (256 << 30) // (64 << 10) * 16
    tracemalloc.start()
    try:
        manifest = _source_manifest(image, 64 << 10, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert manifest.count * 16 == len(_flat(manifest)) == digests
    assert manifest.get(1 << 14) != manifest.get(0)  # the data extent
    # and the scan's read buffers (16 MiB, whatever the size)
    assert peak < digests * 1.5, f"peak {peak / digests:.2f}x the digests"


# -- the chunked, copy-on-write manifest behaves exactly as one flat array of digests --

_EXT = 64  # small extents: a few chunks of 4096 extents are a few hundred KiB of volume
_HOLE = zero_digest(_EXT)
_DIGESTS = [b"a" * 16, b"b" * 16, UNKNOWN, _HOLE, b"c" * 8 + b"\0" * 8]


class _Flat:
    """The manifest as it was: one bytearray of digests (the model)."""

    def __init__(self, size: int, digests: bytes = b"") -> None:
        self.size = size
        self.digests = bytearray(digests).ljust(16 * self.count, b"\0")[: 16 * self.count]

    @property
    def count(self) -> int:
        return -(-self.size // _EXT)

    def set(self, index: int, digest: bytes) -> None:
        self.digests[index * 16 : index * 16 + 16] = digest

    def put(self, first: int, digests: bytes) -> None:
        self.digests[first * 16 : first * 16 + len(digests)] = digests

    def resize(self, size: int) -> None:
        old_count, old_size = self.count, self.size
        self.size = size
        self.digests = self.digests[: 16 * self.count].ljust(16 * self.count, b"\0")
        if old_count and old_size % _EXT and old_count - 1 < self.count:
            self.set(old_count - 1, UNKNOWN)
        if self.count and size % _EXT:
            self.set(self.count - 1, UNKNOWN)

    def invalidate(self, offset: int, length: int) -> None:
        if length > 0:
            for i in range(offset // _EXT, min(self.count, -(-(offset + length) // _EXT))):
                self.set(i, UNKNOWN)

    def get(self, index: int) -> bytes:
        return bytes(self.digests[index * 16 : index * 16 + 16]) if index < self.count else UNKNOWN


def _old_packed(digests: bytes) -> dict[str, bytes]:
    """manifests.state's digests as the flat manifest packed them (the bytes at rest)."""
    if len(digests) >= 64 * 1024:
        packer = lz4.frame.LZ4FrameCompressor(return_bytearray=True)
        packed = packer.begin(len(digests))
        for at in range(0, len(digests), 1 << 20):
            packed += packer.compress(digests[at : at + (1 << 20)])
        packed += packer.flush()
        if len(packed) <= len(digests) // 2:
            return {"digests_lz4": bytes(packed)}
    return {"digests": digests}


_SIZES = st.integers(0, 3 * 4096 * _EXT + 300)
_INDEX = st.integers(0, 3 * 4096 + 10)
_OPS = st.one_of(
    st.tuples(st.just("set"), _INDEX, st.sampled_from(_DIGESTS)),
    st.tuples(st.just("put"), _INDEX, st.integers(0, 9000), st.sampled_from(_DIGESTS)),
    st.tuples(st.just("put_holes"), _INDEX, st.integers(0, 9000)),
    st.tuples(st.just("resize"), _SIZES),
    st.tuples(st.just("invalidate"), st.integers(0, 3 * 4096 * _EXT), st.integers(-5, 6000 * _EXT)),
    st.tuples(st.just("invalidate_all")),
    st.tuples(st.just("copy"), st.booleans()),
    st.tuples(st.just("load")),
)


@settings(max_examples=150, deadline=None)
@given(_SIZES, st.booleans(), st.lists(_OPS, max_size=25))
def test_the_chunked_manifest_behaves_as_a_flat_array(
    size: int, holes: bool, ops: list[tuple[Any, ...]]
) -> None:
    """Every operation on a manifest gives what it gave on one flat bytearray of digests:
    across chunk edges, the short last chunk, shared hole and UNKNOWN chunks; a copy and
    the manifest it came from never see each other's changes afterwards; ``differing``
    is the definition's; and the bytes at rest are the flat manifest's."""
    model = _Flat(size, _HOLE * -(-size // _EXT) if holes else b"")
    m = ExtentManifest(_EXT, size, bytes(model.digests))
    kept: list[tuple[ExtentManifest, _Flat]] = []  # copies or their sources, as they were
    for op in ops:
        name, *args = op
        if name == "set" and model.count:
            index = args[0] % model.count
            m.set(index, args[1])
            model.set(index, args[1])
        elif name == "put" and model.count:
            first = args[0] % model.count
            n = min(args[1], model.count - first)
            pattern = (args[2] + b"z" * 16 + _HOLE) if args[1] % 7 == 1 else args[2]
            digests = (pattern * n)[: 16 * n]
            m.put(first, digests)
            model.put(first, digests)
        elif name == "put_holes" and model.count:
            first = args[0] % model.count
            m.put_holes(first, args[1])
            n = min(args[1], model.count - first)
            model.put(first, hole_digests(model.size, _EXT, first, n))
        elif name == "resize":
            m.resize(args[0])
            model.resize(args[0])
        elif name == "invalidate":
            m.invalidate(*args)
            model.invalidate(*args)
        elif name == "invalidate_all":
            m.invalidate_all()
            model.digests = bytearray(16 * model.count)
        elif name == "copy":  # one side goes on changing: the original, or the copy
            copy = m.copy()
            kept.append((copy if args[0] else m, _Flat(model.size, bytes(model.digests))))
            m = m if args[0] else copy
        elif name == "load":
            state = m.to_state()
            flat = bytes(model.digests)
            assert {k: bytes(v) for k, v in state.items() if k.startswith("digests")} == (
                _old_packed(flat)
            )
            m = ExtentManifest.from_state(state)
        assert (m.size, m.count) == (model.size, model.count)
        assert m.slice(0, m.count + 5) == bytes(model.digests)
    assert m == ExtentManifest(_EXT, model.size, bytes(model.digests))
    for i in (0, model.count // 2, max(0, model.count - 1), model.count, model.count + 1):
        assert m.get(i) == model.get(i)
    for first in (0, 4090, 4096, 8191):  # across and at chunk edges
        assert m.slice(first, 10) == bytes(model.digests[first * 16 : first * 16 + 160])
    for grown in (0, 100 * _EXT + 13):  # a scan's holes, in a volume now as large or larger
        size = model.size + grown
        total = -(-size // _EXT)
        for first, count in ((0, total), (4000, 300), (4096, 8192), (total - 5, 9)):
            first = max(0, min(first, total))
            count = max(0, min(count, total - first))
            of_holes = hole_digests(size, _EXT, first, count)
            flat = bytes(model.digests[first * 16 : (first + count) * 16])
            want = list(digest_runs(flat, of_holes, 16))
            assert list(m.hole_runs(first, count, size, 16)) == want
    for old, old_model in kept:
        assert old.slice(0, old.count) == bytes(old_model.digests)  # untouched by the copy
        by_extent = [
            i
            for i in range(max(model.count, old_model.count))
            if model.get(i) != old_model.get(i) or model.get(i) == UNKNOWN
        ]
        assert list(m.differing(old)) == by_extent
        assert list(old.differing(m)) == by_extent


# -- what a large sparse disk's manifest costs: its data, not its virtual size --

TiB = 1 << 40  # one flat copy of its digests was 256 MiB


def test_a_sparse_terabytes_manifest_costs_its_data_not_its_size(tmp_path: Path) -> None:
    """A 1 TiB sparse disk's manifest (a few extents of data) made as a first sync's basis
    is (grown from nothing, zeros), copied twice (a cycle's basis, the new manifests),
    saved and loaded: a flat array cost 256 MiB each time, a few copies at once."""
    from replicator.engine.scan import resize_basis

    made: list[ExtentManifest] = []

    def make() -> None:
        m = ExtentManifest(65536, 0)
        resize_basis(m, TiB)
        for index in (0, 5000, 1 << 23, (TiB >> 16) - 1):
            m.set(index, bytes(range(16)))
        made.append(m)

    assert peak_traced(make) < 4 * MiB
    m = made[0]
    copies: list[ExtentManifest] = []
    assert peak_traced(lambda: copies.extend((m.copy(), m.copy()))) < 2 * MiB
    copies[0].set(7, b"x" * 16)  # a change in a copy: one chunk copied, the rest shared
    assert m.get(7) == zero_digest(65536) and copies[1].get(7) == zero_digest(65536)
    manifests = ManifestSet(3, 65536, 1, {"big.raw": m})
    path = tmp_path / "manifests.state"
    assert peak_traced(lambda: manifests.save(path)) < 8 * MiB
    loaded: list[ManifestSet | None] = []
    assert peak_traced(lambda: loaded.append(ManifestSet.load(path))) < 8 * MiB
    assert loaded[0] is not None and loaded[0] == manifests
    assert list(loaded[0].disks["big.raw"].differing(copies[0])) == [7]


def test_verifying_a_sparse_terabyte_holds_its_data_not_its_size(tmp_path: Path) -> None:
    """verify's manifest of a 1 TiB sparse source: 256 MiB flat (a 16 TiB one peaked at
    8.5 GB), beside the 16 MiB of read buffers the scan holds whatever the size."""
    from replicator.engine.verify import _source_manifest

    image = tmp_path / "sparse.img"
    with image.open("wb") as f:
        f.truncate(TiB)
        f.seek(1 << 30)
        f.write(b"data")
    got: list[ExtentManifest] = []
    peak = peak_traced(lambda: got.append(_source_manifest(image, 65536, None)))
    assert got[0].count == TiB // 65536
    assert got[0].get(1 << 14) != got[0].get(0) == zero_digest(65536)  # the data extent
    assert peak < 24 * MiB, f"{peak / MiB:.0f} MiB"


def test_a_hole_chunk_that_is_another_object_is_compared_as_any_chunk() -> None:
    """The shared hole chunk is a cache of one per extent size: manifests made before it
    was made again (another extent size pushed it out, two threads each made one) hold an
    equal chunk that is another object, which must still compare as the same digests."""
    from replicator.engine import manifest as module

    size = 3 * 4096 * _EXT + 7
    old = ExtentManifest(_EXT, 0)
    old.resize(size)
    old.put_holes(0, old.count)
    module._hole_chunk.cache_clear()  # the next hole chunk is a new object
    new = ExtentManifest(_EXT, size)
    new.put_holes(0, new.count)
    assert new._chunks[0] is not old._chunks[0] and new._chunks[0] == old._chunks[0]
    assert list(new.differing(old)) == [] and new == old
    assert list(old.hole_runs(0, old.count, size, 16)) == [(0, old.count, True)]
    old.put(5, _HOLE)  # the same digest: nothing changes
    new.set(4096, b"x" * 16)
    assert list(new.differing(old)) == [4096]
    assert old.slice(0, old.count) == hole_digests(size, _EXT, 0, old.count)
