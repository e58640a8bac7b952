"""The sender's side of a planned failover (``replicator failover --planned`` on the target).

The receiver asks with ``Handover("request")`` in the sender's session. The sender stops
capturing (NBD: the export closes, writes in flight finish and are journaled, new ones
are refused because nothing serves them any more; scan: one last cycle, whose EPOCH is
the point), journals a barrier, ships everything and waits until the receiver has
applied it, then says ``Handover("final", lsn)``. The receiver promotes its replicas at
exactly that point and answers ``Handover("promoted", generation)``; the sender records
``handed-over`` in ``failback.state`` (so ``send`` refuses to start again until a
failback) and ends with ``HandedOver`` (exit 12). docs/PROTOCOL.md has the message flow.

Every wait is bounded (``HANDOVER_TIMEOUT``). A sender that never hears "promoted" ends
with an error saying to look at the target before doing anything else: its capture has
stopped either way, and the receiver promotes only at the final point or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import NoReturn

import structlog

from replicator.engine.errors import ConnectError, PeerProtocolError, StorageError
from replicator.engine.failback_state import MARKER_FILE, HandedOver, save_marker
from replicator.engine.link import Link

log = structlog.get_logger()

HANDOVER_TIMEOUT = 300.0  # shipping and applying the backlog may take a while


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


async def hand_over(link: Link, final_lsn: int, state_dir: Path, job: str) -> NoReturn:
    """Capture has stopped and ``final_lsn`` (a barrier) is the last record journaled:
    ship it, wait until it is applied, say so, and wait for the promotion."""
    try:
        await link.wait_applied(final_lsn, HANDOVER_TIMEOUT)
        await link.send_handover("final", final_lsn)
        step = await link.handover(HANDOVER_TIMEOUT)
    except (TimeoutError, ConnectError) as exc:
        why = f"within {HANDOVER_TIMEOUT:g} s" if isinstance(exc, TimeoutError) else f"({exc})"
        raise ConnectError(
            f"job {job!r}: planned failover not confirmed by the receiver {why}; capture "
            f"has stopped here at lsn {final_lsn}",
            hint="look at the target (`replicator status --dir DIR`): if the job is promoted "
            "there, run `replicator failback` here to take it back later; if not, start "
            "`replicator send` again",
        ) from exc
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
    await link.goodbye("handed over")
    log.warning("sender.handed_over", job=job, lsn=final_lsn, generation=step.generation)
    raise HandedOver(
        f"job {job!r} handed over: the target promoted its replicas at lsn {final_lsn} "
        f"(generation {step.generation}), every write acknowledged here is in them; this "
        "source's capture has stopped",
        hint="start the VM on the target; to move it back later, stop it there and run "
        "`replicator failback` here",
    )
