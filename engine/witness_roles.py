"""The two sides' part in automatic failover (docs/WITNESS.md).

* ``keep_lease`` (the sender): renew "primary for job J at generation G" every few
  seconds. When the witness says the target was promoted, raise SplitBrainError: the
  command stops (exit 11) and writes nothing more. A witness that cannot be reached is
  logged and replication goes on; with a ``SourceFence``, after ``fence_after`` seconds
  without a successful renewal the source fences itself (``engine/witness_fence.py``).
* ``AutoFailover`` (the receiver, ``--auto-failover-after``): a job with no session for
  that long is offered to the witness; only its grant promotes (``Receiver.failover``,
  the path ``replicator failover --force`` takes), then ``--auto-failover-exec`` runs as
  ``failover --exec`` runs its command (``finish_failover``). A witness that cannot be reached
  promotes nobody: the job keeps waiting, and its status and log say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from typing import NoReturn

import structlog

from replicator.engine.errors import ReplicatorError, SplitBrainError
from replicator.engine.failover import finish_failover
from replicator.engine.job_replica import JobReplica
from replicator.engine.nbd.gate import fence_clock
from replicator.engine.receiver import Receiver
from replicator.engine.status import AUTO_FAILOVER_WAITS
from replicator.engine.witness_client import Witness
from replicator.engine.witness_fence import SourceFence

log = structlog.get_logger()

RETRY = 1.0  # seconds between questions to the witness while a job waits


async def keep_lease(
    witness: Witness,
    job: str,
    generation: Callable[[], int],
    interval: float,
    fence: SourceFence | None = None,
    replica: Callable[[], str] = lambda: "",
    unbound: Callable[[], bool | None] = lambda: None,
    wake: asyncio.Event | None = None,
) -> NoReturn:
    """Renew the source's lease until the witness says the target took over (raises);
    with ``fence``, the source fences itself when renewals stop succeeding. ``replica``:
    the identity of the replica it replicates to ("" while unknown), declared with each
    renewal: the witness promotes no other copy of the job. ``unbound``: True while the
    source has reached no replica at all (the witness then promotes none). ``wake``: set
    when a session begins: renew then, so a replica just reached is declared at once
    (a source that dies before it is declared has no copy promoted)."""
    said = (replica, unbound, wake)
    if fence is None:
        await _renew_lease(witness, job, generation, interval, None, *said)
    fence.bound(witness.fence_bound)
    watching = asyncio.ensure_future(fence.watch())
    try:
        await _renew_lease(witness, job, generation, interval, fence, *said)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching


async def _renew_lease(
    witness: Witness,
    job: str,
    generation: Callable[[], int],
    interval: float,
    fence: SourceFence | None,
    replica: Callable[[], str],
    unbound: Callable[[], bool | None],
    wake: asyncio.Event | None,
) -> NoReturn:
    unreachable = False
    fence_after = None if fence is None else fence.fence_after
    while True:
        gen = generation()
        sent = fence_clock()  # the fence's clock: it goes on while the host is suspended
        try:
            renewal = await witness.renew(job, gen, fence_after, replica() or None, unbound())
        except ReplicatorError as exc:
            if not unreachable:
                log.warning(
                    "sender.witness_unreachable",
                    witness=witness.where,
                    error=str(exc),
                    action="replication goes on; the target cannot promote meanwhile",
                )
            unreachable = True
        else:
            if not renewal.ok:
                if fence is not None:
                    fence.demoted()
                log.error(
                    "sender.demoted_by_witness",
                    job=job,
                    generation=gen,
                    promoted_to=renewal.promoted_to,
                    by=renewal.grantee,
                )
                raise SplitBrainError(
                    f"the witness at {witness.where} says job {job!r} was promoted on the "
                    f"target (generation {renewal.promoted_to}"
                    f"{', by ' + repr(renewal.grantee) if renewal.grantee else ''}); this "
                    f"source was at generation {gen} and stopped: it writes nothing more",
                    hint="do not start the VM here; bring this side up to date with "
                    "`replicator failback`; or, to throw the target's changes away, "
                    "`replicator demote --discard-changes` there, then one `send --once "
                    "--resync` here without --witness (the witness still holds its grant), "
                    "then send with --witness again (docs/OPERATIONS.md, 'Automatic "
                    "failover')",
                )
            if fence is not None:
                fence.renewed(sent)
            if unreachable:
                log.warning("sender.witness_back", witness=witness.where)
            unreachable = False
        await _pause(max(0.0, sent + interval - fence_clock()), wake)


async def _pause(seconds: float, wake: asyncio.Event | None) -> None:
    """Sleep ``seconds``, or until ``wake`` is set (then cleared)."""
    if wake is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await wake.wait()
    wake.clear()


class AutoFailover:
    """Promote jobs whose source went quiet, when the witness agrees."""

    def __init__(
        self,
        receiver: Receiver,
        witness: Witness,
        after: float,
        *,
        exec_cmd: str | None = None,
        poll: float = 0.25,
    ) -> None:
        self.receiver, self.witness, self.after, self.poll = receiver, witness, after, poll
        self.exec_cmd = exec_cmd  # run after each promotion, as `failover --exec` runs it
        self._seen: dict[str, float] = {}  # job: when a session last held it (monotonic)
        self._next: dict[str, float] = {}  # job: when to ask the witness again
        self._said: dict[str, str] = {}  # job: the last reason logged (log once per change)

    def jobs(self) -> list[str]:
        root = self.receiver.config.state_root
        try:
            entries = sorted(root.iterdir())
        except FileNotFoundError:
            return []
        return [
            p.name
            for p in entries
            if p.is_dir() and ((p / "applied.state").exists() or (p / "journal").is_dir())
        ]

    async def run(self) -> NoReturn:
        started = time.monotonic()
        while True:
            await asyncio.sleep(self.poll)
            for job in self.jobs():
                try:
                    await self.check(job, started)
                except (OSError, ReplicatorError) as exc:  # one job's trouble: the others go on
                    log.error("receiver.auto_failover_error", job=job, error=str(exc))

    async def check(self, job: str, started: float) -> None:
        now = time.monotonic()
        if self.receiver.has_session(job):
            self._seen[job] = now
            self._said.pop(job, None)
            return
        last = max(self._seen.get(job, started), self.receiver.demoted.get(job, started))
        if now - last <= self.after or self._next.get(job, 0) > now:
            return
        self._next[job] = now + RETRY
        replica = await self.receiver.job(job)
        if replica.promotion is not None:
            return
        # a replica that cannot be promoted asks for nothing: the grant would stand, the
        # promotion fail, and the source, back, be told it was promoted away (no primary)
        why = await replica.not_promotable()
        if why:
            self._wait(
                job,
                replica,
                "failover",
                f"not promotable: {why}",
                f"{AUTO_FAILOVER_WAITS}: the replica is not at a consistency point ({why}); "
                "the witness is not asked (docs/WITNESS.md)",
            )
            return
        generation = replica.state.generation
        try:
            decision = await self.witness.may_promote(
                job, generation, self.after, replica.replica_id or None
            )
        except ReplicatorError as exc:
            self._wait(
                job,
                replica,
                "witness",
                f"witness unreachable: {exc}",
                f"{AUTO_FAILOVER_WAITS}: the witness cannot be reached ({exc})",
            )
            return
        if not decision.granted:
            self._wait(
                job,
                replica,
                "witness_refused",
                decision.reason,
                f"{AUTO_FAILOVER_WAITS}: the witness refuses: {decision.reason}",
                event="receiver.auto_failover_refused",
            )
            return
        t0 = time.monotonic()
        log.warning(
            "receiver.auto_failover", job=job, generation=generation, witness=self.witness.where
        )
        try:
            promotion, already = await self.receiver.failover(job)
            # promoted: a failing --auto-failover-exec is logged, never retried (the job is
            # promoted now, so it is not offered again; start the VM by hand)
            result = await finish_failover(
                self.receiver.config,
                job,
                promotion,
                exec_cmd=self.exec_cmd,
                started=t0,
                already=already,
            )
            if result.exec_pid is not None:
                log.warning("receiver.auto_failover_exec", job=job, pid=result.exec_pid)
        except ReplicatorError as exc:  # granted: asking again gets the same grant
            log.error("receiver.auto_failover_failed", job=job, error=str(exc))
            replica.status.error("failover", f"automatic failover failed: {exc}")

    def _wait(
        self,
        job: str,
        replica: JobReplica,
        kind: str,
        why: str,
        message: str,
        event: str = "receiver.auto_failover_waiting",
    ) -> None:
        """The job waits: log (once per reason) and status say why, unless its source came
        back meanwhile (a session began while the witness was asked, up to its timeout:
        the session's start cleared the wait, which would be a stale alarm set now)."""
        if self.receiver.has_session(job):
            return
        self._say(job, event, why)
        replica.status.error(kind, message)

    def _say(self, job: str, event: str, why: str) -> None:
        # once per change of reason: its figures ("renewed its lease 0.3s ago") change at
        # every question, once a second, for as long as the source renews
        gist = _FIGURES.sub("N", why)
        if self._said.get(job) != gist:
            self._said[job] = gist
            log.warning(event, job=job, witness=self.witness.where, why=why)


_FIGURES = re.compile(r"\d+(?:\.\d+)?")
