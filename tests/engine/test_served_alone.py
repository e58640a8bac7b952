"""``served_alone.state``: where a sender serving without its receiver began numbering."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from replicator.engine.errors import RefusedError
from replicator.engine.served_alone import (
    SERVED_ALONE_FILE,
    clear_served_alone,
    load_served_alone,
    receiver_ahead,
    save_served_alone,
)


def test_saved_loaded_and_cleared(tmp_path: Path) -> None:
    assert load_served_alone(tmp_path) is None
    save_served_alone(tmp_path, 1234)
    assert load_served_alone(tmp_path) == 1234
    clear_served_alone(tmp_path)
    assert load_served_alone(tmp_path) is None
    clear_served_alone(tmp_path)  # twice: nothing to remove


def test_a_damaged_file_refuses_every_receiver_that_holds_anything(tmp_path: Path) -> None:
    save_served_alone(tmp_path, 1234)
    path = tmp_path / SERVED_ALONE_FILE
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert load_served_alone(tmp_path) == 0
    assert receiver_ahead(0, 0) is None
    assert isinstance(receiver_ahead(1, 0), RefusedError)


@given(st.integers(0, 2**40), st.integers(0, 2**40))
def test_only_a_receiver_past_since_is_refused(received: int, since: int) -> None:
    refusal = receiver_ahead(received, since)
    assert (refusal is not None) == (received > since)
    if refusal is not None:
        assert "--state-dir" in (refusal.hint or "")
