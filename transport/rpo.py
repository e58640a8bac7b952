"""``--target-rpo``: the least bandwidth that keeps the replication lag under a target.

``RpoController`` is sans-IO: each ``update(now, backlog, age, cap)`` (a tick, a few times a
second) takes what the sender has not had applied yet and returns the *pace*, the rate the
token bucket may use (``TokenBucket.set_pace``), always within the cap the rate option,
the schedule or the ``rate`` command set. The rest of the link is left to other traffic.

The rule, in bytes and seconds:

* ``backlog``: bytes journaled and not yet applied by the receiver (shipped or not);
  ``age``: how old the oldest of them is (the RPO right now);
* the backlog should be gone before the oldest change reaches half the target, so
  ``need = backlog / max(target/2 - age, target/20)``: the closer the lag comes to the
  target, the faster it must go (at or past half the target, 10x the backlog per target).
  A steady write rate W settles at a lag of about target/4 with a pace of about W;
* the pace rises to ``need`` at once (the RPO is at stake) and falls towards it with a time
  constant of ``target/2`` (so one quiet tick does not throw the pace away);
* it never goes below ``floor`` (64 KiB/s by default: a trickle is shipped at once, and a
  burst is noticed within a tick) nor above the cap; a paused cap (0) pauses.

*Held or missed*: the target is **missed** once the lag has been above it for ``grace``
seconds without a break (by then the pace is at the cap: the link, the cap or the schedule
cannot carry the writes), and **held** again as soon as the lag is back at or under it.
``update`` reports each change once (``event``), so the caller logs once per episode.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final, Literal

from replicator.transport.schedule import SpecError

__all__ = ["MIN_PACE", "RpoController", "RpoDecision", "default_grace", "parse_target"]

MIN_PACE: Final = 64 * 1024  # bytes per second: the pace never goes below this
AIM: Final = 0.5  # the backlog should be gone by this fraction of the target
MIN_HORIZON: Final = 0.05  # ... and within this fraction of it once the lag is past AIM

Event = Literal["missed", "held"]


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_TARGET = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|m|min|h)?", re.IGNORECASE)


def parse_target(text: str) -> float:
    """Seconds from ``--target-rpo``: "30", "30s", "5m", "1.5h" (more than 0)."""
    match = _TARGET.fullmatch(text.strip())
    seconds = 0.0
    if match is not None:
        seconds = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if not (math.isfinite(seconds) and seconds > 0):
        raise SpecError(
            f"bad target RPO {text!r}: a duration above 0 in seconds, or with s, m or h "
            "(30, 30s, 5m, 1h)",
            text,
        )
    return seconds


def default_grace(target: float) -> float:
    """How long the lag may stay above the target before it counts as missed: half the
    target, at least 1 s and at most 30 s."""
    return min(30.0, max(1.0, target / 2))


@dataclass(frozen=True, slots=True)
class RpoDecision:
    pace: float  # bytes per second the shaper may use now (<= the cap; 0 when paused)
    need: float  # what the backlog needs now, before smoothing and clamping
    event: Event | None  # the target was just missed, or is held again


class RpoController:
    """See the module docstring. ``target`` and ``grace`` in seconds, ``floor`` in bytes
    per second; time comes from the caller (``now``, monotonic seconds)."""

    def __init__(
        self, target: float, *, grace: float | None = None, floor: float = MIN_PACE
    ) -> None:
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"the target RPO must be a positive number of seconds, got {target}")
        if not (math.isfinite(floor) and floor > 0):
            raise ValueError(f"floor must be a positive rate, got {floor}")
        self.target = float(target)
        self.grace = default_grace(target) if grace is None else float(grace)
        self.floor = float(floor)
        self._pace = self.floor  # smoothed, before the cap
        self._stamp: float | None = None
        self._over_since: float | None = None
        self.missed = False
        self.episodes = 0  # how many times the target was missed
        self.last = RpoDecision(self.floor, 0.0, None)

    @property
    def met(self) -> bool:
        return not self.missed

    def need(self, backlog: float, age: float) -> float:
        """Bytes per second that clear ``backlog`` in time, given the oldest is ``age`` old."""
        horizon = max(self.target * AIM - max(0.0, age), self.target * MIN_HORIZON)
        return max(0.0, backlog) / horizon

    def update(self, now: float, backlog: float, age: float, cap: float | None) -> RpoDecision:
        """One tick: the pace for ``cap`` (bytes per second; None unlimited, 0 paused)."""
        need = self.need(backlog, age)
        dt = 0.0 if self._stamp is None else max(0.0, now - self._stamp)
        self._stamp = now
        if need >= self._pace:
            pace = need
        else:  # fall towards the need, not at once
            pace = self._pace + (need - self._pace) * (1.0 - math.exp(-dt / (self.target * AIM)))
        pace = max(pace, self.floor)
        if cap is not None:
            pace = min(pace, max(cap, self.floor))  # no wind-up above the cap
        self._pace = pace
        event = self._track(now, age)
        effective = pace if cap is None else min(pace, cap)
        self.last = RpoDecision(effective, need, event)
        return self.last

    def _track(self, now: float, age: float) -> Event | None:
        if age <= self.target:
            self._over_since = None
            if self.missed:
                self.missed = False
                return "held"
            return None
        if self._over_since is None:
            self._over_since = now
        if not self.missed and now - self._over_since >= self.grace:
            self.missed = True
            self.episodes += 1
            return "missed"
        return None
