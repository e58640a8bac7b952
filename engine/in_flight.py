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
* **Fair**: requests are served in the order they were made (but for those past their
  session's share, below). A session that waits is served before any later request,
  so the sessions whose bytes keep becoming durable cannot take all that is given back
  while another waits; each session reads one frame at a time, so it has at most one
  request queued. A request that waits makes the sessions holding bytes sync at once
  (``InFlightBudget.holders``).
* **Progress**: a request larger than what is left waits at the head of the queue until
  enough is given back; one larger than the whole limit is served when nothing else is
  held. What is held is given back as it is synced, which no request waits for, so the
  queue always moves.
* **Isolation**: a session holds at most half the budget (or one request, whatever its
  size, when it held nothing): a job whose disk stops syncing keeps what it holds, and
  the others go on with the rest. A request past its session's share waits for that
  session's own syncs without holding up the requests behind it.

So the bytes held never exceed ``limit`` (or the one request larger than it, alone).
What a session holds outside it: the frame it read and waits to have counted (the
transport has it whole by then: up to 2 MiB, or one larger record). Sans-IO: ``ask``
and ``give_back`` say which queued requests were served; ``InFlightBudget`` (asyncio)
wakes them.
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
    """The budget's accounting (see the module docstring); ``K`` names a session, which
    has at most one request queued at a time."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be positive")
        self.limit = limit
        self.used = 0  # bytes given out and not back yet
        self.peak = 0
        self.held: dict[K, int] = {}  # of them, by session (none: nothing held)
        self._queue: collections.OrderedDict[K, int] = collections.OrderedDict()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def queued(self, key: K) -> bool:
        return key in self._queue

    def _own(self, key: K, nbytes: int) -> bool:
        """Within the session's share: half the budget (any one request when it holds
        nothing), so a session whose syncs stop cannot hold what the others need."""
        held = self.held.get(key, 0)
        return held == 0 or held + nbytes <= self.limit // 2

    def _fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.limit or self.used == 0

    def ask(self, key: K, nbytes: int) -> bool:
        """True: ``nbytes`` are session ``key``'s now. False: the request is queued until
        ``give_back`` or ``withdraw`` serves it."""
        if nbytes < 0:
            raise ValueError("nbytes must not be negative")
        if key in self._queue:
            raise ValueError("this session has a request queued already")
        self._queue[key] = nbytes
        return key in self._serve()

    def give_back(self, key: K, nbytes: int) -> list[K]:
        """``nbytes`` session ``key`` was given are free again; the requests this served."""
        held = self.held.get(key, 0)
        if not 0 <= nbytes <= held:
            raise ValueError(f"giving back {nbytes} bytes of the {held} given out")
        if nbytes == held:
            self.held.pop(key, None)
        else:
            self.held[key] = held - nbytes
        self.used -= nbytes
        return self._serve()

    def withdraw(self, key: K) -> list[K]:
        """Session ``key``'s queued request is no longer wanted (it ended); the requests
        this served."""
        self._queue.pop(key, None)
        return self._serve()

    def _serve(self) -> list[K]:
        """Serve the queue in order. A request beyond its session's share waits for that
        session's own syncs and lets the ones behind it pass; one that does not fit in
        what is left stops the queue, so that a large one is not passed for ever."""
        served: list[K] = []
        for key, nbytes in list(self._queue.items()):
            if not self._own(key, nbytes):
                continue
            if not self._fits(nbytes):
                break
            del self._queue[key]
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            if nbytes:
                self.held[key] = self.held.get(key, 0) + nbytes
            served.append(key)
        return served


class InFlightBudget:
    """``InFlight`` for asyncio tasks: ``take`` waits until its bytes are given. A request
    that has to wait calls every ``holders`` callback: the sessions holding bytes sync
    now rather than wait to gather more (a first sync's direct writes linger for more
    before their commit), since only their syncs give bytes back."""

    def __init__(self, limit: int = IN_FLIGHT_MAX) -> None:
        self.accounts: InFlight[object] = InFlight(limit)
        self.holders: set[Callable[[], None]] = set()
        self.waits = 0  # requests that had to wait, ever
        self._waiters: dict[object, asyncio.Future[None]] = {}

    @property
    def limit(self) -> int:
        return self.accounts.limit

    def status(self) -> dict[str, int]:
        """For ``status`` and the metrics: a ``waits`` that keeps rising says the budget
        holds senders back (a slow disk, or --in-flight-max too small for the jobs)."""
        accounts = self.accounts
        return {
            "limit": accounts.limit,
            "used": accounts.used,
            "peak": accounts.peak,
            "waiting": accounts.waiting,
            "waits": self.waits,
        }

    async def take(self, key: object, nbytes: int) -> None:
        """Wait until ``nbytes`` are session ``key``'s (see ``InFlight``). Cancelled while
        it waits, it takes nothing."""
        accounts = self.accounts
        if accounts.ask(key, nbytes):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[key] = waiter
        self.waits += 1
        for sync_now in list(self.holders):
            sync_now()
        try:
            await waiter
        except BaseException:
            if accounts.queued(key):
                self._wake(accounts.withdraw(key))
            else:
                self.give_back(key, nbytes)  # served as it was cancelled: not the caller's
            raise
        finally:
            self._waiters.pop(key, None)

    def give_back(self, key: object, nbytes: int) -> None:
        if nbytes:
            self._wake(self.accounts.give_back(key, nbytes))

    def _wake(self, served: list[object]) -> None:
        for key in served:
            waiter = self._waiters.get(key)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
