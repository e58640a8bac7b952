"""One connected sender on the receiving side: the asyncio driver of ``ReceiverCore``.

A session appends each Records frame to its job's receive journal; a sync task makes
appended records durable, then acknowledges them as *received* and grants the sender the
same credit again; an acker acknowledges the applied LSN when the job's applier moves it.
It also answers manifest and tree requests (after applying everything received).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Any

import structlog

from replicator.engine.job_replica import JobReplica, ReceiverConfig
from replicator.engine.names import path_problem
from replicator.engine.replica_files import ReplicaDiverged
from replicator.engine.session_core import ReceiverCore, Send
from replicator.journal import (
    JournalError,
    JournalFull,
)
from replicator.transport import (
    PROTOCOL_VERSION,
    ConnectionClosedError,
    Error,
    FramedConnection,
    Goodbye,
    Manifest,
    ManifestRequest,
    Ping,
    Pong,
    Records,
    RemoteProtocolError,
    Welcome,
)
from replicator.transport.messages import (
    DIGEST_SIZE,
    MAX_TREE_PART,
    MessageError,
    Tree,
    TreeEntry,
    TreeRequest,
    encode_tree,
)

log = structlog.get_logger()

IDLE_TIMEOUT = 120.0


class Session:
    """One connected sender: the asyncio driver of ``ReceiverCore`` (ingest, sync,
    acknowledge) that also answers manifest and tree requests."""

    def __init__(
        self, conn: FramedConnection, replica: JobReplica, config: ReceiverConfig, *, adopt: bool
    ) -> None:
        self.adopt = adopt  # a replica file the sender asks a manifest of is taken as it is
        self.conn = conn
        self.replica = replica
        self.config = config
        self.core = ReceiverCore(replica.received_lsn, replica.applied_lsn)
        self._sync_wake = asyncio.Event()
        self._sync_lock = asyncio.Lock()

    async def run(self) -> None:
        replica = self.replica
        # records a previous session appended but did not sync yet are valid (checksummed):
        # make them durable so the resume point we announce covers them
        await replica.journal.sync()
        replica.session_started()
        self.core = ReceiverCore(replica.received_lsn, replica.applied_lsn)
        await self.conn.send(
            Welcome(
                protocol_version=PROTOCOL_VERSION,
                received_lsn=replica.received_lsn,
                applied_lsn=replica.applied_lsn,
                window=self.config.window,
                capabilities=("lz4", "manifest"),
                generation=replica.state.generation,
            )
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._syncer())
                tg.create_task(self._applied_acker())
                await self._reader(tg)
                raise _SessionOver  # the reader ended the session: cancel syncer and acker
        except* _SessionOver:
            pass

    async def _send_all(self, actions: list[Send]) -> None:
        for action in actions:
            await self.conn.send(action.message)

    async def _reader(self, tg: asyncio.TaskGroup) -> None:
        while True:
            msg = await self.conn.recv(timeout=IDLE_TIMEOUT)
            if isinstance(msg, Records):
                records = self.core.records(msg)  # the protocol checked count and LSN order
                try:
                    await self.replica.ingest(records, msg.payload)
                except (JournalError, OSError) as exc:
                    reason = _storage_reason(exc)
                    log.error("receiver.storage", job=self.replica.job, error=reason)
                    await self.conn.send(Error("storage", reason))
                    return
                self.core.ingested(records, len(msg.payload))
                self._sync_wake.set()
            elif isinstance(msg, ManifestRequest):
                tg.create_task(self._answer_manifest(msg))
            elif isinstance(msg, TreeRequest):
                tg.create_task(self._answer_tree(msg))
            elif isinstance(msg, Goodbye):
                await self._flush_sync()
                return
            elif isinstance(msg, Error):
                log.warning("receiver.peer_error", code=msg.code, message=msg.message)
                return
            elif isinstance(msg, Ping | Pong):
                await self._send_all(self.core.control(msg))
            else:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} from a sender")

    async def _flush_sync(self) -> None:
        if self.core.unsynced:
            await self._sync_once()

    async def _sync_once(self) -> None:
        async with self._sync_lock:  # hand records over in LSN order
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        records, granted = self.core.take_unsynced()
        try:
            await self.replica.journal.sync()
        except (JournalError, OSError) as exc:
            reason = _storage_reason(exc)
            log.error("receiver.storage", job=self.replica.job, error=reason)
            await self.conn.send(Error("storage", reason))
            raise StorageFailed(reason) from exc
        self.replica.note_durable(records)
        replica = self.replica
        await self._send_all(self.core.synced(replica.received_lsn, replica.applied_lsn, granted))

    async def _syncer(self) -> None:
        """Runs until the session's TaskGroup cancels it when the reader ends."""
        while True:
            await self._sync_wake.wait()
            self._sync_wake.clear()
            await self._sync_once()

    async def _applied_acker(self) -> None:
        replica = self.replica
        while True:
            async with replica.applied_changed:
                await replica.applied_changed.wait()
            failure = replica.failure
            if failure is not None:
                code = "diverged" if isinstance(failure, ReplicaDiverged) else "storage"
                await self.conn.send(Error(code, f"receiver cannot apply: {failure}"))
                raise ConnectionClosedError("apply failed")
            await self._send_all(self.core.applied(replica.received_lsn, replica.applied_lsn))

    async def _answer_manifest(self, req: ManifestRequest) -> None:
        problem = path_problem(req.volume)
        if problem is not None:
            await self.conn.send(Error("name", problem))
            return
        # Everything received is applied first, so the manifest and the sender's view of
        # "what the receiver has" agree (see docs/ARCHITECTURE.md, differential sync).
        await self.replica.apply_pending(force=True)
        if self.adopt:
            await self.replica.adopt(req.volume)
        chunks = self.replica.replica_manifest(req.volume, req.extent_size)
        first = 0
        part = await asyncio.to_thread(next, chunks)
        while True:
            nxt = await asyncio.to_thread(next, chunks, None)
            exists, size, digests = part
            await self.conn.send(
                Manifest(
                    req.request_id,
                    req.volume,
                    exists,
                    size,
                    req.extent_size,
                    first,
                    digests,
                    nxt is None,
                )
            )
            if nxt is None:
                return
            first += len(digests) // DIGEST_SIZE
            part = nxt

    async def _answer_tree(self, req: TreeRequest) -> None:
        # as for manifests: the listing is of the replica with everything received applied
        await self.replica.apply_pending(force=True)
        parts = await asyncio.to_thread(replica_tree_parts, self.replica.replica_dir)
        for i, part in enumerate(parts):
            await self.conn.send(Tree(req.request_id, i == len(parts) - 1, part))


def replica_tree_parts(root: Path, part_bytes: int = MAX_TREE_PART // 2) -> list[bytes]:
    """The replica folder ``root`` as Tree listings of about ``part_bytes`` each (at least
    one, empty when the folder does not exist). Symlinks are listed, never followed; names
    that could not come from a sender are left out (the sender cannot name them either)."""
    entries: list[TreeEntry] = []
    parts: list[bytes] = []
    size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in sorted([*dirnames, *filenames]):
            path = name if rel == "." else f"{rel}/{name}"
            if path_problem(path) is not None:
                continue
            try:
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISLNK(st.st_mode):
                    entry = TreeEntry(path, "l", 0, os.readlink(os.path.join(dirpath, name)))
                elif stat.S_ISDIR(st.st_mode):
                    entry = TreeEntry(path, "d", st.st_mode & 0o7777, "")
                elif stat.S_ISREG(st.st_mode):
                    entry = TreeEntry(path, "f", st.st_mode & 0o7777, "")
                else:
                    continue
            except (OSError, MessageError):  # gone meanwhile, or a target we cannot carry
                continue
            entries.append(entry)
            size += len(path) + len(entry.target) + 16
            if size >= part_bytes:
                parts.append(encode_tree(entries))
                entries, size = [], 0
    parts.append(encode_tree(entries))
    return parts


class _SessionOver(Exception):
    pass


class StorageFailed(Exception):
    """The receiver could not make records durable; the sender was told why."""


def _storage_reason(exc: BaseException) -> str:
    if isinstance(exc, JournalFull):
        return f"receiver journal is full ({exc}); free space or raise its cap"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return "receiver disk is full; free space on the receiver, then send again"
        cause = cause.__cause__
    return f"receiver storage error: {exc}"


async def send_quietly(conn: FramedConnection, msg: Any) -> None:
    with contextlib.suppress(Exception):
        await conn.send(msg)
