"""Which way a first sync's writes reach the replica: through the page cache or past it.

A first sync applies each frame's records as they arrive, on the receive path
(``JobReplica.receive``), so the time a write takes is time the sender may wait. Which way
is faster depends on the machine's state at the time, not on its hardware: when its memory
is all backed, a 1 MiB ``pwrite`` into the page cache is a copy (0.1-0.3 ms) and the kernel
writes it back beside the transfer, while a write past the cache waits for the device; on a
VM that handed its free memory back to the host (virtio-balloon free page reporting) each
new page-cache page first faults into the host, and the same ``pwrite`` takes several
milliseconds (bench/RESULTS.md, "2026-12-04" and "2026-12-04, later"). The same machine
moves between the two states within hours, so the receiver measures instead of guessing.

:class:`WritePathChooser` times the writes in windows of ``WINDOW_BYTES`` (a mean over
several frames: single frames vary several-fold) and keeps to the cheaper way, trying the
other for one window now and then: after ``PROBE_FIRST`` windows, doubling while it stays
the dearer, up to ``PROBE_MOST``; a window that is already ``GIVE_UP`` times dearer than
the other way ends at once. A change of state is noticed within a few hundred MiB at most,
and a clear loser costs a frame or two in that many. Both ways write the same bytes, and the
commit's ``fsync`` makes either durable (``engine/direct_writes.py``): the choice moves
speed, never a promise.
"""

from __future__ import annotations

from typing import Final

WINDOW_BYTES: Final = 8 * 1024 * 1024  # bytes timed together for one measurement
PROBE_FIRST: Final = 4  # windows the cheaper way before the other is tried again
PROBE_MOST: Final = 64  # the longest the other way goes untried (512 MiB)
SMOOTHING: Final = 0.3  # weight of a new window of the way in use
GIVE_UP: Final = 4.0  # a window this many times dearer than the other way ends at once


class WritePathChooser:
    """Chooses whether a first sync's large writes go past the page cache.

    ``choose()`` before each batch of writes, ``observe()`` after it with the bytes that
    could go past the cache and the time the batch took. Not thread-safe; one per job.
    """

    def __init__(
        self,
        *,
        window: int = WINDOW_BYTES,
        probe_first: int = PROBE_FIRST,
        probe_most: int = PROBE_MOST,
    ) -> None:
        if window <= 0 or not 1 <= probe_first <= probe_most:
            raise ValueError("need window > 0 and 1 <= probe_first <= probe_most")
        self._window = window
        self._probe_first = probe_first
        self._probe_most = probe_most
        self._cost: dict[bool, float] = {}  # seconds per byte, by past_cache
        # what the window being measured uses: past the cache first, the cheaper first
        # guess where it loses (at worst a few ms per MiB, against tens the other way)
        self._way = True
        self._seconds = 0.0
        self._bytes = 0
        self._interval = probe_first  # windows the cheaper way between two probes
        self._since_probe = 0

    @property
    def costs(self) -> dict[bool, float]:
        """Seconds per byte measured each way so far (by ``past_cache``), for logs."""
        return dict(self._cost)

    def best(self) -> bool | None:
        """The cheaper way measured so far; None until both were measured."""
        if len(self._cost) < 2:
            return None
        return self._cost[True] < self._cost[False]

    def choose(self) -> bool:
        """Whether the next batch goes past the page cache."""
        return self._way

    def observe(self, past_cache: bool, seconds: float, nbytes: int) -> None:
        """A batch chosen ``past_cache`` took ``seconds`` with ``nbytes`` that could go
        past the cache (large aligned writes). Batches with none say nothing."""
        if nbytes <= 0 or seconds < 0 or past_cache != self._way:
            return
        self._seconds += seconds
        self._bytes += nbytes
        if self._bytes >= self._window or self._clearly_dearer():
            self._close_window()

    def _clearly_dearer(self) -> bool:
        """The window so far costs ``GIVE_UP`` times what the other way last did: its mean
        is not needed to choose (a probe on a cold machine may cost 30 ms per MiB)."""
        other = self._cost.get(not self._way)
        return other is not None and self._seconds > GIVE_UP * other * self._bytes

    def _close_window(self) -> None:
        way, cost = self._way, self._seconds / self._bytes
        self._seconds, self._bytes = 0.0, 0
        before = self.best()
        old = self._cost.get(way)
        if old is None or way != before:
            self._cost[way] = cost  # a first window, or a probe: the state now
        else:
            self._cost[way] = old + SMOOTHING * (cost - old)
        after = self.best()
        if after is None:
            self._way = not way  # measure the other way once
            return
        if before is not None and after != before:
            self._interval = self._probe_first  # the state moved: look again soon
            self._since_probe = 0
        elif before is not None and way != before:
            self._interval = min(2 * self._interval, self._probe_most)  # still the dearer
        self._since_probe += way == after
        if self._since_probe >= self._interval:
            self._since_probe = 0
            self._way = not after
        else:
            self._way = after
