from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from replicator.engine.manifest import UNKNOWN, ExtentManifest, ManifestSet


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
