"""The built-in witness's decisions: who is primary for a job, and when the target may
take over (docs/WITNESS.md).

Per job the witness knows the source's lease (the generation it last renewed at and when,
in memory only) and the grants it made (durable: ``witness.state``). The rules:

* a renewal at generation G is refused ("promoted") once a grant exists for G or later:
  the target is primary now and the source must stop;
* a promotion request at generation G is granted only when no grant exists for G (or the
  same requester holds it: the answer it may have lost), none for a later generation, the
  source does not hold a newer generation, and the source has not renewed for more than
  the requested quiet time. After a restart the witness counts the quiet time from its
  own start: it cannot know what the source did while it was down.

Exactly one requester is ever granted a job's generation: grants are only added, and a
new one is written durably (``journal/durable.py``) before it is answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from replicator.journal.durable import StateFileError

STATE_FILE = "witness.state"


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

    def decide(self, job: str, generation: int, after: float, who: str, now: float) -> Decision:
        granted = self.grants.get(job, {})
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
        if quiet <= after:
            since = (
                "renewed its lease" if lease is not None else "could have renewed (witness start)"
            )
            return Decision(
                False,
                reason=f"the source {since} {quiet:.1f}s ago; promotion needs more than {after:g}s",
            )
        return Decision(True, new=True)

    def record(self, job: str, generation: int, who: str) -> None:
        self.grants.setdefault(job, {})[generation] = who

    def forget(self, job: str, generation: int) -> None:
        """Undo ``record`` when writing it failed (nothing was answered yet)."""
        self.grants.get(job, {}).pop(generation, None)

    def to_state(self) -> dict[str, Any]:
        return {
            "grants": {
                job: [[gen, who] for gen, who in sorted(gens.items())]
                for job, gens in self.grants.items()
            }
        }

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
        return book
