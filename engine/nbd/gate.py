"""A gate in front of the NBD exports' writes (``NbdServer(gate=...)``): source
self-fencing (``engine/witness_fence.py``) holds new writes while the source may have lost
its lease, unacknowledged, the way DRBD suspends I/O without quorum."""

from __future__ import annotations

import asyncio
import math
import time

_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


def fence_clock() -> float:
    """Seconds on the clock source fencing counts on (``engine/witness_fence.py``): Linux's
    CLOCK_BOOTTIME, which, unlike CLOCK_MONOTONIC (``time.monotonic``), goes on while the
    machine is suspended. A source host suspended past ``fence_after`` (the witness may
    have promoted the target meanwhile) must find its deadline passed when it resumes,
    not acknowledge its VM's writes until its next renewal hears "promoted". Elsewhere:
    the monotonic clock."""
    if _BOOTTIME is None:
        return time.monotonic()
    return time.clock_gettime(_BOOTTIME)


class WriteGate:
    """Where NBD writes wait while the source is fenced (``NbdServer.gate``): open, held,
    or failed for good (the target was promoted: every write gets EIO)."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self.failed = False
        # time (``fence_clock``) after which a write holds even before the fence's timer has run
        # (a process or host that was frozen: its writes must not slip through first)
        self.deadline = math.inf

    @property
    def held(self) -> bool:
        return not self._open.is_set()

    @property
    def closed(self) -> bool:
        """Held or failed: a write must ask ``passable`` (the hot path checks only this)."""
        return self.failed or not self._open.is_set() or fence_clock() > self.deadline

    def hold(self) -> None:
        if not self.failed:
            self._open.clear()

    def release(self) -> None:
        self._open.set()

    def fail(self) -> None:
        """The target was promoted: held and later writes fail (they must never land)."""
        self.failed = True
        self._open.set()

    async def passable(self) -> bool:
        """Wait while held; False when writes must fail."""
        if self._open.is_set() and fence_clock() > self.deadline:
            self.hold()  # the fence's timer runs next: held until a renewal releases it
        if self._open.is_set():
            return not self.failed
        await self._open.wait()
        return not self.failed
