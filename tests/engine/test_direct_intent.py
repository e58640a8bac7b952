"""What a later scan cycle ships without the journal, noted first (engine/direct_intent.py),
and the LSN ranges a basis must account for (``sender_state._missing``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.engine import direct_intent
from replicator.engine.direct_intent import FILE_NAME, IntentDamaged, IntentLog
from replicator.engine.sender_state import _missing
from replicator.journal import Record

EXT = 64 * 1024


def _noted(tmp_path: Path, since: int = 7) -> None:
    log = IntentLog.open(tmp_path, since, EXT)
    try:
        log.add(10, [Record.write("a.img", EXT - 1, b"xy"), Record.zero("a.img", 5 * EXT, EXT)])
        log.add(12, [Record.resize("b.img", 3 * EXT), Record.chmod("vm.xml", 0o600)])
    finally:
        log.close()


def test_what_was_noted_comes_back(tmp_path: Path) -> None:
    _noted(tmp_path)
    intent = direct_intent.load(tmp_path, EXT)
    assert intent is not None and intent.since == 7
    assert list(intent.touched.indices("a.img")) == [0, 1, 5]  # a write across a boundary
    assert intent.touched.resized == {"b.img"}
    assert intent.whole == {"vm.xml"}
    assert intent.lsns == [(10, 11), (12, 13)]
    assert intent.covers(10, 13) and intent.covers(11, 12)
    assert not intent.covers(9, 10) and not intent.covers(13, 14)


def test_a_cycle_from_the_same_manifests_adds_to_the_notes(tmp_path: Path) -> None:
    _noted(tmp_path)
    log = IntentLog.open(tmp_path, 7, EXT)  # the cycle after one cut short
    log.add(20, [Record.write("a.img", 9 * EXT, b"z")])
    log.close()
    intent = direct_intent.load(tmp_path, EXT)
    assert intent is not None
    assert list(intent.touched.indices("a.img")) == [0, 1, 5, 9]
    assert not intent.covers(14, 20) and intent.covers(20, 20)


def test_notes_against_older_manifests_are_replaced(tmp_path: Path) -> None:
    _noted(tmp_path, since=7)
    IntentLog.open(tmp_path, 30, EXT).close()
    intent = direct_intent.load(tmp_path, EXT)
    assert intent is not None and intent.since == 30 and intent.lsns == []
    direct_intent.drop(tmp_path)
    assert direct_intent.load(tmp_path, EXT) is None
    direct_intent.drop(tmp_path)  # twice: nothing to do


@pytest.mark.parametrize("cut", [1, 19, 20, 30])
def test_notes_cut_short_are_not_trusted(tmp_path: Path, cut: int) -> None:
    """Power lost in mid-append: the whole file is untrusted, never read as shorter."""
    _noted(tmp_path)
    path = tmp_path / FILE_NAME
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(IntentDamaged):
        direct_intent.load(tmp_path, EXT)


def test_any_byte_damaged_is_found(tmp_path: Path) -> None:
    _noted(tmp_path)
    path = tmp_path / FILE_NAME
    good = path.read_bytes()
    for at in range(len(good)):
        bad = bytearray(good)
        bad[at] ^= 0x40
        path.write_bytes(bytes(bad))
        with pytest.raises(IntentDamaged):
            direct_intent.load(tmp_path, EXT)


def test_notes_for_another_extent_size_are_not_used(tmp_path: Path) -> None:
    _noted(tmp_path)
    with pytest.raises(IntentDamaged, match="extents of"):
        direct_intent.load(tmp_path, 2 * EXT)


def test_an_epoch_is_never_shipped_unjournaled(tmp_path: Path) -> None:
    log = IntentLog.open(tmp_path, 1, EXT)
    try:
        with pytest.raises(ValueError, match="EPOCH"):
            log.add(2, [Record.epoch(3)])
    finally:
        log.close()


def test_a_new_file_is_whole_before_it_is_used(tmp_path: Path) -> None:
    IntentLog.open(tmp_path, 5, EXT).close()
    assert not (tmp_path / f".{FILE_NAME}.tmp").exists()
    assert os.stat(tmp_path / FILE_NAME).st_mode & 0o777 == 0o600


ranges = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=8)


@given(after=st.integers(0, 40), upto=st.integers(0, 80), pieces=ranges)
def test_missing_is_every_lsn_not_held(
    after: int, upto: int, pieces: list[tuple[int, int]]
) -> None:
    held_set: set[int] = set()
    for first, length in pieces:
        held_set |= set(range(first, first + length))
    held: list[tuple[int, int]] = []
    for lsn in sorted(held_set):
        if held and held[-1][1] == lsn - 1:
            held[-1] = (held[-1][0], lsn)
        else:
            held.append((lsn, lsn))
    got = {lsn for first, last in _missing(after, upto, held) for lsn in range(first, last + 1)}
    assert got == set(range(after + 1, upto + 1)) - held_set
    assert all(first <= last for first, last in _missing(after, upto, held))
