"""The sender's side of a planned failover (``replicator failover --planned`` on the target).

The receiver asks with ``Handover("request")`` in the sender's session. The sender stops
capturing (NBD: the export closes, writes in flight finish and are journaled, new ones
are refused because nothing serves them any more; scan: one last cycle, whose EPOCH is
the point), journals a barrier, ships everything and waits until the receiver has
applied it, then says ``Handover("final", lsn)``. The receiver promotes its replicas at
exactly that point and answers ``Handover("promoted", generation)``; the sender records
``handed-over`` in ``failback.state`` (so ``send`` refuses to start again until a
failback) and ends with ``HandedOver`` (exit 12). docs/PROTOCOL.md has the message flow.

Every wait is bounded (``HANDOVER_TIMEOUT``). A link lost (or silent) before "promoted"
arrived does not end it: the target promotes at the final point once it has it, so the
sender asks the target again (``TargetLine``): a session that reads nothing (a failback
session's Welcome says whether the job is promoted, and up to which LSN its replica is
applied), then, when it is not promoted, a writing session, in which a receiver still
carrying out the failover asks again for the final point (docs/PROTOCOL.md). So the
source ends knowing which case it is: promoted at its final point (handed over, exit
12), promoted at an earlier point (a forced failover meanwhile: exit 11), not promoted
and nobody asking (exit 4: ``send`` may start again), or, when the target cannot be
reached again within ``ASK_WINDOW`` after the final point was sent, not known: exit 11
(a service manager does not restart ``send``), saying how to find out on the target and
not to start the VM on both sides meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import structlog

from replicator.engine.errors import (
    ConnectError,
    PeerProtocolError,
    ReplicatorError,
    SplitBrainError,
    StorageError,
)
from replicator.engine.failback_state import MARKER_FILE, HandedOver, save_marker
from replicator.engine.link import Link
from replicator.transport import Handover, Welcome

log = structlog.get_logger()

HANDOVER_TIMEOUT = 300.0  # shipping and applying the backlog may take a while
# a link lost during the handover: how long the target is tried again (at least) before
# the sender says it cannot know whether the target promoted
ASK_WINDOW = 60.0
ASK_RETRY = 1.0  # between attempts to reach it
# a writing session opened again: a receiver still carrying out the failover asks for the
# final point at once (it looks for the job's next session every 0.1 s); this long without
# a request means no failover is waiting for this source any more
ASK_AGAIN = 15.0


async def wait_for_request(link: Link, stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``, until ``stop``, or until the receiver asks for a handover (True).
    Raises the link's failure, if it has one."""
    getter = asyncio.ensure_future(link.handover_steps.get())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({getter, stopper}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (getter, stopper):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    step = getter.result() if getter.done() and not getter.cancelled() else None
    link.raise_if_failed()
    if step is None:
        return False
    if step.step != "request":
        raise PeerProtocolError(f"the receiver sent Handover step {step.step!r} out of turn")
    log.warning("sender.handover_requested", lsn=link.applied_lsn)
    return True


@dataclass(frozen=True, slots=True)
class TargetLine:
    """How a sender whose handover link failed reaches the target again: ``ask`` opens a
    session that writes nothing (a failback session) and returns its Welcome (the
    capability ``promoted`` while the job is promoted); ``join`` a writing session whose
    shipper sends what the receiver lacks (a SplitBrainError when the job is promoted);
    ``close`` ends a link ``join`` gave."""

    ask: Callable[[], Awaitable[Welcome]]
    join: Callable[[], Awaitable[Link]]
    close: Callable[[Link], Awaitable[None]]


async def hand_over(
    link: Link, final_lsn: int, state_dir: Path, job: str, target: TargetLine
) -> NoReturn:
    """Capture has stopped and ``final_lsn`` (a barrier) is the last record journaled:
    ship it, wait until it is applied, say so, and wait for the promotion; when the link
    fails on the way, find out from the target what happened (module docstring)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANDOVER_TIMEOUT
    asked = True  # the receiver asked for the final point on ``link``
    final_sent = False  # on any link: from then on the target may have promoted
    lost: BaseException | None = None
    rejoin_failed = ""  # why the last writing session could not be opened again
    current: Link | None = link
    joined: Link | None = None  # a link this function opened (and closes)
    try:
        while True:
            if current is not None:
                try:
                    if not asked:
                        asked = await _asked_again(current, ASK_AGAIN)
                    if asked:
                        await current.wait_applied(final_lsn, max(0.1, deadline - loop.time()))
                        final_sent = True
                        await current.send_handover("final", final_lsn)
                        step = await current.handover(max(0.1, deadline - loop.time()))
                        await _handed_over(
                            current, step, final_lsn, state_dir, job, by_asking=False
                        )
                    lost = None  # a session that was not asked again: see below
                except (TimeoutError, ConnectError) as exc:
                    lost = exc
                    log.warning(
                        "sender.handover_link_lost",
                        job=job,
                        lsn=final_lsn,
                        final_sent=final_sent,
                        error=str(exc) or "no answer in time",
                        action="asking the target whether it promoted",
                    )
                if current is joined:
                    await target.close(current)
                    joined = None
                else:
                    await current.aclose()
                current = None
            welcome, why = await _ask(target, loop.time() + ASK_WINDOW)
            if welcome is None:
                raise _unknown(job, final_lsn, final_sent, lost, why)
            if "promoted" in welcome.capabilities:
                await _promoted_meanwhile(welcome, final_lsn, state_dir, job)
            if lost is None:  # rejoined, not asked again, and still not promoted
                raise _not_promoted(job, final_lsn, welcome)
            if loop.time() > deadline + ASK_WINDOW:  # answers, but takes no session
                raise _not_promoted(job, final_lsn, welcome, rejoin_failed)
            try:
                current = joined = await target.join()
            except SplitBrainError:  # promoted since the question: ask again
                continue
            except (ReplicatorError, OSError, TimeoutError) as exc:
                rejoin_failed = str(exc) or "no answer in time"
                log.warning("sender.handover_rejoin_failed", job=job, error=rejoin_failed)
                await asyncio.sleep(ASK_RETRY)
                continue
            log.warning("sender.handover_rejoined", job=job, lsn=final_lsn)
            asked = False
    finally:
        if joined is not None:
            await target.close(joined)


async def _asked_again(link: Link, seconds: float) -> bool:
    """Whether the receiver asks for the final point again on ``link`` within ``seconds``
    (ConnectError: the link failed first)."""
    try:
        step = await link.handover(seconds)
    except TimeoutError:
        return False
    if step.step != "request":
        raise PeerProtocolError(f"the receiver sent Handover step {step.step!r} out of turn")
    log.warning("sender.handover_requested_again", lsn=link.applied_lsn)
    return True


async def _ask(target: TargetLine, until: float) -> tuple[Welcome | None, str]:
    """The target's Welcome to a session that writes nothing, tried until the loop's time
    ``until``; (None, why) when it could not be had."""
    loop = asyncio.get_running_loop()
    why = ""
    while True:
        try:
            async with asyncio.timeout(max(1.0, until - loop.time())):
                return await target.ask(), ""
        except (ReplicatorError, OSError, TimeoutError) as exc:
            why = str(exc) or "no answer in time"
            log.warning("sender.handover_ask_failed", error=why)
        if loop.time() + ASK_RETRY >= until:
            return None, why
        await asyncio.sleep(ASK_RETRY)


async def _promoted_meanwhile(welcome: Welcome, final_lsn: int, state_dir: Path, job: str) -> None:
    """The target is promoted (its Welcome said so): at the final point, the handover is
    done and raises HandedOver; at an earlier point (a forced failover meanwhile), this
    source's last writes are not there: SplitBrainError."""
    if welcome.applied_lsn >= final_lsn:
        step = Handover("promoted", 0, welcome.generation)
        await _handed_over(None, step, final_lsn, state_dir, job, by_asking=True)
    raise SplitBrainError(
        f"job {job!r}: the target was promoted (generation {welcome.generation}) while this "
        f"source handed it over, but at lsn {welcome.applied_lsn}, before this source's "
        f"final point (lsn {final_lsn}): the writes journaled here after lsn "
        f"{welcome.applied_lsn} are not in its replicas (a `replicator failover --force` "
        "there?); this source's capture has stopped",
        hint="do not start the VM here: it may run on the target now. To keep the target's "
        "data, take the job back later with `replicator failback` here; to keep this "
        "side's writes instead, stop the VM there, run `replicator demote --dir DIR --job "
        "JOB --discard-changes` on the target, then `replicator send --resync` here",
    )


def _not_promoted(
    job: str, final_lsn: int, welcome: Welcome, rejoin_failed: str = ""
) -> ConnectError:
    why = (
        f"no session could be opened there again to be asked for the final point ({rejoin_failed})"
        if rejoin_failed
        else "no failover there asks for this source's final point any more (it gave up, "
        "or was interrupted)"
    )
    return ConnectError(
        f"job {job!r}: planned failover not done: the link to the target was lost, and "
        f"asked again ({time.strftime('%H:%M:%S')}) the target is NOT promoted (its replica "
        f"is applied up to lsn {welcome.applied_lsn}) and {why}; this source's capture has "
        f"stopped at lsn {final_lsn}",
        hint="start `replicator send` here again to resume replication (the VM may run "
        "here); to move the job, run `replicator failover --planned` on the target again "
        "while it runs",
    )


def _unknown(
    job: str, final_lsn: int, final_sent: bool, lost: BaseException | None, why: str
) -> ReplicatorError:
    """The target could not be asked again: the answer depends on whether the final
    point was ever sent (the target promotes only once it has it)."""
    cause = f" ({lost})" if lost is not None and str(lost) else ""
    if not final_sent:
        return ConnectError(
            f"job {job!r}: planned failover not done: the link to the target was lost{cause} "
            f"before this source sent its final point (lsn {final_lsn}), so the target did "
            f"not promote for it, and it could not be reached again ({why}); this source's "
            "capture has stopped",
            hint="start `replicator send` here again once the target is reachable (the VM "
            "may run here; the target promotes only with `failover --force`, which you "
            "would run there yourself)",
        )
    return SplitBrainError(
        f"job {job!r}: planned failover not confirmed: the link to the target was "
        f"lost{cause} after this source sent its final point (lsn {final_lsn}), and the "
        f"target could not be asked again within {ASK_WINDOW:g} s ({why}): it may or may "
        "not have promoted its replicas; this source's capture has stopped",
        hint="find out on the target with `replicator status --dir DIR` (the job's "
        "`promoted`): promoted, the VM is to run there (take it back later with "
        "`replicator failback` here); not promoted, start `replicator send` here again. "
        "Until you know, do not start the VM here or there",
    )


async def _handed_over(
    link: Link | None, step: Handover, final_lsn: int, state_dir: Path, job: str, *, by_asking: bool
) -> NoReturn:
    """The target said "promoted" (on ``link``), or said it is promoted when asked
    again after the link was lost: record the handover and raise HandedOver."""
    if step.step != "promoted":
        raise PeerProtocolError(f"the receiver answered the final point with {step.step!r}")
    try:
        await asyncio.to_thread(
            save_marker, state_dir, "handed-over", generation=step.generation, lsn=final_lsn
        )
    except OSError as exc:  # promoted all the same: the target refuses this source from now on
        raise StorageError(
            f"job {job!r}: the target promoted its replicas at lsn {final_lsn} (generation "
            f"{step.generation}), but this source could not record the handover in "
            f"{state_dir / MARKER_FILE} ({exc}); its capture has stopped",
            hint="do not start the VM here: it runs on the target now, and `send` is refused "
            "there (split brain); fix the disk, then take the job back with `replicator "
            "failback` when you want it here",
        ) from exc
    if link is not None:
        await link.goodbye("handed over")
    log.warning(
        "sender.handed_over",
        job=job,
        lsn=final_lsn,
        generation=step.generation,
        by_asking=by_asking,
    )
    raise HandedOver(
        f"job {job!r} handed over: the target promoted its replicas at lsn {final_lsn} "
        f"(generation {step.generation}), every write acknowledged here is in them"
        + (" (confirmed by asking it again after the link was lost)" if by_asking else "")
        + "; this source's capture has stopped",
        hint="start the VM on the target; to move it back later, stop it there and run "
        "`replicator failback` here",
    )
