"""The source clock's offset estimate and the target's lag (engine/source_clock.py): whatever
the two clocks say and however late the data arrives, the lag is the data's age on the
target's clock, short by no more than the least delay a Ping had, never negative."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from replicator.engine import replica_state
from replicator.engine.generations import (
    PROMOTED_FILE,
    load_promotion,
    new_promotion,
    save_promotion,
)
from replicator.engine.replica_state import ReplicaState
from replicator.engine.source_clock import (
    SourceClock,
    lag_seconds,
    missing_seconds,
    on_target_clock,
)
from replicator.journal.durable import read_state, write_state

S = 10**9  # ns per second
NOW = 1_800_000_000 * S


def test_the_estimate_is_the_least_delayed_ping() -> None:
    """Every delay makes the source look behind: the largest sample is the estimate."""
    clock = SourceClock("vm", "peer")
    assert clock.offset_ns is None
    true_offset = -3600 * S
    for sent, delay in ((0, 4 * S), (15 * S, S // 1000), (30 * S, 2 * S)):
        clock.heard(NOW + sent + true_offset, NOW + sent + delay)
    assert clock.offset_ns == true_offset - S // 1000


def test_a_stamp_of_zero_says_nothing() -> None:
    clock = SourceClock("vm", "peer")
    assert clock.heard(0, NOW) is None and clock.heard(-5, NOW) is None


def test_an_offset_over_five_seconds_is_said_once_per_session() -> None:
    clock = SourceClock("vm", "10.0.0.1:5000")
    with capture_logs() as logs:
        clock.heard(NOW + 2 * S, NOW)  # within NTP's reach of a sloppy host: nothing said
        clock.heard(NOW + 20 * S, NOW + S)
        clock.heard(NOW + 40 * S, NOW + 2 * S)
    (said,) = [e for e in logs if e["event"] == "receiver.source_clock_offset"]
    assert said["offset_seconds"] == 19.0 and said["peer"] == "10.0.0.1:5000"
    assert "ahead of" in said["action"] and "NTP" in said["action"]
    assert said["source_time"] != said["target_time"]
    with capture_logs() as logs:
        SourceClock("vm", "peer").heard(NOW - 3600 * S, NOW)
    assert "behind" in logs[0]["action"]


def test_a_point_is_converted_and_never_later_than_applied() -> None:
    assert on_target_clock(NOW - 3600 * S, -3600 * S, NOW + S) == NOW
    assert on_target_clock(NOW + 3600 * S, 3600 * S, NOW + S) == NOW
    # no offset known (an older sender): the stamp, but not after it was applied here
    assert on_target_clock(NOW + 3600 * S, None, NOW + S) == NOW + S
    assert on_target_clock(NOW - 10 * S, None, NOW) == NOW - 10 * S
    assert on_target_clock(0, 5 * S, NOW) == 0  # unknown stays unknown
    assert on_target_clock(2**63 - 1, -(2**62), NOW) == NOW  # a hostile stamp
    assert on_target_clock(1, 2**62, NOW) == 1  # never before the epoch


def test_the_lag_counts_on_the_target_clock_and_from_old_files_as_before() -> None:
    assert lag_seconds(NOW, NOW - 3600 * S, NOW - 30 * S) == 30.0
    assert lag_seconds(NOW, NOW - 30 * S, 0) == 30.0  # a file from before point_target_ns
    assert lag_seconds(NOW, NOW + 3600 * S, 0) == 0.0  # never negative
    assert lag_seconds(NOW, NOW + 3600 * S, 0, since_applied=7.5) == 7.5
    assert lag_seconds(NOW, NOW, NOW, since_applied=12.0) == 12.0  # a stepped target clock
    assert lag_seconds(NOW, 0, 0, since_applied=3.0) is None
    assert missing_seconds(NOW, NOW - 3600 * S, NOW - 2 * S) == 2.0
    assert missing_seconds(NOW, NOW - 2 * S, 0) == 2.0
    assert missing_seconds(NOW, 0, 0) is None


@given(
    offset=st.integers(-(10**6) * S, 10**6 * S),
    delays=st.lists(st.integers(0, 600 * S), min_size=1, max_size=8),
    written_ago=st.integers(0, 3600 * S),
    applied_after=st.integers(0, 3600 * S),
    shown_after=st.integers(0, 3600 * S),
)
def test_the_lag_is_the_data_age_less_at_most_the_least_ping_delay(
    offset: int, delays: list[int], written_ago: int, applied_after: int, shown_after: int
) -> None:
    """A source ``offset`` off, Pings delayed by ``delays``, a point written ``written_ago``
    before the Pings, applied ``applied_after`` later (a backlog), shown ``shown_after``
    that: the lag is its true age but for the least delay, never more than its age, never
    less than the time since it was applied, never negative."""
    clock = SourceClock("vm", "peer")
    for i, delay in enumerate(delays):
        clock.heard(NOW + i * S + offset, NOW + i * S + delay)
    written = NOW - written_ago  # on the target's clock
    applied = written + applied_after
    shown = applied + shown_after
    point = on_target_clock(written + offset, clock.offset_ns, applied)
    lag = lag_seconds(shown, written + offset, point, since_applied=shown_after / S)
    assert lag is not None
    age = (shown - written) / S
    assert age - min(delays) / S - 1e-6 <= lag <= age + 1e-6
    assert lag >= shown_after / S and lag >= 0


def test_the_converted_time_is_kept_and_old_files_still_load(tmp_path: Path) -> None:
    """``point_target_ns`` in applied.state and promoted.state; files from before it load
    with 0 (the lag then counts from the source's stamp, as before)."""
    state = ReplicaState(applied_lsn=5, point_lsn=5, point_ts_ns=NOW - 3600 * S)
    replica_state.save(tmp_path, "vm", state.replace(point_target_ns=NOW))
    loaded = replica_state.load(tmp_path, "vm")
    assert loaded is not None and loaded.point_target_ns == NOW
    old = read_state(tmp_path / replica_state.FILE_NAME)
    assert old is not None
    del old["point_target_ns"]
    write_state(tmp_path / replica_state.FILE_NAME, old)
    loaded = replica_state.load(tmp_path, "vm")
    assert loaded is not None and (loaded.point_target_ns, loaded.point_ts_ns) == (
        0,
        state.point_ts_ns,
    )

    promotion = new_promotion(3, 5, NOW - 3600 * S, point_target_ns=NOW - 2 * S)
    save_promotion(tmp_path, promotion)
    assert load_promotion(tmp_path) == promotion
    raw = read_state(tmp_path / PROMOTED_FILE)
    assert raw is not None
    del raw["point_target_ns"]
    write_state(tmp_path / PROMOTED_FILE, raw)
    assert load_promotion(tmp_path) == dataclasses.replace(promotion, point_target_ns=0)
