"""Source self-fencing (docs/WITNESS.md, "Fencing"): a source that cannot renew its lease
at the witness for ``fence_after`` seconds may be cut off from both the witness and the
target, and the target may be promoted soon; so it stops acknowledging writes before
that can happen, the way DRBD suspends I/O when it loses quorum.

The witness grants a promotion only after the source's lease is older than
``fence_after`` plus a margin (``witness_state.fence_wait``; etcd: the lease's TTL), and
the clock here runs from the *send* time of the last successful renewal, which is never
later than when the witness saw it. So whenever the target is granted, this source was
fenced first.

Fenced means: ``sender.fenced`` is logged (error), the sender's status shows it,
``--fence-exec`` runs (once per fencing, no shell: e.g. ``virsh suspend VM``) and the NBD
exports hold new writes (``WriteGate``) until a renewal succeeds again (``sender.unfenced``)
or the witness says the target was promoted (then they fail with EIO).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from replicator.engine.errors import ConfigError
from replicator.engine.nbd.gate import fence_clock
from replicator.engine.user_command import split_command

if TYPE_CHECKING:
    from replicator.engine.nbd.gate import WriteGate

log = structlog.get_logger()


class SourceFence:
    """The sender's fencing clock; ``renewed(sent)`` after each successful renewal, ``watch``
    runs beside the renewals (``keep_lease``)."""

    def __init__(
        self,
        job: str,
        fence_after: float,
        *,
        exec_cmd: str | None = None,
        gate: WriteGate | None = None,
    ) -> None:
        self.job, self.fence_after, self.exec_cmd = job, fence_after, exec_cmd
        self.gate = gate
        # the fence's timer (its log, status and --fence-exec) runs from the start until
        # the first renewal, so a witness that cannot be reached then is said as later on
        self.last_ok = fence_clock()
        self.fenced = False
        self.fenced_at = 0.0  # wall clock, for status
        self.renewals = 0  # successful, since start (none: not known to be primary yet)
        self._moved = asyncio.Event()
        if gate is not None:
            # but no write is acknowledged before a renewal said this source is the
            # primary: the witness may have granted the target before this start (its
            # source gone long enough), and the target may not be promoted yet when this
            # source's first sync ends
            gate.deadline = -math.inf

    def bound(self, limit: float | None) -> None:
        """Fence no later than ``limit`` after a renewal's send (the witness's own bound)."""
        if limit is not None and limit < self.fence_after:
            self.fence_after = limit
            if self.gate is not None and self.renewals:
                self.gate.deadline = self.last_ok + limit

    def renewed(self, sent: float) -> None:
        """A renewal sent at ``sent`` (``fence_clock``) succeeded."""
        self.renewals += 1
        self.last_ok = max(self.last_ok, sent)
        fresh = fence_clock() - self.last_ok < self.fence_after
        if self.gate is not None:
            self.gate.deadline = self.last_ok + self.fence_after
            if fresh and not self.fenced:
                self.gate.release()  # held by its own deadline just before this renewal
        if self.fenced and fresh:
            self.fenced = False
            if self.gate is not None:
                self.gate.release()
            log.warning("sender.unfenced", job=self.job, action="writes go on")
        self._moved.set()

    def demoted(self) -> None:
        """The witness says the target was promoted: writes held or to come fail."""
        if self.gate is not None:
            self.gate.fail()

    def status(self) -> dict[str, Any]:
        return {
            "fenced": self.fenced,
            "fence_after": self.fence_after,
            "since_renewal_seconds": round(fence_clock() - self.last_ok, 1),
            "fenced_at": self.fenced_at if self.fenced else None,
        }

    async def watch(self) -> NoReturn:
        while True:
            left = self.last_ok + self.fence_after - fence_clock()
            self._moved.clear()
            if left > 0 or self.fenced:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left if left > 0 else None):
                        await self._moved.wait()
                continue
            await self._fence()

    async def _fence(self) -> None:
        self.fenced = True
        self.fenced_at = time.time()
        if self.gate is not None:
            self.gate.hold()
        log.error(
            "sender.fenced",
            job=self.job,
            since_renewal=round(fence_clock() - self.last_ok, 1),
            fence_after=self.fence_after,
            action="no lease renewal at the witness: the target may be promoted soon; writes "
            "are held (--capture nbd) and --fence-exec runs. When the witness answers again, "
            "this source goes on; if the target was promoted, do not resume the VM here: "
            "`replicator failback` (docs/WITNESS.md, 'Fencing')",
        )
        if self.exec_cmd:
            pid = await run_fence_exec(self.exec_cmd, self.job)
            if pid is not None:
                log.warning("sender.fence_exec", job=self.job, pid=pid)


def check_fence_exec(command: str) -> list[str]:
    """``--fence-exec`` split like a shell would; ConfigError (at start) when it cannot be."""
    return split_command("--fence-exec", command, "stops the VM, e.g. 'virsh suspend vm1'")


async def run_fence_exec(command: str, job: str) -> int | None:
    """Start ``command`` (no shell; ``REPLICATOR_JOB`` set) and return its pid; it runs on
    on its own. One that cannot be started is logged (the writes are held regardless)."""
    env = {**os.environ, "REPLICATOR_JOB": job}
    try:
        proc = await asyncio.create_subprocess_exec(
            *check_fence_exec(command), env=env, start_new_session=True
        )
    except (OSError, ConfigError) as exc:
        log.error(
            "sender.fence_exec_failed",
            job=job,
            command=command,
            error=str(exc),
            action="stop the VM by hand",
        )
        return None
    reaper = asyncio.get_running_loop().create_task(proc.wait())  # reaped, not awaited here
    _REAPERS.add(reaper)
    reaper.add_done_callback(_REAPERS.discard)
    return proc.pid


_REAPERS: set[asyncio.Task[int]] = set()
