"""What the sender and the receiver ask a witness (docs/WITNESS.md): ``renew`` (the
source's lease as primary) and ``may_promote`` (the target's question). Two kinds behind
one interface: the built-in ``replicator witness`` (HOST:PORT) and etcd (etcd://HOST:PORT,
``engine/witness_etcd.py``). Both raise ConnectError when the witness cannot be reached:
the callers then keep doing what they did (the source replicates, the target waits)."""

from __future__ import annotations

import ssl
from typing import Protocol

from replicator.engine.errors import ConfigError, PeerProtocolError
from replicator.engine.tls import WITNESS, TlsIdentity
from replicator.engine.witness_protocol import request
from replicator.engine.witness_state import Decision, Renewal

ETCD_SCHEME = "etcd://"


class Witness(Protocol):
    @property
    def where(self) -> str: ...

    @property
    def fence_bound(self) -> float | None:
        """Seconds after a successful renewal's send by which the source must be fenced,
        whatever it declared (etcd: before its lease's TTL runs out); None: no bound."""
        ...

    async def renew(
        self,
        job: str,
        generation: int,
        fence_after: float | None = None,
        replica: str | None = None,
        unbound: bool | None = None,
    ) -> Renewal:
        """Renew the source's lease; ``fence_after``: the seconds without a successful
        renewal after which it fences itself (the built-in witness waits for that);
        ``replica``: the replica identity it replicates to (engine/replica_id.py), the only
        one the witness may promote; ``unbound``: True while the source has reached no
        replica at all (then none is promoted), False once it has (None: not said)."""
        ...

    async def may_promote(
        self, job: str, generation: int, after: float, replica: str | None = None
    ) -> Decision:
        """May this target (its replica identity ``replica``) promote job J at G?"""
        ...

    async def aclose(self) -> None: ...


class BuiltinWitness:
    """A ``replicator witness`` at HOST:PORT (TLS with ``tls``, a client-side identity whose
    ``peer`` is the name the witness's certificate must carry)."""

    def __init__(self, host: str, port: int, *, who: str, tls: TlsIdentity | None) -> None:
        self.host, self.port, self.who, self.tls = host, port, who, tls

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def _context(self) -> ssl.SSLContext | None:
        return None if self.tls is None else self.tls.context()

    @property
    def fence_bound(self) -> float | None:
        return None  # the witness waits for the declared fence_after

    async def renew(
        self,
        job: str,
        generation: int,
        fence_after: float | None = None,
        replica: str | None = None,
        unbound: bool | None = None,
    ) -> Renewal:
        message: dict[str, object] = {"op": "renew", "job": job, "generation": generation}
        if fence_after is not None:
            message["fence_after"] = fence_after
        if replica:
            message["replica"] = replica
        if unbound is not None:
            message["unbound"] = unbound
        reply = await self._ask(message)
        if reply.get("ok") is True:
            return Renewal(True)
        promoted_to = reply.get("promoted_to")
        if type(promoted_to) is not int:
            raise PeerProtocolError(f"the witness at {self.where} sent a bad renewal: {reply}")
        return Renewal(False, promoted_to=promoted_to, grantee=str(reply.get("grantee", "")))

    async def may_promote(
        self, job: str, generation: int, after: float, replica: str | None = None
    ) -> Decision:
        message: dict[str, object] = {
            "op": "promote",
            "job": job,
            "generation": generation,
            "after": after,
        }
        if replica:
            message["replica"] = replica
        reply = await self._ask(message)
        if reply.get("granted") is True:
            return Decision(True)
        return Decision(False, reason=str(reply.get("reason", "refused")))

    async def _ask(self, message: dict[str, object]) -> dict[str, object]:
        expect = None if self.tls is None else self.tls.peer
        reply = await request(
            self.host, self.port, {**message, "who": self.who}, self._context(), expect=expect
        )
        if "error" in reply:
            raise PeerProtocolError(f"the witness at {self.where} says: {reply['error']}")
        return reply

    async def aclose(self) -> None:
        return None


def witness_for(
    spec: str,
    *,
    who: str,
    tls_dir: str | None = None,
    tls_name: str | None = None,
    peer: str | None = None,
    lease_seconds: float = 6.0,
) -> Witness:
    """The witness ``--witness SPEC`` names: HOST:PORT (built-in; mutual TLS with the
    side's --tls-dir, as a client, the witness's certificate named ``peer``, ``witness``
    by default) or etcd://HOST:PORT."""
    from pathlib import Path

    if spec.startswith(ETCD_SCHEME):
        from replicator.engine.witness_etcd import EtcdWitness

        host, port = _endpoint(spec[len(ETCD_SCHEME) :], spec)
        return EtcdWitness(host, port, who=who, lease_seconds=lease_seconds)
    host, port = _endpoint(spec, spec)
    tls = None
    if tls_dir is not None:
        tls = TlsIdentity(Path(tls_dir), tls_name or "sender", server=False, peer=peer or WITNESS)
        tls.load()
    return BuiltinWitness(host, port, who=who, tls=tls)


def check_witness_spec(spec: str) -> None:
    """ConfigError unless ``spec`` is what --witness takes (HOST:PORT or etcd://HOST:PORT)."""
    _endpoint(spec.removeprefix(ETCD_SCHEME), spec)


def _endpoint(value: str, spec: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--witness wants HOST:PORT or etcd://HOST:PORT, got {spec!r}",
            hint="e.g. --witness 192.0.2.30:7080 (replicator witness) or "
            "--witness etcd://192.0.2.40:2379",
        )
    return host.strip("[]"), int(port)
