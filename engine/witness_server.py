"""``replicator witness``: the tie-breaker both sides of a job talk to (docs/WITNESS.md).

Serves ``renew`` (the source: "I am alive as primary for job J at generation G") and
``promote`` (the target: "may I promote job J at generation G?") from a ``WitnessBook``;
grants are written to ``DIR/witness.state`` (fsync, write-temp-rename) before the answer
leaves, so a restarted witness never grants a job's generation twice.

With ``--allow NAME:JOB`` rules (TLS), a certificate may renew or ask to promote only the
jobs a rule gives it (``engine/authz.py``): another host holding a certificate of the CA
cannot keep a job's lease alive to block its failover, nor take its grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from replicator.engine.authz import Allow, allowed
from replicator.engine.errors import ReplicatorError
from replicator.engine.names import check_job_name
from replicator.engine.tls import peer_name
from replicator.engine.witness_protocol import ForeignFrame, encode, read_message
from replicator.engine.witness_state import (
    STATE_FILE,
    WitnessBook,
    positive_seconds,
    valid_replica,
)
from replicator.journal.durable import makedirs_durable, read_state, write_state_async
from replicator.transport.frames import FRAME_MAGIC, encode_frame
from replicator.transport.messages import Error

log = structlog.get_logger()

REQUEST_TIMEOUT = 10.0


class WitnessServer:
    def __init__(self, directory: Path, rules: Sequence[Allow] = ()) -> None:
        self.rules = tuple(rules)
        self.path = directory / STATE_FILE
        makedirs_durable(directory)
        self.book = WitnessBook.from_state(read_state(self.path), time.monotonic())
        self._lock = asyncio.Lock()  # one decision (and its durable write) at a time

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                message = await read_message(reader)
                reply = await self.answer(message, peer_name(writer))
                writer.write(encode(reply))
                await writer.drain()
        except ForeignFrame as exc:
            log.warning("witness.request_failed", peer=str(peer), error=str(exc))
            if exc.magic == FRAME_MAGIC:  # a sender (or verify) aimed at this port
                await _not_a_receiver(reader, writer)
        except (ReplicatorError, TimeoutError, OSError, ssl.SSLError) as exc:
            log.warning("witness.request_failed", peer=str(peer), error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def _write_failed(self, exc: OSError) -> None:
        """A write of witness.state failed, and the change was taken back in memory (the
        request is refused). The write may have failed after its rename (the folder's
        fsync), leaving the file holding the refused change: a restart would read a grant
        nobody was told of and tell the live source it was promoted away. So the state as
        it was is written again (lock held), so that the file says what was answered."""
        log.error("witness.state_write_failed", path=str(self.path), error=str(exc))
        try:
            await write_state_async(self.path, self.book.to_state())
        except OSError as again:
            log.critical(
                "witness.state_unsure",
                path=str(self.path),
                error=str(again),
                action="the file may hold a change this witness refused: do not restart the "
                "witness until its disk is fixed; its next write makes the file right again",
            )

    async def answer(self, message: dict[str, Any], certificate: str | None) -> dict[str, Any]:
        op, job, generation = message.get("op"), message.get("job"), message.get("generation")
        try:
            if not isinstance(job, str) or type(generation) is not int or generation < 0:
                raise ValueError("a request needs a job name and a generation >= 0")
            check_job_name(job)
        except (ValueError, ReplicatorError) as exc:
            return {"error": f"bad request: {exc}"}
        if not allowed(self.rules, certificate, job):
            log.warning("witness.refused_certificate", job=job, op=op, certificate=certificate)
            who = f"certificate {certificate!r}" if certificate else "a peer without a certificate"
            return {
                "error": f"{who} may not renew or promote job {job!r} at this witness "
                f"(on the witness: --allow {certificate or 'NAME'}:{job})"
            }
        # with TLS the requester is its certificate; without, what it says it is
        who = certificate or str(message.get("who") or "?")
        now = time.monotonic()
        replica = message.get("replica")  # absent: a side from before replica identities
        if op == "renew":
            fence_after = message.get("fence_after")  # absent: a source that does not fence
            if fence_after is not None and not positive_seconds(fence_after):
                return {"error": "bad request: 'fence_after' must be a positive number of seconds"}
            if replica is not None and not valid_replica(replica):
                return {"error": "bad request: 'replica' must be a replica identity (hex)"}
            unbound = message.get("unbound")  # absent: a source from before it
            if unbound is not None and not isinstance(unbound, bool):
                return {"error": "bad request: 'unbound' must be true or false"}
            async with self._lock:  # not between a grant's record and its write
                declared = self.book.fences.get(job)
                target = self.book.replicas.get(job)
                was_unbound = job in self.book.unbound
                changed = self.book.declare_fence(
                    job, None if fence_after is None else float(fence_after)
                )
                if self.book.declare_replica(job, replica, unbound) or changed:
                    try:
                        await write_state_async(self.path, self.book.to_state())
                    except OSError as exc:  # not renewed: the source counts it as a failure
                        self.book.declare_fence(job, declared)
                        if target is None:
                            self.book.replicas.pop(job, None)
                        else:
                            self.book.replicas[job] = target
                        if was_unbound:
                            self.book.unbound.add(job)
                        else:
                            self.book.unbound.discard(job)
                        await self._write_failed(exc)
                        return {"error": f"the witness cannot write: {exc}"}
                renewal = self.book.renew(job, generation, now)
            if renewal.ok:
                return {"ok": True}
            log.warning(
                "witness.renewal_refused",
                job=job,
                generation=generation,
                promoted_to=renewal.promoted_to,
                by=renewal.grantee,
            )
            return {"ok": False, "promoted_to": renewal.promoted_to, "grantee": renewal.grantee}
        if op == "promote":
            after = message.get("after")
            if not isinstance(after, int | float) or after <= 0:
                return {"error": "bad request: 'after' must be a positive number of seconds"}
            if replica is not None and not valid_replica(replica):
                return {"error": "bad request: 'replica' must be a replica identity (hex)"}
            async with self._lock:
                decision = self.book.decide(job, generation, float(after), who, now, replica)
                if decision.new:
                    target = self.book.replicas.get(job)
                    self.book.record(job, generation, who, replica)
                    try:
                        await write_state_async(self.path, self.book.to_state())
                    except OSError as exc:
                        self.book.forget(job, generation, target)
                        await self._write_failed(exc)
                        return {"granted": False, "reason": f"the witness cannot write: {exc}"}
                    log.warning("witness.granted", job=job, generation=generation + 1, to=who)
            if decision.granted:
                return {"granted": True, "generation": generation + 1}
            log.info("witness.refused", job=job, generation=generation, why=decision.reason)
            return {"granted": False, "reason": decision.reason}
        return {"error": f"bad request: unknown op {op!r}"}


async def _not_a_receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Tell a replication peer, in its own protocol, that this is no receiver: it stops
    with that (exit 7) instead of retrying a connection "lost mid-session" for ever. Its
    unread input is read and dropped until it closes (2 s at most): closing with input
    unread would send a reset, which may reach it before our answer."""
    where = writer.get_extra_info("sockname")
    port = f" (port {where[1]})" if isinstance(where, tuple) and len(where) > 1 else ""
    refusal = Error(
        "protocol",
        f"this is a replicator witness{port}, not a receiver: give `send --to` (and "
        "`verify --to`) the receiver's address; the witness's goes to --witness",
    )
    writer.writelines(encode_frame(refusal, compress=False).buffers)
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        await writer.drain()
        async with asyncio.timeout(2.0):
            while await reader.read(65536):
                pass
