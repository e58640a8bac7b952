"""Bandwidth shaping: a token bucket for bulk frames, and the task that keeps it on schedule.

``TokenBucket`` implements ``connection.Shaper``: ``FramedConnection.send`` awaits
``acquire(wire_size)`` before each bulk frame (Records, Manifest) and never before a
control frame (acks, credit, pings), so shaping cannot starve heartbeats.

The bucket, in bytes on the wire:

* it holds up to ``burst`` tokens and fills at ``rate`` bytes per second; it starts full;
* ``acquire(n)`` takes n tokens as soon as there are ``min(n, burst)`` of them: a frame
  larger than the burst waits for a full bucket, goes, and leaves the bucket in debt,
  which later frames wait out. So the long-run rate is exactly ``rate``, nothing ever
  waits for more tokens than the bucket can hold, and over any window of T seconds at
  most ``max(burst, largest frame) + rate x T`` bytes go;
* waiters are served first come, first served (a small frame never overtakes a large one);
* ``rate=None`` is unlimited (``acquire`` returns at once); ``rate=0`` pauses: nothing
  goes, and ``acquire`` waits, without a timeout of its own, until the rate changes (the
  tokens the bucket held are kept for then);
* ``set_rate`` applies at once, to waiters too: they are woken and wait again (or not)
  at the new rate, keeping the tokens gathered so far;
* ``burst=None`` means the default, ``max(64 KiB, rate x 50 ms)``, which follows the rate
  when it changes; an explicit burst stays.

Time comes from ``clock`` (monotonic seconds; ``time.monotonic``, the event loop's clock,
by default) and waits from ``sleep``; tests inject both.

``ScheduledRate`` sets a bucket's rate from a ``Schedule`` at each boundary (local time,
``datetime.now`` by default), and re-reads the clock at least every ``recheck`` seconds so
that DST changes and clock steps are noticed within a minute. It sets the rate only when
the schedule's rate changes, so a rate set by hand (``Shaping.set_rate``, the ``rate``
control op) holds until the schedule's next change.

``Shaping`` bundles what a sender needs (one bucket for all of a job's connections, and the
schedule task) and builds it from the command-line strings. With a target RPO
(``--target-rpo``) it also runs the pacer: every ``PACE_TICK`` seconds it asks ``probe`` (set
by the engine: the bytes not applied yet and the age of the oldest) and sets the bucket's
pace from ``transport/rpo.py``'s controller, below the rate in force; it logs once when the
target is missed and once when it is held again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final

import structlog

from replicator.transport.rpo import RpoController, parse_target
from replicator.transport.schedule import (
    Rule,
    Schedule,
    SpecError,
    format_rate,
    parse_rate,
    parse_schedule,
    parse_size,
)

__all__ = [
    "BURST_TIME",
    "MIN_BURST",
    "PACE_TICK",
    "RECHECK",
    "ScheduledRate",
    "Shaping",
    "TokenBucket",
    "default_burst",
]

MIN_BURST: Final = 64 * 1024
BURST_TIME: Final = 0.05  # the default burst is this many seconds at the rate
RECHECK: Final = 60.0  # ScheduledRate reads the clock at least this often
PACE_TICK: Final = 0.25  # the --target-rpo pacer looks at the lag this often
# tokens within this of what a waiter needs count as enough (float rounding after a sleep)
_EPSILON = 1e-6

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]
# the engine's answer to "how far behind is the receiver": (bytes not applied, age of the
# oldest in seconds), or None while there is no connection to pace
Probe = Callable[[], tuple[float, float] | None]

log = structlog.get_logger(__name__)


def default_burst(rate: float | None) -> int:
    """The burst when none is given: 64 KiB, or 50 ms at the rate if that is more."""
    if rate is None or rate == 0:
        return MIN_BURST
    return max(MIN_BURST, min(int(rate * BURST_TIME), 1 << 60))


def _check_rate(rate: float | None) -> float | None:
    if rate is None:
        return None
    if not (math.isfinite(rate) and rate >= 0):
        raise ValueError(f"rate must be None (unlimited) or a finite number >= 0, got {rate}")
    return float(rate)


class TokenBucket:
    """A token bucket on wire bytes, shared by any number of tasks and connections."""

    def __init__(
        self,
        rate: float | None = None,
        burst: int | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep | None = None,
    ) -> None:
        if burst is not None and burst < 1:
            raise ValueError(f"burst must be at least 1 byte, got {burst}")
        self._rate = _check_rate(rate)
        self._pace: float | None = None  # a ceiling below the rate (see set_pace)
        self._fixed_burst = burst
        self._burst = burst if burst is not None else default_burst(self._rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(self._burst)
        self._stamp = clock()
        self._lock = asyncio.Lock()  # FIFO: the head waiter holds it
        self._waiting = 0  # tasks inside acquire() that did not pass at once
        self._wake: asyncio.Future[None] | None = None  # the head waiter's nap
        self.acquired = 0  # bytes granted so far

    # -- settings -----------------------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        """Bytes per second; None is unlimited, 0 paused."""
        return self._rate

    @property
    def pace(self) -> float | None:
        """The ceiling ``set_pace`` set (None: none)."""
        return self._pace

    @property
    def effective_rate(self) -> float | None:
        """The rate the bucket fills at: the rate, or the pace when that is lower."""
        rate, pace = self._rate, self._pace
        if rate is None:
            return pace
        return rate if pace is None else min(rate, pace)

    @property
    def burst(self) -> int:
        return self._burst

    @property
    def paused(self) -> bool:
        return self._rate == 0

    @property
    def waiting(self) -> int:
        """How many acquire() calls are waiting now."""
        return self._waiting

    def tokens(self) -> float:
        """Tokens now (negative while a frame larger than the burst is being paid off)."""
        self._refill()
        return self._tokens

    def set_rate(self, rate: float | None) -> None:
        """Change the rate now; waiters see it at once. A default burst follows it."""
        rate = _check_rate(rate)
        self._refill()  # what the old rate gave until now
        self._rate = rate
        if self._fixed_burst is None:
            self._burst = default_burst(rate)
        self._tokens = self._burst if rate is None else min(self._tokens, self._burst)
        self._poke()

    def set_pace(self, pace: float | None) -> None:
        """A ceiling below the rate (``--target-rpo``'s pace; None: none). The rate stays
        the cap and decides the burst; the bucket fills at the lower of the two. Waiters see
        it at once."""
        pace = _check_rate(pace)
        if pace == self._pace:
            return
        self._refill()
        self._pace = pace
        self._poke()

    def set_burst(self, burst: int | None) -> None:
        """Change the burst (None: the default for the rate); waiters see it at once."""
        if burst is not None and burst < 1:
            raise ValueError(f"burst must be at least 1 byte, got {burst}")
        self._refill()
        self._fixed_burst = burst
        self._burst = burst if burst is not None else default_burst(self._rate)
        self._tokens = min(self._tokens, self._burst)
        self._poke()

    # -- the Shaper protocol ------------------------------------------------------------------

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may go on the wire, then take them from the bucket."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if not self._waiting and self._take(nbytes):
            return
        self._waiting += 1
        try:
            async with self._lock:  # first come, first served
                while not self._take(nbytes):
                    await self._nap(self._delay(nbytes))
        finally:
            self._waiting -= 1

    # -- internals ----------------------------------------------------------------------------

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        rate = self.effective_rate
        if rate is None:
            self._tokens = float(self._burst)
        elif rate > 0 and self._tokens < self._burst:
            self._tokens = min(float(self._burst), self._tokens + elapsed * rate)

    def _take(self, nbytes: int) -> bool:
        self._refill()
        rate = self.effective_rate
        if rate == 0:
            return False  # paused: nothing goes, whatever the bucket holds
        if rate is not None:
            need = min(nbytes, self._burst)
            if self._tokens + _EPSILON < need:
                return False
            self._tokens -= nbytes
        self.acquired += nbytes
        return True

    def _delay(self, nbytes: int) -> float | None:
        """Seconds until ``nbytes`` could go at the current rate; None while paused."""
        rate = self.effective_rate
        if rate is None:
            return 0.0
        if rate == 0:
            return None
        return max(0.0, (min(nbytes, self._burst) - self._tokens) / rate)

    async def _nap(self, delay: float | None) -> None:
        """Sleep ``delay`` seconds (forever if None), or until ``_poke``."""
        loop = asyncio.get_running_loop()
        wake = self._wake = loop.create_future()
        try:
            if delay is None:
                await wake
            elif self._sleep is None:
                timer = loop.call_later(delay, _resolve, wake)
                try:
                    await wake
                finally:
                    timer.cancel()
            else:
                sleeper = asyncio.ensure_future(self._sleep(delay))
                try:
                    await asyncio.wait((sleeper, wake), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleeper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sleeper
        finally:
            if self._wake is wake:
                self._wake = None

    def _poke(self) -> None:
        """Wake the head waiter: something changed, it computes its wait again."""
        if self._wake is not None:
            _resolve(self._wake)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ScheduledRate:
    """Keeps ``bucket`` at the rate ``schedule`` gives for the local time.

    ``run()`` (a task for the life of the sender) sets the rate at once and then at each
    boundary; ``apply()`` does one step (for tests and for embedders with their own timer).
    ``clock`` gives the local wall-clock time (``datetime.now``), ``sleep`` waits.
    """

    def __init__(
        self,
        bucket: TokenBucket,
        schedule: Schedule,
        *,
        clock: Callable[[], datetime] = datetime.now,
        sleep: Sleep = asyncio.sleep,
        recheck: float = RECHECK,
    ) -> None:
        self.bucket = bucket
        self._schedule = schedule
        self._clock = clock
        self._sleep = sleep
        self._recheck = recheck
        self._applied: tuple[float | None] | None = None  # the scheduled rate last set
        self._rule: Rule | None = None
        self._next: datetime | None = None
        self._wake: asyncio.Future[None] | None = None
        self.changes = 0  # how many times it has set the bucket's rate

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @schedule.setter
    def schedule(self, schedule: Schedule) -> None:
        """A new schedule: its rate is set at once (a running ``run()`` is woken)."""
        self._schedule = schedule
        self._applied = None
        if self._wake is not None:
            _resolve(self._wake)

    @property
    def rule(self) -> Rule | None:
        """The rule in force at the last ``apply()`` (None: the schedule's default)."""
        return self._rule

    @property
    def next_change(self) -> datetime | None:
        """When the scheduled rate changes next, as of the last ``apply()`` (local time)."""
        return self._next

    def apply(self) -> float:
        """Set the bucket's rate if the scheduled rate changed since the last call; return
        the seconds until the next call is due (the next boundary, at most ``recheck``)."""
        now = self._clock()
        schedule = self._schedule
        self._rule = schedule.rule_at(now)
        rate = schedule.default if self._rule is None else self._rule.rate
        if self._applied is None or self._applied[0] != rate:
            self._applied = (rate,)
            self.changes += 1
            self.bucket.set_rate(rate)
        self._next = schedule.next_change(now)
        if self._next is None:
            return self._recheck
        return max(0.0, min(self._recheck, (self._next - now).total_seconds()))

    async def run(self) -> None:
        """Apply the schedule until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            delay = self.apply()
            wake = self._wake = loop.create_future()
            sleeper = asyncio.ensure_future(self._sleep(delay))
            try:
                await asyncio.wait((sleeper, wake), return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._wake = None
                sleeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sleeper


class Shaping:
    """A sender's shaping: one ``bucket`` for all of the job's connections (give it to the
    connector: it outlives reconnects) and, with a schedule, the task that follows it.

    Always worth having, even unlimited: ``set_rate`` (the ``rate`` control op) can cap a
    running sender that was started without a rate.
    """

    def __init__(
        self,
        rate: float | None = None,
        burst: int | None = None,
        schedule: Schedule | None = None,
        *,
        target_rpo: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep | None = None,
        wall_clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        start = rate if schedule is None else schedule.rate_at(wall_clock())
        self._clock = clock
        self._sleep: Sleep = sleep or asyncio.sleep
        self.rpo = None if target_rpo is None else RpoController(target_rpo)
        self.probe: Probe | None = None  # set by the engine (see the module docstring)
        self.bucket = TokenBucket(start, burst, clock=clock, sleep=sleep)
        self.scheduler: ScheduledRate | None = None
        if schedule is not None:
            self.scheduler = ScheduledRate(
                self.bucket, schedule, clock=wall_clock, sleep=sleep or asyncio.sleep
            )
            self.scheduler.apply()
        self._manual: int | None = None  # scheduler.changes when a rate was set by hand

    @classmethod
    def from_options(
        cls,
        rate: str | None = None,
        burst: str | None = None,
        schedule: str | None = None,
        target_rpo: str | None = None,
        **kw: Any,
    ) -> Shaping:
        """From --rate, --burst, --schedule and --target-rpo as typed; raises SpecError (a
        ValueError) naming the option and quoting the bad part."""
        try:
            target = None if target_rpo is None else parse_target(target_rpo)
        except SpecError as exc:
            raise SpecError(f"--target-rpo: {exc}", exc.part) from None
        try:
            cap = None if rate is None else parse_rate(rate, allow_zero=False)
        except SpecError as exc:
            raise SpecError(f"--rate: {exc}", exc.part) from None
        try:
            size = None if burst is None else parse_size(burst)
        except SpecError as exc:
            raise SpecError(f"--burst: {exc}", exc.part) from None
        try:
            plan = None if schedule is None else parse_schedule(schedule, default=cap)
        except SpecError as exc:
            raise SpecError(f"--schedule: {exc}", exc.part) from None
        return cls(cap, size, plan, target_rpo=target, **kw)

    @property
    def rate(self) -> float | None:
        """The rate in force (bytes per second; None unlimited, 0 paused)."""
        return self.bucket.rate

    def set_rate(self, rate: float | None) -> None:
        """A rate set by hand: applies at once and holds until the schedule's next change
        (for good without a schedule)."""
        self._manual = 0 if self.scheduler is None else self.scheduler.changes
        self.bucket.set_rate(rate)

    @property
    def source(self) -> str:
        """Where the rate in force comes from: "manual", "schedule" or "rate" (--rate)."""
        scheduler = self.scheduler
        if self._manual is not None and (scheduler is None or scheduler.changes == self._manual):
            return "manual"
        return "rate" if scheduler is None or scheduler.rule is None else "schedule"

    async def run(self) -> None:
        """Follow the schedule and pace to the target RPO until cancelled; returns at once
        without either."""
        async with asyncio.TaskGroup() as group:
            if self.scheduler is not None:
                group.create_task(self.scheduler.run(), name="schedule")
            if self.rpo is not None:
                group.create_task(self._pace(), name="rpo-pacer")

    async def _pace(self) -> None:
        while True:
            self.pace_once()
            await self._sleep(PACE_TICK)

    def pace_once(self) -> None:
        """One pacer tick (``run`` does them; tests call it with an injected clock)."""
        rpo, probe = self.rpo, self.probe
        if rpo is None or probe is None:
            return
        seen = probe()
        if seen is None:
            return  # no connection: nothing to pace, the pace in force stays
        backlog, age = seen
        decision = rpo.update(self._clock(), backlog, age, self.bucket.rate)
        # the bucket takes the lower of rate and pace: a cap raised later applies at once
        self.bucket.set_pace(max(decision.pace, rpo.floor))
        if decision.event == "missed":
            log.warning(
                "sender.rpo_target_missed",
                target_seconds=rpo.target,
                lag_seconds=round(age, 3),
                rate=format_rate(self.bucket.rate),
                hint="the link, --rate or --schedule cannot carry the writes at this target: "
                "raise the rate or the target (see docs/OPERATIONS.md, 'Bandwidth')",
            )
        elif decision.event == "held":
            log.info("sender.rpo_target_held", target_seconds=rpo.target, lag_seconds=age)

    def status(self) -> dict[str, Any]:
        """For ``status`` and the metrics: the rate in force and where it comes from."""
        bucket, scheduler = self.bucket, self.scheduler
        rule = None if scheduler is None else scheduler.rule
        nxt = None if scheduler is None else scheduler.next_change
        return {
            "rate_bytes_per_second": bucket.rate,
            "rate": format_rate(bucket.rate),
            "burst_bytes": bucket.burst,
            "paused": bucket.paused,
            "source": self.source,
            "schedule_rule": None if rule is None else str(rule),
            "next_change": None if nxt is None else nxt.isoformat(timespec="minutes"),
            "waiting": bucket.waiting,
            "bytes_shaped": bucket.acquired,
            "rpo": self._rpo_status(),
        }

    def _rpo_status(self) -> dict[str, Any] | None:
        rpo = self.rpo
        if rpo is None:
            return None
        pace = self.bucket.effective_rate
        return {
            "target_seconds": rpo.target,
            "met": rpo.met,
            "pace_bytes_per_second": None if pace is None else round(pace, 1),
            "need_bytes_per_second": round(rpo.last.need, 1),
            "missed_episodes": rpo.episodes,
            "warning": (
                f"the lag is above the {rpo.target:g} s target RPO at "
                f"{format_rate(self.bucket.rate)}: raise the rate or the target"
                if rpo.missed
                else None
            ),
        }
