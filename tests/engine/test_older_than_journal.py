"""``replica_state.against_journal``: when an ``applied.state`` is older than its receive
journal, and where the redo of that journal then starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicator.engine.replica_state import ReplicaState, against_journal

SAVED = ReplicaState(8, point_lsn=8, generation=3)


@pytest.mark.parametrize(
    ("saved", "first_lsn", "runs"),
    [
        pytest.param(SAVED, 9, [], id="nothing past it"),
        pytest.param(SAVED, 9, [(9, 14)], id="every lsn past it"),
        pytest.param(SAVED, 13, [(13, 14)], id="records trimmed or sent past the journal before"),
        pytest.param(SAVED.replace(point_floor=13), 9, [(9, 10), (13, 14)], id="lost records"),
    ],
)
def test_a_journal_that_holds_every_lsn_after_the_file_leaves_it_as_it_is(
    saved: ReplicaState, first_lsn: int, runs: list[tuple[int, int]]
) -> None:
    assert against_journal(Path("/s"), saved, first_lsn, runs) == (saved, "")


@pytest.mark.parametrize(
    ("runs", "skipped", "redo_from"),
    [
        pytest.param([(9, 10), (13, 14)], "11 to 12", 13, id="one gap"),
        pytest.param([(12, 14)], "9 to 11", 12, id="a gap right after it"),
        pytest.param([(9, 10), (13, 14), (17, 20)], "11 to 12", 17, id="two gaps"),
    ],
)
def test_a_journal_that_skips_lsns_after_the_file_makes_it_unknown(
    runs: list[tuple[int, int]], skipped: str, redo_from: int
) -> None:
    """The records before the last skipped LSNs were applied before those were written
    straight into the replica: redone, they would write older bytes over newer ones."""
    state, why = against_journal(Path("/s"), SAVED, 9, runs)
    assert why == f"lsn {skipped} were applied without the journal after the lsn 8 it names"
    assert state.applied_lsn + 1 == redo_from
    assert state.applying and not state.consistent
    assert "/s/applied.state) is older than its journal" in state.unknown and why in state.unknown
