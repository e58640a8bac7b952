"""The receiver's side of ``replicator failback``: serve a promoted replica's manifests and
extents to the old source, then take the replica back into replication.

A failback session (Hello capability ``failback``, authorised like a writing session)
writes nothing until its last step: it answers ManifestRequest with the replica as the
target's VM left it (nothing applied, nothing taken over: the job is promoted, so
replication touches nothing) and ReadRequest with its bytes. ``Handover("handback", H)``
makes the job a replica again at LSN ``H`` (``JobReplica.handback``), answered by
``Handover("demoted", H, generation)``.

Two checks come before the hand-back, each answered with an Error (exit 6 on the source)
that leaves the job promoted: no replica file changed during the session (inode and ctime
of every file replication stamped, and of every one the source asked for, taken when the
session began or first asked for: an extent equal on both sides is never read, so a VM
still writing there would go unseen), and no replica file that changed while the job was
promoted was left out of the failback (the next `send` would replace it with the source's
older copy, losing what the promoted VM wrote there).

The Welcome lists the capability ``promoted`` when the job is. A job that is not
promoted is welcomed too, so that a failback cut short after the
receiver's hand-back can see it happened (the Welcome's ``applied_lsn`` and
``generation``); anything but Goodbye is then answered with ``Error("config")``.
See docs/PROTOCOL.md, "Failover and failback".
"""

from __future__ import annotations

import asyncio

import structlog

from replicator.engine.job_replica import JobReplica, ReceiverConfig
from replicator.engine.names import path_problem
from replicator.engine.receiver_session import IDLE_TIMEOUT, send_manifest
from replicator.transport import (
    PROTOCOL_VERSION,
    Error,
    FramedConnection,
    Goodbye,
    Handover,
    ManifestRequest,
    Ping,
    Pong,
    ReadData,
    ReadRequest,
    RemoteProtocolError,
    Welcome,
)

log = structlog.get_logger()


class FailbackSession:
    def __init__(self, conn: FramedConnection, replica: JobReplica, config: ReceiverConfig) -> None:
        self.conn = conn
        self.replica = replica
        self.config = config
        self.bytes_served = 0
        # (inode, ctime) of replica files when the session began, or when first asked for
        self._at_start: dict[str, tuple[int, int] | None] = {}
        self._asked: set[str] = set()  # replica files the source asked for

    async def _note_asked(self, volume: str) -> None:
        self._asked.add(volume)
        if volume not in self._at_start:
            self._at_start.update(await asyncio.to_thread(self.replica.stamps_now, [volume]))

    async def _unchanged_and_complete(self) -> str | None:
        """Why the job may not be handed back (see the module docstring), or None."""
        replica = self.replica
        stamped = dict(replica.files.stamps)
        now = await asyncio.to_thread(replica.stamps_now, [*self._at_start, *stamped])
        moved = sorted(path for path, stamp in self._at_start.items() if now[path] != stamp)
        if moved:
            return (
                f"replica {', '.join(map(repr, moved))} changed during the failback: is the VM "
                "still running on the target? Nothing was handed back (the job stays promoted); "
                "stop the VM there and run the same `replicator failback` again"
            )
        left_out = sorted(
            path
            for path, stamp in stamped.items()
            if path not in self._asked and now[path] != stamp
        )
        if left_out:
            return (
                f"replica {', '.join(map(repr, left_out))} changed while the job was promoted "
                "and this failback was not given it: handing back would lose those changes "
                "(the next send replaces it with the source's copy). Nothing was handed back; "
                "run `replicator failback` again with every volume of the job, as `send` "
                "names them"
            )
        return None

    async def run(self) -> None:
        replica = self.replica
        promoted = replica.promotion is not None and not replica.promotion.damaged
        await self.conn.send(
            Welcome(
                protocol_version=PROTOCOL_VERSION,
                received_lsn=replica.received_lsn,
                applied_lsn=replica.applied_lsn,
                window=0,  # a failback sends no records
                capabilities=("failback", "promoted") if promoted else ("failback",),
                generation=replica.state.generation,
            )
        )
        log.info("receiver.failback_session", job=replica.job, peer=self.conn.peer)
        if promoted:
            self._at_start = await asyncio.to_thread(replica.stamps_now, list(replica.files.stamps))
        # not recv(timeout): a ReadData blocked in drain would wait out TCP's retransmissions
        self.conn.abort_when_silent(IDLE_TIMEOUT)
        while True:
            msg = await self.conn.recv()
            if isinstance(msg, Goodbye):
                return
            if isinstance(msg, Error):
                log.warning("receiver.peer_error", code=msg.code, message=msg.message)
                return
            if isinstance(msg, Ping):
                await self.conn.send(Pong(msg.nonce, msg.ts_ns))
                continue
            if isinstance(msg, Pong):
                continue
            if not isinstance(msg, ManifestRequest | ReadRequest | Handover):
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} in a failback")
            promotion = replica.promotion
            if promotion is None or promotion.damaged:
                why = (
                    "is not promoted"
                    if promotion is None
                    else f"may be promoted ({promotion.damaged})"
                )
                await self.conn.send(
                    Error(
                        "config", f"job {replica.job!r} {why}: there is nothing to fail back from"
                    )
                )
                return
            if isinstance(msg, ManifestRequest):
                await self._manifest(msg)
            elif isinstance(msg, ReadRequest):
                await self._read(msg)
            elif msg.step == "handback":
                refused = await self._unchanged_and_complete()
                if refused is not None:
                    log.error("receiver.handback_refused", job=replica.job, why=refused)
                    await self.conn.send(Error("handback", refused))
                    return
                await replica.handback(msg.lsn)
                await self.conn.send(Handover("demoted", msg.lsn, replica.state.generation))
                log.warning(
                    "receiver.failback_done",
                    job=replica.job,
                    lsn=msg.lsn,
                    bytes_served=self.bytes_served,
                )
            else:
                raise RemoteProtocolError(f"Handover step {msg.step!r} in a failback session")

    async def _manifest(self, req: ManifestRequest) -> None:
        problem = path_problem(req.volume)
        if problem is not None:
            await self.conn.send(Error("name", problem))
            return
        await self._note_asked(req.volume)
        await send_manifest(self.conn, self.replica, req)

    async def _read(self, req: ReadRequest) -> None:
        problem = path_problem(req.volume)
        if problem is not None:
            await self.conn.send(Error("name", problem))
            return
        await self._note_asked(req.volume)
        data = await asyncio.to_thread(
            self.replica.read_replica, req.volume, req.offset, req.length
        )
        if data is None:
            await self.conn.send(Error("config", f"replica {req.volume!r} does not exist"))
            return
        self.bytes_served += len(data)
        await self.conn.send(ReadData(req.request_id, req.offset, data))
