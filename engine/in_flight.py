"""What all of a receiver's sessions hold in memory before it is durable: one budget.

Each session's credit window bounds what that session holds (frames read and not yet
written, records written and not yet synced: engine/window.py), but nothing bounded the
sessions together, so many senders at once (many jobs, or one host's many jobs into one
receiver) could hold N windows and grow the receiver until the OOM killer ended it, and
every job's replication with it. ``InFlight`` is that receiver-wide bound:

* A session asks for a Records frame's payload bytes once the frame is read and before
  it is written (``ask``), and gives them back once they are durable (``give_back``)
  or its session ends. A verify session asks for the records it holds past the last
  barrier the same way. Bytes the job's applier then keeps are counted by ``KeptMemory``
  (engine/durable_tail.py), not here.
* A session that is refused waits: it reads no more from its socket meanwhile, so TCP's
  flow control slows its sender (the sender waits as it does for credit). Nothing fails.
* **Fair**: requests are served in the order they were made. A session that waits is
  served before any later request, so the sessions whose bytes keep becoming durable
  cannot take all that is given back while another waits; each session reads one frame
  at a time, so it has at most one request queued. A request that waits makes the
  sessions holding bytes sync at once (``InFlightBudget.holders``).
* **Progress**: a request larger than what is left waits at the head of the queue until
  enough is given back; one larger than the whole limit is served when nothing else is
  held. What is held is given back as it is synced, which no request waits for, so the
  queue always moves.

So the bytes held never exceed ``limit`` (or the one request larger than it, alone).
Sans-IO: ``ask`` and ``give_back`` say which queued requests were served; the session's
driver (engine/receiver_session.py) wakes them.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Final, Generic, TypeVar

IN_FLIGHT_MAX: Final = 256 * 1024 * 1024  # all sessions together, by default
MIN_IN_FLIGHT: Final = 4 * 1024 * 1024  # the least --in-flight-max: two frames

K = TypeVar("K")


class InFlight(Generic[K]):
    """The budget's accounting (see the module docstring); ``K`` names a request."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be positive")
        self.limit = limit
        self.used = 0  # bytes given out and not back yet
        self.peak = 0
        self._queue: collections.OrderedDict[K, int] = collections.OrderedDict()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def queued(self, key: K) -> bool:
        return key in self._queue

    def _fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.limit or self.used == 0

    def _take(self, nbytes: int) -> None:
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def ask(self, key: K, nbytes: int) -> bool:
        """True: ``nbytes`` are the caller's now. False: the request is queued under
        ``key`` (unique among queued ones) until ``give_back`` or ``withdraw`` serves it."""
        if nbytes < 0:
            raise ValueError("nbytes must not be negative")
        if key in self._queue:
            raise ValueError("this request is already queued")
        if not self._queue and self._fits(nbytes):
            self._take(nbytes)
            return True
        self._queue[key] = nbytes
        return False

    def give_back(self, nbytes: int) -> list[K]:
        """``nbytes`` given out before are free again; the queued requests this served."""
        if not 0 <= nbytes <= self.used:
            raise ValueError(f"giving back {nbytes} bytes of the {self.used} given out")
        self.used -= nbytes
        return self._serve()

    def withdraw(self, key: K) -> list[K]:
        """The request queued under ``key`` is no longer wanted (its session ended); the
        requests behind it this served."""
        self._queue.pop(key, None)
        return self._serve()

    def _serve(self) -> list[K]:
        served: list[K] = []
        while self._queue:
            key, nbytes = next(iter(self._queue.items()))
            if not self._fits(nbytes):
                break
            del self._queue[key]
            self._take(nbytes)
            served.append(key)
        return served


class InFlightBudget:
    """``InFlight`` for asyncio tasks: ``take`` waits until its bytes are given. A request
    that has to wait calls every ``holders`` callback: the sessions holding bytes sync
    now rather than wait to gather more (a first sync's direct writes linger for more
    before their commit), since only their syncs give bytes back."""

    def __init__(self, limit: int = IN_FLIGHT_MAX) -> None:
        self.accounts: InFlight[asyncio.Future[None]] = InFlight(limit)
        self.holders: set[Callable[[], None]] = set()
        self.waits = 0  # requests that had to wait, ever

    @property
    def limit(self) -> int:
        return self.accounts.limit

    async def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` are the caller's (FIFO among callers). Cancelled while it
        waits, it takes nothing."""
        accounts = self.accounts
        waiter = asyncio.get_running_loop().create_future()
        if accounts.ask(waiter, nbytes):
            return
        self.waits += 1
        for sync_now in list(self.holders):
            sync_now()
        try:
            await waiter
        except BaseException:
            if accounts.queued(waiter):
                self._wake(accounts.withdraw(waiter))
            else:
                self.give_back(nbytes)  # served as it was cancelled: not the caller's
            raise

    def give_back(self, nbytes: int) -> None:
        if nbytes:
            self._wake(self.accounts.give_back(nbytes))

    @staticmethod
    def _wake(served: list[asyncio.Future[None]]) -> None:
        for waiter in served:
            if not waiter.done():
                waiter.set_result(None)
