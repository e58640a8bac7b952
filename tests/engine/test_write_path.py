"""A first sync's writes go whichever way the machine takes faster right now: measured in
windows, the cheaper kept, the dearer tried again less and less often, a change noticed."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from replicator.engine.write_path import (
    GIVE_UP,
    PROBE_FIRST,
    PROBE_MOST,
    WINDOW_BYTES,
    WritePathChooser,
)

MiB = 1024 * 1024
FRAME = 2 * MiB  # what one Records frame carries in a first sync
PER_WINDOW = WINDOW_BYTES // FRAME


def run(chooser: WritePathChooser, ms_per_mib: dict[bool, float], frames: int) -> list[bool]:
    """Feed ``frames`` frames whose writes cost ``ms_per_mib`` each way; the ways chosen."""
    ways = []
    for _ in range(frames):
        way = chooser.choose()
        ways.append(way)
        chooser.observe(way, ms_per_mib[way] / 1e3 * FRAME / MiB, FRAME)
    return ways


def runs(ways: list[bool]) -> list[tuple[bool, int]]:
    """``ways`` as (way, frames in a row)."""
    out: list[tuple[bool, int]] = []
    for way in ways:
        if out and out[-1][0] == way:
            out[-1] = (way, out[-1][1] + 1)
        else:
            out.append((way, 1))
    return out


def test_it_measures_past_the_cache_first_then_the_page_cache_then_keeps_the_cheaper() -> None:
    chooser = WritePathChooser()
    warm = {True: 1.5, False: 0.3}  # a machine whose memory is backed
    ways = run(chooser, warm, 3 * PER_WINDOW)
    assert ways == [True] * PER_WINDOW + [False] * 2 * PER_WINDOW
    assert chooser.best() is False
    assert chooser.costs[True] == pytest.approx(1.5e-3 / MiB)


def test_the_dearer_way_is_tried_again_less_and_less_often() -> None:
    chooser = WritePathChooser()
    cold = {True: 1.5, False: 1.7}  # close: every probe runs its whole window
    ways = run(chooser, cold, 800 * PER_WINDOW)
    gaps = [n // PER_WINDOW for way, n in runs(ways)[2:] if way]  # windows between probes
    assert gaps[:6] == [PROBE_FIRST, 8, 16, 32, PROBE_MOST, PROBE_MOST]
    assert all(n == PER_WINDOW for way, n in runs(ways)[1:] if not way)  # one window each


def test_a_probe_far_dearer_ends_after_its_first_frame() -> None:
    chooser = WritePathChooser()
    cold = {True: 1.4, False: 30.0}  # page-cache pages faulting into the host
    ways = run(chooser, cold, 200 * PER_WINDOW)
    assert [n for way, n in runs(ways) if not way] == [1] * len(runs(ways)[1::2])
    # the first measure, then probes after 4, 8, 16, 32, 64 and 64 windows: a frame each
    assert ways.count(False) == 7
    assert chooser.best() is True


def test_a_change_of_state_is_followed_within_one_probe_interval() -> None:
    chooser = WritePathChooser()
    run(chooser, {True: 1.5, False: 0.3}, 600 * PER_WINDOW)  # warm: probes now far apart
    assert chooser.best() is False
    cold = {True: 1.5, False: 9.0}
    ways = run(chooser, cold, 2 * PER_WINDOW)  # the way in use turns dear: left at once
    assert ways[-1] is True and chooser.best() is True
    run(chooser, cold, 100 * PER_WINDOW)
    ways = run(chooser, {True: 1.5, False: 0.3}, (PROBE_MOST + 2) * PER_WINDOW)  # warm again
    assert ways[-PER_WINDOW:] == [False] * PER_WINDOW, "it did not find the page cache cheap again"


def test_batches_that_say_nothing_are_ignored() -> None:
    chooser = WritePathChooser(window=4 * MiB)
    chooser.observe(True, 5.0, 0)  # only small or unaligned writes
    chooser.observe(True, -1.0, MiB)  # a clock that went back
    chooser.observe(False, 9.0, 8 * MiB)  # not the way it chose
    assert chooser.costs == {} and chooser.choose() is True
    chooser.observe(True, 0.004, 4 * MiB)
    assert chooser.costs == {True: pytest.approx(0.001 / MiB)} and chooser.choose() is False


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="probe_first"):
        WritePathChooser(probe_first=0)
    with pytest.raises(ValueError, match="probe_first"):
        WritePathChooser(probe_first=8, probe_most=4)
    with pytest.raises(ValueError, match="window"):
        WritePathChooser(window=0)


costs = st.floats(min_value=0.05, max_value=50.0)
regimes = st.lists(
    st.tuples(costs, costs, st.integers(min_value=1, max_value=5 * PROBE_MOST * PER_WINDOW)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(regimes)
@example([(1.0, GIVE_UP, 4 * PROBE_MOST * PER_WINDOW)])  # dearer by exactly GIVE_UP
def test_the_cheaper_way_wins_and_the_dearer_costs_a_bounded_share(
    plan: list[tuple[float, float, int]],
) -> None:
    """Costs that change in steps: the other way is never left untried for longer than
    ``PROBE_MOST`` windows (so a change is always found), and a regime that lasts long
    enough ends on its cheaper way, with at most a small share of its frames on the dearer."""
    chooser = WritePathChooser()
    for past, page, frames in plan:
        ms = {True: past, False: page}
        ways = run(chooser, ms, frames)
        longest = max(n for _, n in runs(ways))
        assert longest <= (PROBE_MOST + 1) * PER_WINDOW, "the other way went untried too long"
        # long enough for the probes to have drawn apart (4 + 8 + ... + 64 windows)
        settled = frames >= 4 * PROBE_MOST * PER_WINDOW
        if settled and max(past, page) > 1.2 * min(past, page):
            cheaper = past < page
            tail = ways[-PROBE_MOST * PER_WINDOW :]
            # a probe of one frame when clearly past GIVE_UP (at it, rounding decides)
            probe = 1 if max(past, page) > 1.01 * GIVE_UP * min(past, page) else PER_WINDOW
            assert tail.count(not cheaper) <= 2 * probe  # at most two probes
