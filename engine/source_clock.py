"""The source's clock as the target sees it, and the target's lag that never trusts it alone.

A consistency point carries the source's wall-clock time (``point_ts_ns``: the time the
source journaled its barrier). "How old is the replica's data" is the target's *now* less
that time, and the two clocks are two hosts' clocks: a source an hour behind made every
target's lag read an hour more, an hour ahead made it negative, and a hostile stamp made
it "-7426747585 s". So the receiver:

1. estimates the source's clock *offset* (source time - target time) per session, from
   the sender's Pings, which carry its wall clock (Hello capability ``wall-clock``,
   ``SourceClock``);
2. keeps, when it applies a point, the point's time *on the target's clock*
   (``on_target_clock``: the source stamp less the offset, and never later than the
   moment the target applied it) beside the source stamp (``applied.state``'s
   ``point_target_ns``, and ``promoted.state``'s at a promotion);
3. reports the lag as the target's now less that time (``lag_seconds``), never less than
   the time since the point was applied here (a bound no clock can break: the data is at
   least that old) and never negative.

The rejected alternative, "seconds since this receiver applied the point", reads near 0
while a backlog (a WAN link minutes behind) applies points late: the data is minutes old.
The offset keeps the data's age, whatever the two clocks say.
"""

from __future__ import annotations

import time

import structlog

log = structlog.get_logger()

# an offset above this is logged (once per session) and worth fixing: NTP keeps hosts
# within milliseconds; a lag read from badly set clocks was wrong by the whole offset
WARN_OFFSET_SECONDS = 5.0


class SourceClock:
    """One session's estimate of the source's clock offset (source time - target time).

    Each Ping the sender stamps with its wall clock gives a sample: the stamp less the
    target's wall clock when the Ping was read. The Ping spent some time on its way (the
    network, the socket buffers behind bulk frames, the reader busy with the frame before
    it), and that delay is never negative: each sample is the true offset *less* a delay,
    so it can only make the source look behind. The estimate is the largest sample of the
    session: the one least delayed, which errs by the smallest delay seen (milliseconds on
    a quiet moment of any link), and always on the same side (the lag it gives may read
    short by that much, never by the backlog's age).

    A source clock that steps *forward* during a session is followed at its next Ping; one
    stepped *back* keeps the old, larger estimate until the next session (the lag then
    reads long by the step: loud, never a silent understatement).
    """

    def __init__(self, job: str, peer: str) -> None:
        self.job = job
        self.peer = peer
        self.offset_ns: int | None = None
        self._warned = False

    def heard(self, source_ns: int, received_ns: int) -> int | None:
        """A Ping stamped ``source_ns`` (the source's wall clock, Unix ns) was read at
        ``received_ns`` (ours): the estimate after it. A stamp of 0 or less says nothing."""
        if source_ns <= 0:
            return self.offset_ns
        sample = source_ns - received_ns
        if self.offset_ns is None or sample > self.offset_ns:
            self.offset_ns = sample
        if not self._warned and abs(self.offset_ns) > WARN_OFFSET_SECONDS * 1e9:
            self._warned = True
            ahead = self.offset_ns > 0
            log.warning(
                "receiver.source_clock_offset",
                job=self.job,
                peer=self.peer,
                offset_seconds=round(self.offset_ns / 1e9, 3),
                source_time=_iso(source_ns),
                target_time=_iso(received_ns),
                action=f"the source's clock is {abs(self.offset_ns) / 1e9:.1f} s "
                f"{'ahead of' if ahead else 'behind'} this target's: the lag shown here "
                "allows for it, but logs, schedules and certificates on both hosts do not; "
                "keep both clocks in time with NTP (`chronyc tracking` or `timedatectl "
                "timesync-status` on each host)",
            )
        return self.offset_ns


def on_target_clock(point_ts_ns: int, offset_ns: int | None, applied_ns: int) -> int:
    """The time of a consistency point stamped ``point_ts_ns`` by the source, on the
    target's clock, for a point applied here at ``applied_ns``: the stamp less the source's
    clock offset (unknown, from a sender that does not send its clock: the stamp as it is),
    never later than ``applied_ns`` (data cannot have been written after it was applied)
    and never before the Unix epoch (a hostile stamp). 0 (unknown) for a stamp of 0."""
    if point_ts_ns <= 0:
        return 0
    converted = point_ts_ns - offset_ns if offset_ns is not None else point_ts_ns
    return max(1, min(converted, applied_ns))


def lag_seconds(
    now_ns: int, point_ts_ns: int, point_target_ns: int, since_applied: float | None = None
) -> float | None:
    """Seconds of source writes the replica may lack: ``now_ns`` (the target's wall clock)
    less the point's time on the target's clock (``point_target_ns``; 0 in a state file
    from before it was kept: the source's stamp ``point_ts_ns`` as it is), never less than
    ``since_applied`` (seconds since this process applied the point, monotonic: a step of
    the target's own clock does not shrink it) nor 0. None when the point's time is not
    known."""
    at = point_target_ns or point_ts_ns
    if at <= 0:
        return None
    return max(0.0, (now_ns - at) / 1e9, since_applied or 0.0)


def missing_seconds(at_ns: int, point_ts_ns: int, point_target_ns: int) -> float | None:
    """A promotion's RPO bound: seconds of source writes the replica lacked when it was
    promoted at ``at_ns``, as ``lag_seconds`` said then (None: the point's time is not
    known)."""
    return lag_seconds(at_ns, point_ts_ns, point_target_ns)


def _iso(ts_ns: int) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts_ns / 1e9))
    except (OverflowError, OSError, ValueError):  # a stamp no calendar holds
        return f"{ts_ns} ns"
