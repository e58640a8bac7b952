"""verify's differing ranges are coalesced as the indexes come: listed first, every index of
a replica that is missing or differs throughout was a Python int apiece (268 million for a
16 TiB disk)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any, cast

import pytest

from replicator.engine import verify
from replicator.engine.link import Link
from replicator.engine.manifest import ExtentManifest
from replicator.engine.verify import compare
from replicator.engine.volumes import VolumeKind, VolumeSpec

EXT = 64 * 1024
SIZE = (16 << 30) + 100  # 262,145 extents, the last one short


class _Replica:
    """A link whose receiver answers one manifest (None: no replica)."""

    def __init__(self, manifest: ExtentManifest | None) -> None:
        self.manifest = manifest

    async def request_manifest(self, volume: str, extent_size: int) -> ExtentManifest | None:
        return self.manifest


async def _compared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replica: ExtentManifest | None
) -> tuple[Any, int]:
    """``compare`` of a sparse source with ``replica``, and its peak of memory traced
    past the source's manifest (made before, as ``_source_manifest`` makes it)."""
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(SIZE)
    spec = VolumeSpec(image, "disk.raw", VolumeKind.DISK)
    source = ExtentManifest.of_file(image, EXT)
    monkeypatch.setattr(verify, "_source_manifest", lambda path, extent_size, seen: source)
    tracemalloc.start()
    try:
        result = await compare(cast(Link, _Replica(replica)), [spec], EXT)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_a_missing_replica_is_one_range_not_an_index_per_extent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, peak = await _compared(tmp_path, monkeypatch, None)
    assert result.volumes[0].replica_size is None
    assert result.volumes[0].extents == [(0, SIZE)]
    assert peak < 1 << 20, f"{peak / (1 << 20):.0f} MiB"


async def test_a_replica_differing_throughout_is_coalesced_as_it_is_compared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, peak = await _compared(tmp_path, monkeypatch, ExtentManifest(EXT, SIZE))  # all UNKNOWN
    assert result.volumes[0].extents == [(0, SIZE)]
    assert peak < 1 << 20, f"{peak / (1 << 20):.0f} MiB"
