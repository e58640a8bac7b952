"""--target-rpo: the pace controller (transport/rpo.py) on an injected clock, with
hypothesis for its promises, and the pacer in Shaping driving a real token bucket."""

from __future__ import annotations

import asyncio
import math

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.engine.pacing import unapplied_bytes
from replicator.transport.rpo import MIN_PACE, RpoController, default_grace, parse_target
from replicator.transport.schedule import SpecError
from replicator.transport.shaper import Shaping, TokenBucket

MB = 1_000_000

rates = st.one_of(st.none(), st.just(0.0), st.floats(1.0, 1e10))
ticks = st.lists(
    st.tuples(
        st.floats(0.0, 5.0),  # seconds since the previous tick
        st.floats(0.0, 1e10),  # backlog bytes
        st.floats(0.0, 1e4),  # age of the oldest, seconds
        rates,  # the cap in force
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(target=st.floats(0.1, 3600.0), steps=ticks)
def test_the_pace_never_exceeds_the_cap_and_never_drops_below_the_floor(
    target: float, steps: list[tuple[float, float, float, float | None]]
) -> None:
    rpo = RpoController(target)
    now = 0.0
    for dt, backlog, age, cap in steps:
        now += dt
        decision = rpo.update(now, backlog, age, cap)
        if cap is not None:
            assert decision.pace <= cap
        if cap == 0:
            assert decision.pace == 0  # a paused schedule pauses
        else:
            assert decision.pace >= min(MIN_PACE, math.inf if cap is None else cap)
        if decision.event is not None:
            assert rpo.met == (decision.event == "held")
        if age <= target:
            assert rpo.met  # held as soon as the lag is back under the target


@settings(max_examples=300, deadline=None)
@given(
    target=st.floats(1.0, 3600.0),
    backlog=st.floats(1.0, 1e10),
    ages=st.lists(st.floats(0.0, 1e4), min_size=2, max_size=10),
)
def test_the_need_grows_as_the_lag_grows_toward_the_target(
    target: float, backlog: float, ages: list[float]
) -> None:
    rpo = RpoController(target)
    needs = [rpo.need(backlog, age) for age in sorted(ages)]
    assert needs == sorted(needs)
    # and with the backlog, at a given age
    assert rpo.need(backlog * 2, ages[0]) >= rpo.need(backlog, ages[0])


@settings(max_examples=200, deadline=None)
@given(
    target=st.floats(1.0, 600.0),
    backlog=st.floats(1e6, 1e9),
    first=st.floats(0.0, 600.0),
    more=st.floats(0.0, 600.0),
)
def test_the_pace_rises_at_once_when_the_lag_grows(
    target: float, backlog: float, first: float, more: float
) -> None:
    rpo = RpoController(target)
    before = rpo.update(0.0, backlog, first, None).pace
    after = rpo.update(0.1, backlog, first + more, None).pace
    assert after >= before
    assert after == pytest.approx(max(rpo.need(backlog, first + more), before))


def test_a_steady_writer_is_paced_near_its_write_rate_with_the_lag_under_the_target() -> None:
    """A simulated link: 1 MB/s of writes, a 100 MB/s cap, a 10 s target; the pace settles
    near the write rate (far under the cap), the lag near a quarter of the target."""
    rpo = RpoController(10.0)
    write, cap, tick = 1 * MB, 100 * MB, 0.25
    backlog, oldest, now = 0.0, None, 0.0
    paces, lags = [], []
    for _ in range(int(120 / tick)):
        now += tick
        backlog += write * tick
        oldest = now - tick / 2 if oldest is None else oldest
        age = now - oldest
        pace = rpo.update(now, backlog, age, cap).pace
        sent = min(backlog, pace * tick)
        backlog -= sent
        # FIFO: the oldest unsent byte was written backlog/write seconds ago
        oldest = None if backlog <= 0 else now - backlog / write
        paces.append(pace)
        lags.append(age)
    settled = paces[len(paces) // 2 :]
    assert max(settled) < 2 * write  # well under the 100 MB/s cap
    assert min(settled) > 0.5 * write
    assert max(lags[len(lags) // 2 :]) < 10.0 / 2
    assert rpo.met and rpo.episodes == 0


def test_a_link_below_the_need_misses_once_per_episode_then_holds_again() -> None:
    rpo = RpoController(4.0)  # grace 2 s
    assert rpo.grace == default_grace(4.0) == 2.0
    events = []
    now = 0.0
    for age in [1, 3, 4.5, 5, 5.5, 6, 6.5, 7, 8, 9]:  # over the target from 4.5 s
        now += 0.5
        events.append(rpo.update(now, 50 * MB, age, 1 * MB).event)
    assert events.count("missed") == 1 and not rpo.met
    assert events.index("missed") == 6  # 2 s (the grace) after the lag first passed 4 s
    assert rpo.update(now + 0.5, 1 * MB, 3.0, 1 * MB).event == "held"
    assert rpo.missed is False
    assert rpo.update(now + 1.0, 1 * MB, 2.0, 1 * MB).event is None
    # a second episode is a second warning
    for step in range(10):
        rpo.update(now + 2 + step, 50 * MB, 5.0 + step, 1 * MB)
    assert rpo.episodes == 2


def test_parse_target() -> None:
    assert parse_target("30") == 30.0
    assert parse_target("30s") == 30.0
    assert parse_target(" 5m ") == 300.0
    assert parse_target("1.5h") == 5400.0
    for bad in ("0", "-5", "soon", "5 days", ""):
        with pytest.raises(SpecError) as info:
            parse_target(bad)
        assert info.value.part == bad
    with pytest.raises(SpecError, match="--target-rpo: bad target RPO 'soon'"):
        Shaping.from_options(target_rpo="soon")


def test_unapplied_bytes_is_the_share_of_the_journal_not_applied() -> None:
    assert unapplied_bytes(1000, 1, 10, 10) == 0
    assert unapplied_bytes(1000, 1, 10, 5) == 500
    assert unapplied_bytes(1000, 1, 10, 0) == 1000
    assert unapplied_bytes(1000, 6, 10, 0) == 1000  # trimmed below 6: all held is behind
    assert unapplied_bytes(0, 11, 10, 10) == 0  # empty journal


# -- the pacer driving a real bucket ------------------------------------------------------------


def test_the_bucket_fills_at_the_pace_below_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(10 * MB, 100_000, clock=lambda: now[0])
    bucket.set_pace(1 * MB)
    assert bucket.rate == 10 * MB and bucket.effective_rate == 1 * MB
    assert bucket.tokens() == 100_000
    bucket._take(100_000)
    now[0] += 0.05
    assert bucket.tokens() == pytest.approx(50_000)  # 0.05 s at the pace, not the rate
    bucket.set_rate(0.5 * MB)  # a cap below the pace wins
    assert bucket.effective_rate == 0.5 * MB
    bucket.set_rate(0)
    assert bucket.effective_rate == 0 and bucket.paused
    unlimited = TokenBucket(None, clock=lambda: now[0])
    unlimited.set_pace(2 * MB)
    assert unlimited.effective_rate == 2 * MB


def test_pacer_sets_the_pace_from_the_probe_and_warns_once() -> None:
    now = [0.0]
    shaping = Shaping(10 * MB, target_rpo=4.0, clock=lambda: now[0])
    seen: list[tuple[float, float] | None] = [None]
    shaping.probe = lambda: seen[0]
    shaping.pace_once()  # no connection: nothing changes
    assert shaping.bucket.pace is None
    seen[0] = (0.0, 0.0)
    shaping.pace_once()
    assert shaping.bucket.effective_rate == MIN_PACE  # idle: the floor
    seen[0] = (2 * MB, 1.0)
    now[0] += 0.25
    shaping.pace_once()
    assert shaping.bucket.effective_rate == pytest.approx(2 * MB / 1.0)  # 2 MB in 1 s
    status = shaping.status()["rpo"]
    assert status["met"] and status["warning"] is None and status["target_seconds"] == 4.0
    with structlog.testing.capture_logs() as logs:
        for _ in range(20):  # 5 s above the target at the cap
            now[0] += 0.25
            seen[0] = (500 * MB, 4.0 + now[0])
            shaping.pace_once()
    missed = [e for e in logs if e["event"] == "sender.rpo_target_missed"]
    assert len(missed) == 1 and missed[0]["log_level"] == "warning"
    assert shaping.bucket.effective_rate == 10 * MB  # at the cap, not above
    status = shaping.status()["rpo"]
    assert not status["met"] and "4 s target RPO" in status["warning"]
    assert status["missed_episodes"] == 1


async def test_pacer_runs_beside_the_schedule_until_cancelled() -> None:
    shaping = Shaping(10 * MB, target_rpo=2.0)
    calls: list[float] = []

    def probe() -> tuple[float, float]:
        calls.append(asyncio.get_running_loop().time())
        return (0.0, 0.0)

    shaping.probe = probe
    task = asyncio.create_task(shaping.run())
    await asyncio.sleep(0.6)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 2 <= len(calls) <= 4  # a tick every 0.25 s
    assert shaping.bucket.effective_rate == MIN_PACE
    plain = Shaping(10 * MB)
    await asyncio.wait_for(plain.run(), 1)  # no schedule, no target: returns at once
