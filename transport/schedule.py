"""Bandwidth settings as people write them: rates, sizes and weekly schedules.

Pure functions and values, no I/O; ``transport/shaper.py`` applies them. The syntax is
documented for users in docs/OPERATIONS.md ("Bandwidth: --rate, --burst, --schedule").

Rates (``parse_rate``), returned in bytes per second:

* a number, then an optional prefix, then a unit. Prefixes ``k M G T`` are powers of
  1000, ``Ki Mi Gi Ti`` powers of 1024 (the letter in either case: ``m`` is mega);
* bits: no unit (``50M``), ``bit``/``bits`` (any case), ``bit/s``, ``b``, ``b/s``, ``bps``:
  ``50M``, ``50Mbit``, ``50Mbps``, ``800kb/s`` are all bits per second;
* bytes: a capital ``B`` (``B``, ``B/s``, ``Bps``): ``12MB/s``, ``12MiB/s``, ``12MB``;
* ``unlimited`` (any case): no cap, returned as None;
* ``0``: paused (nothing bulk is sent until the rate changes), returned as 0.0, unless
  ``allow_zero=False``. A bare number other than 0 is refused (bits or bytes?).

Sizes (``parse_size``, ``--burst``), returned in bytes: binary units, as ``--journal-max``:
``65536``, ``256K``, ``256KB``, ``256KiB``, ``4M``, ``4MiB``, ``1G`` (K = 1024).

Schedules (``parse_schedule``): rules separated by ``;``, each ``DAYS [HH:MM-HH:MM] RATE``:

* DAYS: a comma list of days (``mon tue wed thu fri sat sun``, or spelled out), ranges of
  days (``mon-fri``; ``fri-mon`` wraps over the weekend) and ``*`` (every day);
* HH:MM-HH:MM: local wall-clock time, start included, end excluded; ``24:00`` may end a
  range; a range that ends before it starts (``22:00-06:00``) crosses midnight and belongs
  to the day it starts on (``fri 22:00-06:00`` runs from Friday 22:00 to Saturday 06:00);
  without a range a rule covers its days from 00:00 to 24:00;
* RATE: as ``parse_rate``, ``0`` pausing;
* the first rule that matches an instant gives its rate; when none does, the schedule's
  ``default`` (the ``--rate`` value, or None: unlimited).

Every parse error is a ``SpecError`` (a ValueError) whose message quotes the bad part.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, time, timedelta

__all__ = [
    "DAY_NAMES",
    "Rule",
    "Schedule",
    "SpecError",
    "format_rate",
    "format_size",
    "parse_rate",
    "parse_schedule",
    "parse_size",
]

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAYS = {name: i for i, name in enumerate(DAY_NAMES)} | {
    name: i for i, name in enumerate(_FULL_DAY_NAMES)
}
ALL_DAYS = frozenset(range(7))
MINUTES_PER_DAY = 24 * 60

RATE_HELP = (
    "a rate is bits per second as 50M, 50Mbit or 50Mbps, bytes per second as 12MB/s or "
    "12MiB/s (k, M, G, T: powers of 1000; Ki, Mi, Gi, Ti: of 1024), or unlimited"
)
SIZE_HELP = "a size is bytes, or a number with K, M, G or T (powers of 1024): 256K, 4MiB"
SCHEDULE_HELP = (
    "a schedule is rules separated by ';', each DAYS [HH:MM-HH:MM] RATE, e.g. "
    "'mon-fri 08:00-18:00 20Mbit; sat,sun 50Mbit; * unlimited'"
)

_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_RATE = re.compile(
    _NUMBER + r"(?:([kmgt])(i?))?(bits?(?:/s)?|bps|b/s|b|Bps|B/s|B)?", re.I | re.ASCII
)
_SIZE = re.compile(r"([0-9]+)(?:([kmgt])i?b?|b)?", re.I | re.ASCII)
_TIME = re.compile(r"([0-9]{1,2}):([0-9]{2})")
MIN_RATE = 1.0  # bytes per second
MAX_SIZE = 1 << 60
_MULTIPLIERS = {"k": 1, "m": 2, "g": 3, "t": 4}


class SpecError(ValueError):
    """A rate, size or schedule that cannot be understood. ``str()`` quotes the bad part
    and says what would be right; ``part`` is the bad part itself."""

    def __init__(self, message: str, part: str) -> None:
        super().__init__(message)
        self.part = part


# -- rates and sizes ------------------------------------------------------------------------


def parse_rate(text: str, *, allow_zero: bool = True) -> float | None:
    """Bytes per second from a rate ("50Mbit", "12MB/s", ...); None for "unlimited"; 0.0
    for "0" (paused; a SpecError when ``allow_zero`` is False)."""
    value = text.strip()
    if value.lower() == "unlimited":
        return None
    if re.fullmatch(_NUMBER, value) and float(value) == 0:
        if not allow_zero:
            raise SpecError(
                f"rate {text!r}: 0 would pause for good here; give a rate or unlimited "
                "(a --schedule rule may pause, e.g. 'mon-fri 08:00-18:00 0')",
                text,
            )
        return 0.0
    match = _RATE.fullmatch(value)
    if match is None or (match[2] is None and match[4] is None):
        why = "bits or bytes? add a unit" if re.fullmatch(_NUMBER, value) else RATE_HELP
        raise SpecError(f"bad rate {text!r}: {why}", text)
    number, prefix, binary, unit = match[1], match[2], match[3], match[4] or ""
    bits = not unit.startswith("B") or unit.lower().startswith("bit")
    scale = (1024.0 if binary else 1000.0) ** _MULTIPLIERS[prefix.lower()] if prefix else 1.0
    rate = float(number) * scale / (8 if bits else 1)
    if not math.isfinite(rate):
        raise SpecError(f"rate {text!r} is too large", text)
    if rate < MIN_RATE:
        raise SpecError(
            f"rate {text!r} is below 1 byte per second (to pause, the rate is written 0)", text
        )
    return rate


def parse_size(text: str) -> int:
    """Bytes from a size: "65536", "256K", "4MiB", "1G" (K, M, G, T are powers of 1024)."""
    value = text.strip()
    match = _SIZE.fullmatch(value)
    if match is None:
        raise SpecError(f"bad size {text!r}: {SIZE_HELP}", text)
    digits = match[1].lstrip("0") or "0"
    if len(digits) > 20:
        raise SpecError(f"size {text!r} is too large", text)
    size = int(digits) * 1024 ** _MULTIPLIERS[match[2].lower()] if match[2] else int(digits)
    if size <= 0:
        raise SpecError(f"size {text!r} must be above 0", text)
    if size > MAX_SIZE:
        raise SpecError(f"size {text!r} is too large", text)
    return size


def format_rate(rate: float | None) -> str:
    """The rate as ``parse_rate`` reads it back exactly: "unlimited", "0", "20Mbit",
    "2.5Gbit", else bytes per second ("12345.5B/s")."""
    if rate is None:
        return "unlimited"
    if rate == 0:
        return "0"
    bits = rate * 8
    decimal = (("G", 1e9), ("M", 1e6), ("k", 1e3))
    # whole decimal bits (20Mbit), whole binary bytes (12MiB/s), decimal bits (2.5Mbit)
    candidates = [f"{int(bits / scale)}{p}bit" for p, scale in decimal if (bits / scale) >= 1]
    candidates = [c for c in candidates if "." not in c and _reads_back(c, rate)]
    for prefix, power in (("Gi", 3), ("Mi", 2), ("Ki", 1)):
        if (rate / 1024**power).is_integer() and rate >= 1024**power:
            candidates.append(f"{int(rate / 1024**power)}{prefix}B/s")
    for prefix, scale in decimal:
        number = _plain(bits / scale)
        if number is not None and bits >= scale:
            candidates.append(f"{number}{prefix}bit")
    candidates.append(f"{_plain(bits)}bit")
    for text in candidates:
        if _reads_back(text, rate):
            return text
    return f"{_exact(rate)}B/s"


def format_size(size: int) -> str:
    """The size in the largest binary unit that divides it: "256KiB", "4MiB", "1000"."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


def _plain(number: float) -> str | None:
    """A short decimal without an exponent, or None."""
    text = repr(number).removesuffix(".0")
    return None if "e" in text or "inf" in text or "nan" in text else text


def _exact(number: float) -> str:
    """Exactly this float's shortest decimal digits, without an exponent."""
    mantissa, _, exponent = repr(number).partition("e")
    if not exponent:
        return mantissa
    digits, _, fraction = mantissa.partition(".")
    shift = int(exponent)
    all_digits = digits + fraction
    point = len(digits) + shift
    if point <= 0:
        return "0." + "0" * -point + all_digits
    if point >= len(all_digits):
        return all_digits + "0" * (point - len(all_digits))
    return all_digits[:point] + "." + all_digits[point:]


def _reads_back(text: str, rate: float) -> bool:
    try:
        return parse_rate(text) == rate
    except SpecError:
        return False


# -- schedules ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One schedule rule: on ``days`` (0 = Monday), from minute ``start`` to minute ``end``
    of the day (``end`` may be 1440; ``end <= start`` crosses midnight into the next day),
    the rate is ``rate`` bytes per second (None: unlimited; 0: paused)."""

    days: frozenset[int]
    start: int = 0
    end: int = MINUTES_PER_DAY
    rate: float | None = None

    def __post_init__(self) -> None:
        if not self.days or not self.days <= ALL_DAYS:
            raise ValueError(f"days must be a non-empty subset of 0..6, got {set(self.days)}")
        if not (0 <= self.start < MINUTES_PER_DAY and 0 <= self.end <= MINUTES_PER_DAY):
            raise ValueError(f"bad minutes {self.start}-{self.end}")
        if self.start == self.end or (self.start == 0 and self.end == 0):
            raise ValueError("an empty time range")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"bad rate {self.rate}")

    @property
    def all_day(self) -> bool:
        return self.start == 0 and self.end == MINUTES_PER_DAY

    def matches(self, when: datetime) -> bool:
        """Whether the rule covers the wall-clock instant ``when``."""
        seconds = when.hour * 3600 + when.minute * 60 + when.second + when.microsecond / 1e6
        start, end = self.start * 60, self.end * 60
        day = when.weekday()
        if start < end:
            return day in self.days and start <= seconds < end
        # crosses midnight: the evening of one of our days, or the morning after one
        return (day in self.days and seconds >= start) or (
            (day - 1) % 7 in self.days and seconds < end
        )

    def edges(self) -> tuple[int, ...]:
        """Minutes of a day at which this rule may start or stop matching."""
        return (0, self.start, self.end % MINUTES_PER_DAY)

    def __str__(self) -> str:
        parts = [_format_days(self.days)]
        if not self.all_day:
            parts.append(f"{_format_minute(self.start)}-{_format_minute(self.end)}")
        parts.append(format_rate(self.rate))
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Schedule:
    """Rules in order (the first that matches wins) and the rate when none does."""

    rules: tuple[Rule, ...]
    default: float | None = None

    def rule_at(self, when: datetime) -> Rule | None:
        """The rule in force at wall-clock ``when`` (local time), or None (the default)."""
        for rule in self.rules:
            if rule.matches(when):
                return rule
        return None

    def rate_at(self, when: datetime) -> float | None:
        """Bytes per second at wall-clock ``when``: None is unlimited, 0 paused."""
        rule = self.rule_at(when)
        return self.default if rule is None else rule.rate

    def next_change(self, when: datetime) -> datetime | None:
        """The first instant after ``when`` at which ``rate_at`` differs from its value at
        ``when`` (a whole minute, same tzinfo), or None if the rate never changes."""
        now = self.rate_at(when)
        minutes = sorted({m for rule in self.rules for m in rule.edges()})
        midnight = datetime.combine(when.date(), time(), when.tzinfo)
        for day in range(8):  # a week, and the day the week started on
            base = midnight + timedelta(days=day)
            for minute in minutes:
                instant = base + timedelta(minutes=minute)
                if instant > when and self.rate_at(instant) != now:
                    return instant
        return None

    def __str__(self) -> str:
        """The schedule in canonical form; ``parse_schedule`` reads it back equal (given
        the same default)."""
        return "; ".join(map(str, self.rules))


def parse_schedule(spec: str, default: float | None = None) -> Schedule:
    """A Schedule from its text (see the module docstring); ``default`` is the rate when
    no rule matches (the --rate value; None: unlimited)."""
    texts = [part.strip() for part in spec.split(";")]
    rules: list[Rule] = []
    for number, text in enumerate(texts, 1):
        if text:
            rules.append(_parse_rule(text, number))
    if not rules:
        raise SpecError(f"empty schedule {spec!r}: {SCHEDULE_HELP}", spec)
    return Schedule(tuple(rules), default)


def _parse_rule(text: str, number: int) -> Rule:
    where = f"schedule rule {number} {text!r}"
    tokens = text.split()
    if len(tokens) not in (2, 3):
        raise SpecError(f"{where}: wants DAYS [HH:MM-HH:MM] RATE, e.g. 'mon-fri 20Mbit'", text)
    days = _parse_days(tokens[0], where)
    start, end = _parse_range(tokens[1], where) if len(tokens) == 3 else (0, MINUTES_PER_DAY)
    try:
        rate = parse_rate(tokens[-1])
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}", tokens[-1]) from None
    return Rule(days, start, end, rate)


def _parse_days(token: str, where: str) -> frozenset[int]:
    days: set[int] = set()
    for item in token.split(","):
        first, dash, last = item.partition("-")
        if item == "*":
            days.update(ALL_DAYS)
        elif not dash and item.lower() in _DAYS:
            days.add(_DAYS[item.lower()])
        elif dash and first.lower() in _DAYS and last.lower() in _DAYS:
            a, b = _DAYS[first.lower()], _DAYS[last.lower()]
            days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
        else:
            raise SpecError(
                f"{where}: bad days {item!r}: use mon, tue, wed, thu, fri, sat, sun, "
                "ranges (mon-fri), lists (sat,sun) or *",
                item,
            )
    return frozenset(days)


def _parse_range(token: str, where: str) -> tuple[int, int]:
    first, dash, last = token.partition("-")
    start, end = _parse_minute(first), _parse_minute(last)
    if not dash or start is None or end is None or start == MINUTES_PER_DAY:
        raise SpecError(
            f"{where}: bad time range {token!r}: use HH:MM-HH:MM (local time, 00:00 to 24:00; "
            "22:00-06:00 crosses midnight)",
            token,
        )
    if start == end % MINUTES_PER_DAY and not (start == 0 and end == MINUTES_PER_DAY):
        raise SpecError(
            f"{where}: time range {token!r} is empty (leave the range out for the whole day)",
            token,
        )
    return start, end


def _parse_minute(text: str) -> int | None:
    match = _TIME.fullmatch(text)
    if match is None:
        return None
    hours, minutes = int(match[1]), int(match[2])
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        return None
    return hours * 60 + minutes


def _format_minute(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _format_days(days: Iterable[int]) -> str:
    """Days as runs: "*", "mon-fri", "sat,sun" ... (runs may wrap: "fri-mon")."""
    chosen = frozenset(days)
    if chosen == ALL_DAYS:
        return "*"
    # start the runs just after a missing day, so a run over Sunday stays whole
    first = next(d for d in range(7) if (d - 1) % 7 not in chosen and d in chosen)
    runs: list[list[int]] = []
    for offset in range(7):
        day = (first + offset) % 7
        if day not in chosen:
            continue
        if runs and (runs[-1][-1] + 1) % 7 == day:
            runs[-1].append(day)
        else:
            runs.append([day])
    parts = []
    for run in runs:
        if len(run) == 1:
            parts.append(DAY_NAMES[run[0]])
        elif len(run) == 2:
            parts.append(f"{DAY_NAMES[run[0]]},{DAY_NAMES[run[1]]}")
        else:
            parts.append(f"{DAY_NAMES[run[0]]}-{DAY_NAMES[run[-1]]}")
    return ",".join(parts)
