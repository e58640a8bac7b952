from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.engine.manifest import UNKNOWN, ExtentManifest, ManifestSet
from replicator.journal.durable import StateFileError, write_state


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
    assert len(m.digests) == 16 * m.count
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


def _sparse(size: int) -> ExtentManifest:
    m = ExtentManifest(65536, size, bytearray(HOLE * -(-size // 65536)))
    m.set(3, os.urandom(16))  # a little data among the holes
    return m


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 1024 * MiB), st.booleans())
def test_manifests_round_trip_at_rest_sparse_or_dense(size: int, dense: bool) -> None:
    """Each extent's digest comes back, whether the digests were kept as they are (dense:
    random digests do not compress) or compressed (a sparse image's repeated hole digest)."""
    count = -(-size // 65536)
    digests = bytearray(os.urandom(16 * count)) if dense else _sparse(size).digests
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
         "disks": {"d.img": {"extent_size": 65536, "size": m.size, "digests": bytes(m.digests)}},
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
    import tracemalloc

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
    assert manifest.count * 16 == len(manifest.digests) == digests
    assert manifest.get(1 << 14) != manifest.get(0)  # the data extent
    # and the scan's read buffers (16 MiB, whatever the size)
    assert peak < digests * 1.5, f"peak {peak / digests:.2f}x the digests"
