"""The witness as etcd keys (``--witness etcd://HOST:PORT``; docs/WITNESS.md).

* ``/replicator/witness/JOB/source``: the source's key, attached to an etcd lease of
  ``lease_seconds``; the sender refreshes the lease and rewrites the key at every renewal
  (in a transaction that fails once the job's current generation was granted).
* ``/replicator/witness/JOB/replica``: the replica the source replicates to (no lease);
  empty while the source says it has reached none: then no copy is promoted.
* ``/replicator/witness/JOB/promoted/G``: created (never overwritten) by the target that
  promotes generation G, in one transaction that checks the source's key is gone. etcd
  serialises transactions, so exactly one target ever creates it.

The client is aetcd (optional extra ``[etcd]``), imported only here. It speaks plain
gRPC: run etcd on a network you trust (or loopback behind a proxy).
"""

from __future__ import annotations

import math
from typing import Any

from replicator.engine.errors import ConfigError, ConnectError
from replicator.engine.witness_state import Decision, Renewal, unbound_reason

PREFIX = "/replicator/witness/"
TIMEOUT = 5
UNBOUND = ""  # the replica key's value while the source has reached no replica


def _source(job: str) -> bytes:
    return f"{PREFIX}{job}/source".encode()


def _replica(job: str) -> bytes:
    return f"{PREFIX}{job}/replica".encode()


def _promoted(job: str, generation: int) -> bytes:
    return f"{PREFIX}{job}/promoted/{generation}".encode()


class EtcdWitness:
    def __init__(self, host: str, port: int, *, who: str, lease_seconds: float) -> None:
        try:
            import aetcd
        except ImportError as exc:
            raise ConfigError(
                "--witness etcd://… needs the aetcd client",
                hint="install replicator with the etcd extra: pip install 'replicator[etcd]'",
            ) from exc
        self._aetcd = aetcd
        self.host, self.port, self.who = host, port, who
        self.ttl = max(1, math.ceil(lease_seconds))  # whole seconds, rounded up (docs)
        self._client: Any = aetcd.Client(host, port, timeout=TIMEOUT)
        self._lease: Any = None

    @property
    def where(self) -> str:
        return f"etcd://{self.host}:{self.port}"

    @property
    def fence_bound(self) -> float | None:
        """The source's key goes with its lease TTL seconds after etcd saw the refresh (at
        or after its send): fence a quarter of the TTL before that."""
        return 0.75 * self.ttl

    async def renew(
        self,
        job: str,
        generation: int,
        fence_after: float | None = None,
        replica: str | None = None,
        unbound: bool | None = None,
    ) -> Renewal:
        # fence_after is not sent: the lease's TTL bounds it (``fence_bound``)
        try:
            return await self._renew(job, generation, replica, unbound)
        except self._aetcd.exceptions.ClientError as exc:
            self._lease = None  # granted anew once etcd answers again
            raise ConnectError(f"cannot reach etcd at {self.where}: {exc}") from exc

    async def _renew(
        self, job: str, generation: int, replica: str | None, unbound: bool | None
    ) -> Renewal:
        client = self._client
        await client.connect()
        if self._lease is not None:
            reply = await self._lease.refresh()
            if reply is None or reply.TTL <= 0:  # expired meanwhile: the key went with it
                self._lease = None
        if self._lease is None:
            self._lease = await client.lease(self.ttl)
        txn = client.transactions
        granted = _promoted(job, generation)
        ok, responses = await client.transaction(
            compare=[txn.version(granted) == 0],
            success=[
                txn.put(_source(job), str(generation).encode(), lease=self._lease),
                # the replica it replicates to: no lease, it outlives the source; empty:
                # it has reached none (UNBOUND), so no copy is promoted
                *(
                    [txn.put(_replica(job), (replica or UNBOUND).encode())]
                    if replica or unbound
                    else []
                ),
            ],
            failure=[txn.get(granted)],
        )
        if ok:
            if unbound is False and not replica:  # reached a receiver that names none
                await client.transaction(
                    compare=[txn.value(_replica(job)) == UNBOUND.encode()],
                    success=[txn.delete(_replica(job))],
                    failure=[],
                )
            return Renewal(True)
        return Renewal(False, promoted_to=generation + 1, grantee=_value(responses))

    async def may_promote(
        self, job: str, generation: int, after: float, replica: str | None = None
    ) -> Decision:
        try:
            return await self._may_promote(job, generation, replica)
        except self._aetcd.exceptions.ClientError as exc:
            raise ConnectError(f"cannot reach etcd at {self.where}: {exc}") from exc

    async def _may_promote(self, job: str, generation: int, replica: str | None) -> Decision:
        client = self._client
        await client.connect()
        txn = client.transactions
        granted = _promoted(job, generation)
        # the replica the source declared: read, then checked unchanged in the transaction
        declared = await client.get(_replica(job))
        if declared is not None:
            theirs = bytes(declared.value).decode(errors="replace")
            if theirs == UNBOUND:
                return Decision(False, reason=unbound_reason(job))
            if not replica:
                return Decision(
                    False,
                    reason=f"the source of job {job!r} replicates to replica {theirs}, and this "
                    "target does not say which replica it is: run the same replicator version "
                    "on both sides",
                )
            if theirs != replica:
                return Decision(
                    False,
                    reason=f"the source of job {job!r} replicates to replica {theirs}; this is "
                    f"replica {replica}, another copy of the job: it is never promoted",
                )
        ok, responses = await client.transaction(
            compare=[
                txn.version(_source(job)) == 0,
                txn.version(granted) == 0,
                txn.mod(_replica(job)) == (0 if declared is None else declared.mod_revision),
            ],
            # the grant binds the replica (when the source never said it): the same
            # requester asking from another copy of the job is refused above
            success=[
                txn.put(granted, self.who.encode()),
                *([txn.put(_replica(job), replica.encode())] if replica else []),
            ],
            failure=[txn.get(granted), txn.get(_source(job))],
        )
        if ok:
            return Decision(True, new=True)
        holder = _value(responses[:1])
        if holder == self.who:
            return Decision(True)  # our own grant, asked again
        if holder:
            return Decision(False, reason=f"generation {generation} was granted to {holder!r}")
        if _value(responses[1:]):
            return Decision(False, reason="the source still holds its etcd lease")
        return Decision(False, reason="the source's replica changed meanwhile: asked again")

    async def aclose(self) -> None:
        # the lease is left to expire, not revoked: a source that stops is as gone as one
        # that dies (the target decides after its own --auto-failover-after)
        self._lease = None
        await self._client.close()


def _value(responses: list[Any]) -> str:
    """The value of the first key a transaction's failure branch read ('' when absent)."""
    for kvs in responses:
        if isinstance(kvs, list) and kvs:
            return bytes(kvs[0][0]).decode(errors="replace")
    return ""
