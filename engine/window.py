"""How much credit a receiver grants: a window that follows the link and the disk.

Sans-IO, like ``session_core``: the receiving session tells ``CreditWindow`` what it sees
(payload bytes received, round-trip times from its own pings, how long syncs take) and
asks ``grant(...)`` after each sync and each apply how many bytes of Credit to send.

* **The window** (bytes the sender may have in flight, counting what was received and not
  yet synced) is ``2 x rate x loop``: two bandwidth-delay products, where ``rate`` is the
  payload rate received over the last ``max(1 s, 4 x loop)`` and ``loop`` the time credit
  takes to come back (the round trip plus a sync). It is never below ``base`` (the
  Welcome's window, which holds the largest record, so the sender can always go on) and
  never above ``cap`` (the memory cap: records received and not yet synced are held in
  memory). A link that the window limits delivers ``window / loop``, so the next window is
  twice as large: it grows like TCP's slow start until the link, not the window, is the
  limit, or it reaches the cap. On a link that the window does not limit it stays at
  ``base`` (66 MiB: two BDPs of a 2.6 Gbit/s, 100 ms link).
* **The disk**: when the replica's disk is the bottleneck, records received pile up in the
  receive journal unapplied. Once that backlog passes ``backlog_max`` bytes, the window
  shrinks to what is left below it (``backlog_max - backlog``, down to 0: the sender
  waits), and it opens again as the applier drains the backlog (the session asks again
  after each apply). Only while the applier *has* applicable work (a complete epoch not
  yet applied): a backlog that is one epoch still being received is never throttled, or
  the epoch could never complete.

  ``BACKLOG_MAX`` is two journal segments (128 MiB), not more, for three reasons measured
  on the NBD 1 MiB job (bench/RESULTS.md, "2026-12-03, late"): a backlog that fits in the
  receive journal's active segment and its spares is written over memory the page cache
  already holds, where a larger one grows the journal into new files; the applier keeps
  the records of a backlog this size in memory (``applier_memory``) and would read a
  larger one back, so applying slows as it falls behind, a feedback that took 2 of 5
  runs into a regime of 1.4-1.8x the CPU per byte with a 1 GiB limit; and a promotion
  applies the backlog before the VM may start, so the limit bounds a failover's time as
  well. Records the receiver does not take wait in the sender's journal, which is sized
  for that (``--journal-max``). Not less either: while an epoch waits to be applied the
  limit caps the window too (at 128 MiB, one BDP of a 10 Gbit/s link at 100 ms).

* **The disk's room**: the receive journal has no cap, and its file system may be smaller
  than the backlog limit and the window together. Credit is also kept within the room its
  file system has left (``room``): the sender waits for the applier instead of running the
  journal into ENOSPC, which failed the session, and every reconnection after it, on a
  disk its own backlog held full. While the applier has work (or will have, once a
  barrier already read is synced) its trims will free room: the session grants again
  after each apply. Without it (an epoch still arriving) the credit is cut to the room
  too, and ``short`` says so: the records coming may complete the epoch, or fill a
  segment whose applied records a roll then frees, and each sync grants again. But the
  sender may be waiting for a record larger than the room: the stream stops. The session
  then grants up to ``base`` (``unstall``) after a moment without frames (or up to the
  most credit the sender has held, when the window had grown past ``base``: its frames
  grow to that, so the one it waits for may be larger than ``base``), and a disk that
  cannot hold the epoch is told as full. (Granting ``base`` at once, as it did, ran a
  receiver restarted on a small disk into ENOSPC: its Welcome, with nothing to apply yet,
  granted the whole window beside a segment of applied records a roll would have freed.)
  The session asks ``grant`` for the Welcome's credit too, and counts as "received not
  synced" the frames it has read and not written yet.

``grant`` keeps ``credit outstanding + received not synced + grant <= window``; with a
fixed window that is exactly "grant again what was synced", the rule before.
"""

from __future__ import annotations

import collections
from typing import Final

MAX_WINDOW: Final = 256 * 1024 * 1024  # memory cap per session (bytes not yet synced)
BACKLOG_MAX: Final = 128 * 1024 * 1024  # received, not applied: beyond this, less credit
MIN_SPAN: Final = 1.0  # seconds of history behind the rate, at least
MIN_ELAPSED: Final = 0.05  # the rate is bytes over at least this many seconds


class CreditWindow:
    """See the module docstring. Times in seconds (monotonic, from the caller)."""

    def __init__(self, base: int, *, cap: int = MAX_WINDOW, backlog_max: int = BACKLOG_MAX) -> None:
        if base < 1 or backlog_max < 1:
            raise ValueError("base and backlog_max must be positive")
        self.base = base
        self.cap = max(cap, base)
        self.backlog_max = backlog_max
        self.rtt: float | None = None
        self.sync_time = 0.0  # seconds a sync takes, smoothed
        self._received: collections.deque[tuple[float, int]] = collections.deque()
        self._span_bytes = 0
        self.window = base  # the window as of the last ``grant``
        self.throttled = False  # the last ``grant`` was cut by the backlog or the room
        self.short = False  # ... by the room, with nothing to apply: see ``unstall``
        # the most credit the sender may have held at once: its frames grow to it
        # (``SenderCore.window``), so it may be waiting for a frame that large
        self.held_max = 0

    @property
    def loop(self) -> float:
        """Seconds credit takes to come back: a round trip and a sync."""
        return (self.rtt or 0.0) + self.sync_time

    def observe_rtt(self, seconds: float) -> None:
        if seconds >= 0:
            self.rtt = seconds if self.rtt is None else 0.75 * self.rtt + 0.25 * seconds

    def observe_sync(self, seconds: float) -> None:
        if seconds >= 0:
            self.sync_time = 0.75 * self.sync_time + 0.25 * seconds

    def received(self, now: float, nbytes: int) -> None:
        self._received.append((now, nbytes))
        self._span_bytes += nbytes
        self._forget(now)

    def rate(self, now: float) -> float:
        """Payload bytes per second received lately."""
        self._forget(now)
        if not self._received:
            return 0.0
        # over the history kept (a young session has less), but at least one loop: a
        # first burst is not taken for a rate
        elapsed = now - self._received[0][0]
        return self._span_bytes / max(elapsed, self.loop, MIN_ELAPSED)

    def _span(self) -> float:
        return max(MIN_SPAN, 4 * self.loop)

    def _forget(self, now: float) -> None:
        span = self._span()
        while self._received and now - self._received[0][0] > span:
            self._span_bytes -= self._received.popleft()[1]

    def target(self, now: float) -> int:
        """The window the link needs: two bandwidth-delay products, within base..cap."""
        bdp2 = 2 * self.rate(now) * self.loop
        return int(min(self.cap, max(self.base, bdp2)))

    def grant(
        self,
        now: float,
        *,
        outstanding: int,
        unsynced: int,
        backlog: int,
        applicable: bool,
        room: int | None = None,
    ) -> int:
        """Bytes of Credit to send now. ``outstanding``: credit the sender still holds;
        ``unsynced``: bytes received and not yet synced; ``backlog``: bytes received and
        not applied; ``applicable``: the applier has a complete epoch to apply; ``room``:
        bytes the receive journal's file system can still take (None: no limit)."""
        window = self.target(now)
        self.throttled = applicable and backlog + window > self.backlog_max
        if self.throttled:
            window = max(0, self.backlog_max - backlog)
        self.window = window
        granted = max(0, window - outstanding - unsynced)
        self.short = False
        if room is not None:
            # the disk's room: a journal that ran its file system full would fail the
            # session. Within it, always; with nothing to apply, ``unstall`` gives way
            # if the stream stops.
            fits = max(0, room - outstanding - unsynced)
            if fits < granted:
                granted = fits
                self.throttled = self.throttled or applicable
                self.short = not applicable
        self.held_max = max(self.held_max, outstanding + granted)
        return granted

    def unstall(self, *, outstanding: int, unsynced: int) -> int:
        """Credit to grant when the last ``grant`` was ``short`` and no frame came since:
        the sender may wait for a frame the room cannot hold, and nothing else would
        grant more. Up to ``base`` (which holds the largest record) in flight, or up to
        ``held_max`` when the window has granted more at once: the sender packs frames
        of several records up to the most credit it has held, so the frame it waits for
        may be larger than ``base`` (granting only ``base`` left it waiting for ever).
        The journal may then fill its disk, and that is told as such."""
        self.short = False
        granted = max(0, max(self.base, self.held_max) - outstanding - unsynced)
        self.held_max = max(self.held_max, outstanding + granted)
        return granted
