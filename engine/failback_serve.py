"""The receiver's side of ``replicator failback``: serve a promoted replica's manifests and
extents to the old source, then take the replica back into replication.

A failback session (Hello capability ``failback``, authorised like a writing session)
writes nothing until its last step: it answers ManifestRequest with the replica as the
target's VM left it (nothing applied, nothing taken over: the job is promoted, so
replication touches nothing) and ReadRequest with its bytes. ``Handover("handback", H)``
makes the job a replica again at LSN ``H`` (``JobReplica.handback``), answered by
``Handover("demoted", H, generation)``.

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
        while True:
            msg = await self.conn.recv(timeout=IDLE_TIMEOUT)
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
        await send_manifest(self.conn, self.replica, req)

    async def _read(self, req: ReadRequest) -> None:
        problem = path_problem(req.volume)
        if problem is not None:
            await self.conn.send(Error("name", problem))
            return
        data = await asyncio.to_thread(
            self.replica.read_replica, req.volume, req.offset, req.length
        )
        if data is None:
            await self.conn.send(Error("config", f"replica {req.volume!r} does not exist"))
            return
        self.bytes_served += len(data)
        await self.conn.send(ReadData(req.request_id, req.offset, data))
