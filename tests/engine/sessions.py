"""Sessions and jobs driven by hand: a ``Link`` shipping a journal to a ``Receiver`` over an
in-memory pipe, for tests that need the engine's own sender/receiver protocol without a
process or a capture around it; and a receiver's job ended as a SIGKILL would end it."""

from __future__ import annotations

import asyncio

from replicator.engine.link import Link, ShippedUnchecked
from replicator.engine.receiver import JobReplica, Receiver
from replicator.engine.volumes import VolumeSpec
from replicator.journal import Journal
from replicator.transport import connection_pair


async def ship_journal(
    receiver: Receiver,
    journal: Journal,
    spec: VolumeSpec,
    size: int,
    *,
    job: str = "job",
    unchecked: ShippedUnchecked | None = None,
    timeout: float = 20,
) -> Link:
    """Hand-shake for ``job`` (one volume of ``size`` bytes), ship the journal from what the
    receiver holds, and wait until the receiver applied all of it or the link failed; the
    session is closed on return. The link's failure, if any, is ``link.raise_if_failed()``
    (``wait_applied`` raises it too: this returns the link either way)."""
    sender_conn, receiver_conn = await connection_pair()
    serving = asyncio.create_task(receiver.handle(receiver_conn))
    link = Link(sender_conn, journal, unchecked=unchecked)
    try:
        await link.handshake(job, [spec], {spec.name: size})
        link.start_reader()
        link.start_shipper(link.received_lsn + 1)
        try:
            await link.wait_applied(journal.last_lsn, timeout=timeout)
        except Exception:
            if not link.failed:
                raise  # not the link's failure (a timeout): the test should see it
    finally:
        await link.aclose()
        await serving
    return link


async def end_as_sigkill(replica: JobReplica) -> None:
    """End the job as a SIGKILL would: no apply, no commit, nothing saved."""
    replica._closed = True
    if replica._task is not None:
        replica._task.cancel()
    replica._reset_applier()
    await replica.journal.aclose()


async def end_job(replica: JobReplica, *, killed: bool) -> None:
    """Close the job, or (``killed``) end it as a SIGKILL would."""
    if killed:
        await end_as_sigkill(replica)
    else:
        await replica.aclose()
