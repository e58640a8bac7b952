"""The built-in witness's decisions: who is primary for a job, and when the target may
take over (docs/WITNESS.md).

Per job the witness knows the source's lease (the generation it last renewed at and when,
in memory only) and the grants it made (durable: ``witness.state``). The rules:

* a renewal at generation G is refused ("promoted") once a grant exists for G or later:
  the target is primary now and the source must stop;
* a promotion request at generation G is granted only when no grant exists for G (or the
  same requester holds it: the answer it may have lost), none for a later generation, the
  source does not hold a newer generation, and the source has not renewed for more than
  the requested quiet time, and for longer than the source's declared ``fence_after``
  plus a margin (``fence_wait``): by then a source cut off from the witness has fenced
  itself (``engine/witness_fence.py``). After a restart the witness counts the quiet time
  from its own start: it cannot know what the source did while it was down. The declared
  ``fence_after`` is kept durably (it survives a restart: a source cut off from a
  restarted witness still fences by the value it declared).

Exactly one requester is ever granted a job's generation: grants are only added, and a
new one is written durably (``journal/durable.py``) before it is answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from replicator.journal.durable import StateFileError

STATE_FILE = "witness.state"
FENCE_MARGIN = 1.0  # seconds; or a quarter of fence_after when that is more


def fence_wait(fence_after: float | None) -> float:
    """The quiet time after which a source that declared ``fence_after`` is surely fenced:
    fence_after plus a margin for clock rates and scheduling (0 without a declaration)."""
    if fence_after is None:
        return 0.0
    return fence_after + max(FENCE_MARGIN, 0.25 * fence_after)


@dataclass(frozen=True, slots=True)
class Renewal:
    ok: bool
    promoted_to: int = 0  # when refused: the generation the target was promoted to
    grantee: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    granted: bool
    new: bool = False  # a grant to record (durably) before answering
    reason: str = ""


@dataclass
class WitnessBook:
    """The witness's state for every job; ``now`` is a monotonic clock in seconds."""

    started: float
    grants: dict[str, dict[int, str]] = field(default_factory=dict)  # job: {generation: who}
    leases: dict[str, tuple[int, float]] = field(default_factory=dict)  # job: (gen, renewed)
    fences: dict[str, float] = field(default_factory=dict)  # job: the source's fence_after
    # job: the replica (engine/replica_id.py) the source last said it replicates to
    replicas: dict[str, str] = field(default_factory=dict)
    # jobs whose source said it has reached no replica yet (a new state folder whose
    # receiver it has not reached): no copy is known to hold its data, none is promoted
    unbound: set[str] = field(default_factory=set)

    def declare_fence(self, job: str, fence_after: float | None) -> bool:
        """The source's ``fence_after`` from a renewal (None: an older source that does not
        fence). True when it changed: the caller writes the state before answering."""
        if self.fences.get(job) == fence_after:
            return False
        if fence_after is None:
            del self.fences[job]
        else:
            self.fences[job] = fence_after
        return True

    def declare_replica(self, job: str, replica: str | None, unbound: bool | None = None) -> bool:
        """The replica the source replicates to, from a renewal (None: it did not say: an
        older source, or one that has not reached its receiver yet; the last one said is
        kept). ``unbound``: True when the source says it has reached no replica at all (a
        state folder that never had a session): no copy of the job is promoted until it
        names one; False once it has (a receiver from before replica identities names
        none); None: a source from before this, which says neither (nothing changes).
        True when it changed: the caller writes the state before answering."""
        before = (self.replicas.get(job), job in self.unbound)
        if replica is not None:
            self.replicas[job] = replica
        if unbound is True and replica is None:
            self.unbound.add(job)
        elif unbound is not None or replica is not None:
            self.unbound.discard(job)
        return (self.replicas.get(job), job in self.unbound) != before

    def renew(self, job: str, generation: int, now: float) -> Renewal:
        granted = self.grants.get(job, {})
        later = [g for g in granted if g >= generation]
        if later:
            top = max(later)
            return Renewal(False, promoted_to=top + 1, grantee=granted[top])
        # any live source keeps the target waiting (the conservative side); the newest
        # generation seen is kept, so a target behind it is never granted
        lease = self.leases.get(job)
        self.leases[job] = (generation if lease is None else max(generation, lease[0]), now)
        return Renewal(True)

    def decide(
        self,
        job: str,
        generation: int,
        after: float,
        who: str,
        now: float,
        replica: str | None = None,
    ) -> Decision:
        granted = self.grants.get(job, {})
        declared = self.replicas.get(job)
        if job in self.unbound:
            # the live source's state folder never reached a replica: every copy that asks
            # is older than what it wrote since (or another job's that bears its name)
            return Decision(False, reason=unbound_reason(job))
        if replica is not None and declared is not None and replica != declared:
            # another host's copy of the job (an old first try, a decommissioned target):
            # promoting it would throw away everything written since, and refuse the real
            # target for good. Checked first: under TLS the requester is its certificate,
            # and both copies' receivers may hold the same one (keygen's `receiver`), so
            # "the same requester asking again" would promote this one too
            return Decision(
                False,
                reason=f"the source of job {job!r} replicates to replica {declared}; this is "
                f"replica {replica}, another copy of the job: it is never promoted",
            )
        if replica is None and declared is not None:
            # a target from before replica identities cannot show it is that replica
            return Decision(
                False,
                reason=f"the source of job {job!r} replicates to replica {declared}, and this "
                "target does not say which replica it is (a replicator from before replica "
                "identities): run the same replicator version on both sides",
            )
        holder = granted.get(generation)
        if holder is not None:
            if holder == who:
                return Decision(True)  # asked again (the first answer was lost)
            return Decision(
                False, reason=f"generation {generation} of job {job!r} was granted to {holder!r}"
            )
        later = [g for g in granted if g > generation]
        if later:
            return Decision(
                False,
                reason=f"job {job!r} was promoted to generation {max(later) + 1} already; "
                f"this replica is at generation {generation}",
            )
        lease = self.leases.get(job)
        if lease is not None and lease[0] > generation:
            return Decision(
                False,
                reason=f"the source holds generation {lease[0]}, newer than this replica's "
                f"{generation}",
            )
        last = max(self.started, lease[1] if lease is not None else self.started)
        quiet = now - last
        needed = max(after, fence_wait(self.fences.get(job)))
        if quiet <= needed:
            since = (
                "renewed its lease" if lease is not None else "could have renewed (witness start)"
            )
            why = "" if needed == after else " (until the source has fenced itself)"
            return Decision(
                False,
                reason=f"the source {since} {quiet:.1f}s ago; promotion needs more than "
                f"{needed:g}s{why}",
            )
        return Decision(True, new=True)

    def record(self, job: str, generation: int, who: str, replica: str | None = None) -> None:
        """A grant; with the requester's ``replica``, that replica is the job's from now on
        (as if the source had declared it): the same requester asking again from another
        copy of the job (one certificate on two hosts) is refused."""
        self.grants.setdefault(job, {})[generation] = who
        if replica is not None:
            self.replicas[job] = replica

    def forget(self, job: str, generation: int, replica: str | None) -> None:
        """Undo ``record`` when writing it failed (nothing was answered yet); ``replica``:
        the job's declared replica before it."""
        self.grants.get(job, {}).pop(generation, None)
        if replica is None:
            self.replicas.pop(job, None)
        else:
            self.replicas[job] = replica

    def to_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "grants": {
                job: [[gen, who] for gen, who in sorted(gens.items())]
                for job, gens in self.grants.items()
            }
        }
        if self.fences:  # absent when empty: the file older witnesses wrote
            state["fences"] = dict(sorted(self.fences.items()))
        if self.replicas:  # likewise
            state["replicas"] = dict(sorted(self.replicas.items()))
        if self.unbound:  # likewise (an older witness ignores it)
            state["unbound"] = sorted(self.unbound)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, started: float) -> WitnessBook:
        book = cls(started=started)
        if state is None:
            return book
        grants = state.get("grants")
        if not isinstance(grants, dict):
            raise StateFileError("witness state: 'grants' is not a map")
        for job, pairs in grants.items():
            if not isinstance(job, str) or not isinstance(pairs, list):
                raise StateFileError(f"witness state: bad entry for job {job!r}")
            for pair in pairs:
                if (
                    not isinstance(pair, list)
                    or len(pair) != 2
                    or type(pair[0]) is not int
                    or not isinstance(pair[1], str)
                ):
                    raise StateFileError(f"witness state: bad grant {pair!r} for job {job!r}")
                book.record(job, pair[0], pair[1])
        fences = state.get("fences", {})
        if not isinstance(fences, dict):
            raise StateFileError("witness state: 'fences' is not a map")
        for job, seconds in fences.items():
            if not isinstance(job, str) or not positive_seconds(seconds):
                raise StateFileError(f"witness state: bad fence_after {seconds!r} for {job!r}")
            book.fences[job] = float(seconds)
        replicas = state.get("replicas", {})
        if not isinstance(replicas, dict):
            raise StateFileError("witness state: 'replicas' is not a map")
        for job, replica in replicas.items():
            if not isinstance(job, str) or not valid_replica(replica):
                raise StateFileError(f"witness state: bad replica {replica!r} for {job!r}")
            book.replicas[job] = replica
        unbound = state.get("unbound", [])
        if not isinstance(unbound, list) or not all(isinstance(j, str) for j in unbound):
            raise StateFileError("witness state: 'unbound' is not a list of job names")
        book.unbound.update(unbound)
        return book


def unbound_reason(job: str) -> str:
    """Why no copy of ``job`` is promoted while its source has reached no replica."""
    return (
        f"the source of job {job!r} said it has reached no replica (its state folder never "
        "had a session with a receiver): no copy is known to hold what it wrote, none is "
        "promoted automatically; if the source is gone for good, choose the copy to keep "
        "and run `replicator failover --force` there"
    )


def positive_seconds(value: object) -> bool:
    """A positive, finite number of seconds (not a bool)."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf")
    )


def valid_replica(value: object) -> bool:
    """A replica identity as a request may carry it (engine/replica_id.py: hex digits)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 64
        and all(c in "0123456789abcdef" for c in value)
    )
