"""Rates, sizes and weekly schedules as users write them (transport/schedule.py)."""

from __future__ import annotations

import asyncio
import math
import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from replicator.transport.schedule import (
    DAY_NAMES,
    Rule,
    Schedule,
    SpecError,
    format_rate,
    format_size,
    parse_rate,
    parse_schedule,
    parse_size,
)
from replicator.transport.shaper import BURST_TIME, MIN_BURST, ScheduledRate, Shaping, TokenBucket

MBIT = 1e6 / 8
EXAMPLE = "mon-fri 08:00-18:00 20Mbit; sat,sun 50Mbit; * unlimited"
FRIDAY = datetime(2024, 5, 3)  # a Friday
MONDAY = datetime(2024, 4, 29)

# -- rates and sizes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50M", 50 * MBIT),
        ("50Mbit", 50 * MBIT),
        ("50Mbps", 50 * MBIT),
        ("50mbit", 50 * MBIT),
        ("50MBIT", 50 * MBIT),
        ("50Mb/s", 50 * MBIT),
        ("50Mbits/s", 50 * MBIT),
        ("1Gbit", 125e6),
        ("800kb/s", 100e3),
        ("2.5Mbit", 312_500.0),
        ("12MB/s", 12e6),
        ("12MB", 12e6),
        ("12MBps", 12e6),
        ("12MiB/s", 12 * 1024**2),
        ("1KiB/s", 1024.0),
        ("100B/s", 100.0),
        ("4Mi", 4 * 1024**2 / 8),  # binary prefix, bits
        (" 20Mbit ", 20 * MBIT),
        ("unlimited", None),
        ("Unlimited", None),
        ("0", 0.0),
        ("0.0", 0.0),
    ],
)
def test_rates(text: str, expected: float | None) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("50", "bits or bytes"),  # a bare number: which unit?
        ("20Mbitt", "'20Mbitt'"),
        ("fast", "'fast'"),
        ("-5M", "'-5M'"),
        ("1e6M", "'1e6M'"),
        ("50 Mbit", "'50 Mbit'"),
        ("0Mbit", "to pause, the rate is written 0"),
        ("1bit", "below 1 byte per second"),
        ("9" * 400 + "G", "too large"),
        ("", "''"),
    ],
)
def test_bad_rates_quote_the_input(text: str, quoted: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_rate(text)
    assert quoted in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.part == text


def test_zero_can_be_refused() -> None:
    with pytest.raises(SpecError, match="'0': 0 would pause"):
        parse_rate("0", allow_zero=False)
    assert parse_rate("1M", allow_zero=False) == 1e6 / 8


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("65536", 65536),
        ("256K", 256 * 1024),
        ("256k", 256 * 1024),
        ("256KB", 256 * 1024),
        ("256KiB", 256 * 1024),
        ("4M", 4 << 20),
        ("4MiB", 4 << 20),
        ("1G", 1 << 30),
        ("1T", 1 << 40),
        ("512B", 512),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "0K", "-1K", "1.5M", "4Mbit", "1P", "x", "", "1" * 30])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (None, "unlimited"),
        (0.0, "0"),
        (20 * MBIT, "20Mbit"),
        (1e9 / 8, "1Gbit"),
        (12 * 1024**2, "12MiB/s"),
        (312_500.0, "2500kbit"),
        (1.0, "8bit"),
    ],
)
def test_format_rate(rate: float | None, text: str) -> None:
    assert format_rate(rate) == text
    assert parse_rate(text) == rate


def test_format_size() -> None:
    assert [format_size(n) for n in (65536, 4 << 20, 1000, 1 << 40)] == [
        "64KiB",
        "4MiB",
        "1000",
        "1TiB",
    ]


rates = st.one_of(
    st.none(),
    st.just(0.0),
    st.floats(1.0, 1e18, allow_nan=False, allow_infinity=False),
    st.integers(1, 10**6).map(lambda n: n * 1e6 / 8),
)


@given(rates)
def test_format_rate_reads_back_exactly(rate: float | None) -> None:
    assert parse_rate(format_rate(rate)) == rate


@given(st.integers(1, 1 << 60))
def test_format_size_reads_back(size: int) -> None:
    assert parse_size(format_size(size)) == size


rate_alphabet = st.text(st.sampled_from("0123456789.kKmMgGtTiIbBpPsS/ unlimted-e+"), max_size=16)


@settings(max_examples=400)
@given(st.one_of(st.text(max_size=24), rate_alphabet))
def test_rate_parser_fails_only_with_spec_error(text: str) -> None:
    try:
        rate = parse_rate(text)
    except SpecError:
        return
    assert rate is None or (math.isfinite(rate) and (rate == 0 or rate >= 1))


@settings(max_examples=400)
@given(st.one_of(st.text(max_size=24), rate_alphabet))
def test_size_parser_fails_only_with_spec_error(text: str) -> None:
    try:
        size = parse_size(text)
    except SpecError:
        return
    assert 1 <= size <= 1 << 60


# -- schedules: matching ----------------------------------------------------------------------


def at(day: datetime, hhmmss: str) -> datetime:
    h, m, *s = (int(x) for x in hhmmss.split(":"))
    return day.replace(hour=h, minute=m, second=s[0] if s else 0)


def test_the_example() -> None:
    schedule = parse_schedule(EXAMPLE)
    assert str(schedule) == EXAMPLE
    friday, saturday, sunday = FRIDAY, FRIDAY + timedelta(1), FRIDAY + timedelta(2)
    assert schedule.rate_at(at(friday, "07:59:59")) is None  # "* unlimited"
    assert schedule.rate_at(at(friday, "08:00")) == 20 * MBIT
    assert schedule.rate_at(at(friday, "17:59:59")) == 20 * MBIT
    assert schedule.rate_at(at(friday, "18:00")) is None  # end excluded
    assert schedule.rate_at(at(saturday, "12:00")) == 50 * MBIT
    assert schedule.rate_at(at(sunday, "23:59:59")) == 50 * MBIT
    assert schedule.rate_at(at(sunday + timedelta(1), "09:00")) == 20 * MBIT  # Monday
    rule = schedule.rule_at(at(friday, "12:00"))
    assert rule is not None and str(rule) == "mon-fri 08:00-18:00 20Mbit"


def test_no_match_gives_the_default() -> None:
    schedule = parse_schedule("mon-fri 08:00-18:00 20Mbit", default=100 * MBIT)
    assert schedule.rate_at(at(FRIDAY, "20:00")) == 100 * MBIT
    assert schedule.rule_at(at(FRIDAY, "20:00")) is None
    assert parse_schedule("mon 1M").rate_at(at(FRIDAY, "12:00")) is None  # unlimited


def test_first_matching_rule_wins() -> None:
    schedule = parse_schedule("* 12:00-13:00 0; fri 10Mbit; * 1Mbit")
    assert schedule.rate_at(at(FRIDAY, "12:30")) == 0  # paused over lunch, even on Friday
    assert schedule.rate_at(at(FRIDAY, "13:00")) == 10 * MBIT
    assert schedule.rate_at(at(MONDAY, "13:00")) == 1 * MBIT


def test_a_range_over_midnight_belongs_to_the_day_it_starts() -> None:
    schedule = parse_schedule("fri 22:00-06:00 100Mbit; * 10Mbit")
    saturday = FRIDAY + timedelta(1)
    assert schedule.rate_at(at(FRIDAY, "03:00")) == 10 * MBIT  # Thursday night: no
    assert schedule.rate_at(at(FRIDAY, "21:59:59")) == 10 * MBIT
    assert schedule.rate_at(at(FRIDAY, "22:00")) == 100 * MBIT
    assert schedule.rate_at(at(FRIDAY, "23:59:59")) == 100 * MBIT
    assert schedule.rate_at(at(saturday, "00:00")) == 100 * MBIT
    assert schedule.rate_at(at(saturday, "05:59:59")) == 100 * MBIT
    assert schedule.rate_at(at(saturday, "06:00")) == 10 * MBIT
    assert schedule.rate_at(at(saturday, "22:00")) == 10 * MBIT
    until_midnight = parse_schedule("sun 22:00-00:00 0")
    assert until_midnight.rate_at(at(MONDAY - timedelta(1), "23:00")) == 0
    assert until_midnight.rate_at(at(MONDAY, "00:00")) is None


def test_day_lists_ranges_and_wrapping() -> None:
    def days(token: str) -> set[str]:
        (rule,) = parse_schedule(f"{token} 1M").rules
        return {DAY_NAMES[d] for d in rule.days}

    assert days("mon-fri") == {"mon", "tue", "wed", "thu", "fri"}
    assert days("fri-mon") == {"fri", "sat", "sun", "mon"}
    assert days("sat,sun") == {"sat", "sun"}
    assert days("Monday,wed-thu") == {"mon", "wed", "thu"}
    assert days("sun-sun") == {"sun"}
    assert days("*") == set(DAY_NAMES)
    assert days("mon-sun") == set(DAY_NAMES)
    assert str(parse_schedule("sun,mon,fri,sat 1M")) == "fri-mon 1Mbit"
    assert str(parse_schedule("sat,sun,tue 00:00-24:00 1M")) == "tue,sat,sun 1Mbit"
    assert str(parse_schedule("mon 8:05-9:00 0;")) == "mon 08:05-09:00 0"


@pytest.mark.parametrize(
    ("spec", "quoted"),
    [
        ("mon-fri 08:00-18:00 20Mbitt; * unlimited", "rule 1 'mon-fri 08:00-18:00 20Mbitt'"),
        ("* 1M; mon-fry 20M", "bad days 'mon-fry'"),
        ("mon,,tue 1M", "bad days ''"),
        ("mon 25:00-01:00 1M", "bad time range '25:00-01:00'"),
        ("mon 08:60-09:00 1M", "'08:60-09:00'"),
        ("mon 24:00-06:00 1M", "'24:00-06:00'"),
        ("mon 08:00 1M", "'08:00'"),
        ("mon 08:00-08:00 1M", "'08:00-08:00' is empty"),
        ("mon 1M 2M 3M", "wants DAYS [HH:MM-HH:MM] RATE"),
        ("unlimited", "rule 1 'unlimited': wants DAYS"),
        ("mon 1M; ; tue x", "rule 3 'tue x': bad rate 'x'"),
        ("", "empty schedule"),
        (" ; ", "empty schedule"),
    ],
)
def test_bad_schedules_quote_the_bad_part(spec: str, quoted: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_schedule(spec)
    assert quoted in str(info.value)
    assert info.value.part in spec


# -- schedules: boundaries ----------------------------------------------------------------------


def test_next_change() -> None:
    schedule = parse_schedule(EXAMPLE)
    assert schedule.next_change(at(FRIDAY, "17:59:59")) == at(FRIDAY, "18:00")
    assert schedule.next_change(at(FRIDAY, "18:00")) == at(FRIDAY + timedelta(1), "00:00")
    # Saturday and Sunday are one stretch at 50Mbit: the next change is Monday 00:00
    assert schedule.next_change(at(FRIDAY + timedelta(1), "00:00")) == at(
        FRIDAY + timedelta(3), "00:00"
    )
    assert schedule.next_change(at(FRIDAY, "03:00")) == at(FRIDAY, "08:00")
    overnight = parse_schedule("fri 22:00-06:00 0")
    assert overnight.next_change(at(FRIDAY, "22:30")) == at(FRIDAY + timedelta(1), "06:00")
    assert overnight.next_change(at(FRIDAY, "06:00")) == at(FRIDAY, "22:00")
    assert overnight.next_change(at(FRIDAY + timedelta(1), "06:00")) == at(
        FRIDAY + timedelta(7), "22:00"
    )
    assert parse_schedule("* 10Mbit").next_change(at(FRIDAY, "12:00")) is None
    # two rules, one rate: no change between them
    assert parse_schedule("mon-fri 1M; sat,sun 1M").next_change(at(FRIDAY, "12:00")) is None


def rate(bucket: TokenBucket) -> float | None:
    """The bucket's rate now (a call, so that mypy does not narrow it between steps)."""
    return bucket.rate


class FakeWallClock:
    """Local wall-clock time that moves only when the test says; sleeps wait for it."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[datetime, asyncio.Future[None]]] = []

    def __call__(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + timedelta(seconds=seconds), future))
        await future

    async def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        for due, future in self._sleepers:
            if due <= self.now and not future.done():
                future.set_result(None)
        self._sleepers = [(d, f) for d, f in self._sleepers if not f.done()]
        for _ in range(10):
            await asyncio.sleep(0)


async def test_scheduled_rate_crosses_friday_18h() -> None:
    clock = FakeWallClock(at(FRIDAY, "17:59:59"))
    bucket = TokenBucket()
    scheduled = ScheduledRate(bucket, parse_schedule(EXAMPLE), clock=clock, sleep=clock.sleep)
    task = asyncio.create_task(scheduled.run())
    try:
        await clock.advance(0)
        assert rate(bucket) == 20 * MBIT
        assert clock.sleeps == [1.0]  # sleeps until the boundary
        assert scheduled.next_change == at(FRIDAY, "18:00")
        await clock.advance(0.5)
        assert rate(bucket) == 20 * MBIT
        await clock.advance(0.5)
        assert rate(bucket) is None  # 18:00: "* unlimited"
        assert scheduled.rule is not None and str(scheduled.rule) == "* unlimited"
        assert clock.sleeps[-1] == 60.0  # next change is midnight: re-reads every minute
        await clock.advance(6 * 3600 - 60)  # 23:59
        assert rate(bucket) is None
        await clock.advance(60)  # Saturday 00:00
        assert rate(bucket) == 50 * MBIT
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_scheduled_rate_across_midnight_and_pause() -> None:
    clock = FakeWallClock(at(FRIDAY, "21:59"))
    bucket = TokenBucket(burst=1000)
    schedule = parse_schedule("fri 22:00-06:00 0", default=8 * MBIT)
    scheduled = ScheduledRate(bucket, schedule, clock=clock, sleep=clock.sleep)
    task = asyncio.create_task(scheduled.run())
    try:
        await clock.advance(0)
        assert rate(bucket) == 8 * MBIT and clock.sleeps == [60.0]
        await clock.advance(60)
        assert rate(bucket) == 0
        for _ in range(8 * 60):  # through the night, a minute at a time
            await clock.advance(60)
            if rate(bucket) != 0:
                break
        assert clock.now == at(FRIDAY + timedelta(1), "06:00")
        assert rate(bucket) == 8 * MBIT
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_hand_set_rate_holds_until_the_schedule_changes() -> None:
    clock = FakeWallClock(at(FRIDAY, "17:00"))
    bucket = TokenBucket()
    scheduled = ScheduledRate(bucket, parse_schedule(EXAMPLE), clock=clock, sleep=clock.sleep)
    task = asyncio.create_task(scheduled.run())
    try:
        await clock.advance(0)
        bucket.set_rate(1e6)
        for _ in range(59):  # re-read every minute: the schedule's rate has not changed
            await clock.advance(60)
            assert rate(bucket) == 1e6
        await clock.advance(60)  # 18:00
        assert rate(bucket) is None
        # a new schedule applies at once
        scheduled.schedule = parse_schedule("* 1Mbit")
        await clock.advance(0)
        assert rate(bucket) == MBIT
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- hypothesis ----------------------------------------------------------------------------------


def _day_name(day: int, full: bool, upper: bool) -> str:
    names = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
    name = names[day] if full else DAY_NAMES[day]
    return name.upper() if upper else name


day_items = st.one_of(
    st.just("*"),
    st.builds(_day_name, st.integers(0, 6), st.booleans(), st.booleans()),
    st.builds(lambda a, b: f"{DAY_NAMES[a]}-{DAY_NAMES[b]}", st.integers(0, 6), st.integers(0, 6)),
)


@st.composite
def time_ranges(draw: st.DrawFn) -> str | None:
    if draw(st.booleans()):
        return None
    start = draw(st.integers(0, 1439))
    end = draw(st.integers(0, 1440).filter(lambda e: e % 1440 != start))
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


rate_texts = st.one_of(
    st.sampled_from(["unlimited", "0", "50M", "20Mbit", "12MB/s", "12MiB/s", "800kb/s"]),
    st.builds(
        lambda n, p, u: f"{n}{p}{u}",
        st.integers(1, 99999),
        st.sampled_from(["k", "M", "G", "Mi"]),
        st.sampled_from(["", "bit", "bps", "b/s", "B", "B/s", "Bps"]),
    ),
)


@st.composite
def rule_texts(draw: st.DrawFn) -> str:
    days = ",".join(draw(st.lists(day_items, min_size=1, max_size=3)))
    span = draw(time_ranges())
    rate = draw(rate_texts)
    spaces = draw(st.sampled_from([" ", "  ", "\t"]))
    return spaces.join([days, rate] if span is None else [days, span, rate])


schedule_texts = st.lists(rule_texts(), min_size=1, max_size=5).map(lambda r: " ; ".join(r))
instants = st.datetimes(datetime(2024, 1, 1), datetime(2030, 12, 31))


@settings(max_examples=300)
@given(schedule_texts)
def test_valid_schedules_parse_and_round_trip(spec: str) -> None:
    schedule = parse_schedule(spec)
    assert len(schedule.rules) == spec.count(";") + 1
    assert parse_schedule(str(schedule)) == schedule
    assert str(parse_schedule(str(schedule))) == str(schedule)


grammar_alphabet = st.lists(
    st.sampled_from([*"montuewdhfrisa-,:;* 0123456789MGkbitBs/.", "unlimited", "mon", "08:00"]),
    max_size=30,
).map("".join)


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=60), grammar_alphabet))
def test_any_text_fails_only_with_spec_error(spec: str) -> None:
    try:
        schedule = parse_schedule(spec)
    except SpecError as exc:
        assert exc.part in spec
        return
    assert schedule.rules


def _painted(schedule: Schedule) -> list[list[float | None]]:
    """The week as a table of minutes, painted rule by rule, the first rule last: another
    way to say "the first matching rule wins"."""
    week: list[list[float | None]] = [[schedule.default] * 1440 for _ in range(7)]
    for rule in reversed(schedule.rules):
        for day in rule.days:
            if rule.start < rule.end:
                spans = [(day, rule.start, rule.end)]
            else:
                spans = [(day, rule.start, 1440), ((day + 1) % 7, 0, rule.end)]
            for d, a, b in spans:
                week[d][a:b] = [rule.rate] * (b - a)
    return week


@settings(max_examples=200)
@given(schedule_texts, rates, instants)
def test_rate_at_agrees_with_a_painted_week(
    spec: str, default: float | None, when: datetime
) -> None:
    schedule = parse_schedule(spec, default=default)
    week = _painted(schedule)
    assert schedule.rate_at(when) == week[when.weekday()][when.hour * 60 + when.minute]


@settings(max_examples=100, deadline=None)
@given(schedule_texts, rates, instants, st.lists(st.floats(0, 1), max_size=8))
def test_next_change_is_the_first_change(
    spec: str, default: float | None, when: datetime, fractions: list[float]
) -> None:
    schedule = parse_schedule(spec, default=default)
    now = schedule.rate_at(when)
    change = schedule.next_change(when)
    if change is None:
        minute = timedelta(minutes=1)
        assert all(schedule.rate_at(when + i * 7 * minute) == now for i in range(1440))
        return
    assert change > when and change - when <= timedelta(days=7)
    assert (change.second, change.microsecond) == (0, 0)
    assert schedule.rate_at(change) != now
    assert schedule.rate_at(change - timedelta(microseconds=1)) == now
    # constant in between: check every minute edge and a few random instants
    step = when.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while step < change:
        assert schedule.rate_at(step) == now
        step += timedelta(minutes=1)
    for fraction in fractions:
        between = when + (change - when) * fraction
        assume(between < change)
        assert schedule.rate_at(between) == now


def test_rule_values_are_checked() -> None:
    with pytest.raises(ValueError):
        Rule(frozenset())
    with pytest.raises(ValueError):
        Rule(frozenset({7}))
    with pytest.raises(ValueError):
        Rule(frozenset({0}), 600, 600)
    with pytest.raises(ValueError):
        Rule(frozenset({0}), rate=-1.0)


# -- docs/OPERATIONS.md -------------------------------------------------------------------------


def _bandwidth_section() -> str:
    doc = Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md"
    return doc.read_text().split("## Bandwidth: --rate, --burst, --schedule")[1].split("\n## ")[0]


def test_the_documented_rates_and_schedules_parse() -> None:
    section = _bandwidth_section()
    table = [line for line in section.splitlines() if line.startswith("| `")]
    written = [w for line in table for w in re.findall(r"`([^`]+)`", line.split("|")[1])]
    assert {"50Mbps", "12MB/s", "12MiB/s", "unlimited", "0"} <= set(written)
    for text in written:
        parse_rate(text)
    assert parse_rate("50mbit") == parse_rate("50M") == 6.25e6
    commands = "\n".join(s for s in section.splitlines() if s.startswith("replicator send"))
    options = re.findall(r"--(rate|burst|schedule) ('[^']+'|\S+)", commands)
    assert len(options) == 6
    for option, value in options:
        if option == "schedule":
            parse_schedule(value.strip("'"))
        elif option == "rate":
            parse_rate(value, allow_zero=False)
        else:
            parse_size(value)
    prose = " ".join(section.split())
    assert f"{BURST_TIME * 1000:g} ms at the rate, at least {MIN_BURST // 1024} KiB" in prose


def test_the_documented_errors_are_the_real_ones() -> None:
    section = _bandwidth_section()
    shown = re.findall(r"^(--schedule: .*?) '?\.\.\.$", section, re.MULTILINE)
    assert len(shown) == 2
    specs = ["mon-fri 08:00-18:00 20Mbit; sat,sun 50Mbitt", "mon-fry 20Mbit"]
    for line, spec in zip(shown, specs, strict=True):
        with pytest.raises(SpecError) as info:
            Shaping.from_options(schedule=spec)
        assert str(info.value).startswith(line)
