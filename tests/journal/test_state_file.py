"""State files (``journal/durable.py``): what a damaged header says."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicator.journal.durable import StateFileError, read_state, write_state


@pytest.mark.parametrize("bit", [0, 5, 13])
def test_a_flipped_version_bit_is_not_taken_only_for_a_newer_release(
    tmp_path: Path, bit: int
) -> None:
    """The version field is outside the body's checksum: a bit flipped there read as
    "version 8193 ... use a matching replicator version", sending the operator to look
    for a release that does not exist instead of at a damaged file."""
    path = tmp_path / "applied.state"
    write_state(path, {"applied_lsn": 7})
    data = bytearray(path.read_bytes())
    data[4 + bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))
    with pytest.raises(StateFileError) as caught:
        read_state(path)
    message = str(caught.value)
    assert str(path) in message and "is not supported" in message
    assert "or damaged" in message and "newer replicator" in message
