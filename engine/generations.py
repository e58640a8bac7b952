"""Replica histories: generations, promotion, and the split-brain rule.

In the spirit of DRBD's generation identifiers, every job carries a *generation*: a number
that changes whenever the history of its data forks. Replication keeps one history on both
sides (the receiver's replica follows the sender's source), so both sides hold the same
generation. A failover forks it: the promoted replica is written by a VM from then on, and
gets ``generation + 1``. A sender still at the old generation is then *stale*: its writes
would overwrite what the promoted side wrote since, so it is refused (split brain), and
nothing on the promoted replica changes until someone chooses explicitly (``replicator
demote`` on the target; ``replicator send --resync`` after that, or failback).

Where it lives:

* receiver: ``generation`` in ``applied.state`` (``replica_state.py``), and, while the job
  is promoted, ``promoted.state`` beside it (this module). Promotion is its own file so that
  damage to ``applied.state`` (which is rebuilt from the journal by itself) can never make
  a promoted replica writable by replication again: a damaged ``promoted.state`` refuses
  every sender until the operator decides.
* sender: ``peer.state`` in its state folder: the generation the receiver last welcomed it
  with, sent in every Hello (0: not known yet, e.g. a new state folder).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from replicator.engine.errors import SplitBrainError, StorageError
from replicator.journal.durable import StateFileError, read_state, write_state

log = structlog.get_logger()

PROMOTED_FILE = "promoted.state"
PEER_FILE = "peer.state"


@dataclass(frozen=True, slots=True)
class Promotion:
    """A job promoted by failover: the replica belongs to the target's VM now."""

    generation: int  # the new generation (the old one + 1)
    previous: int  # the generation the source replicated under
    at_ns: int  # when (wall clock)
    point_lsn: int  # the consistency point the replica held when promoted
    point_ts_ns: int  # its source time
    damaged: str = ""  # non-empty: promoted.state could not be read (refuse everyone)
    # False: promoted although not at a consistency point (failover --allow-inconsistent)
    consistent: bool = True
    # the point's time on this target's clock (engine/source_clock.py; 0: not known, a
    # file from before it was kept): what ``missing_seconds`` counts from
    point_target_ns: int = 0


class PromotedUnfinished(StorageError):
    """Failover's deciding step, ``promoted.state``, is durable and a later one failed: the
    job IS promoted (a restart, status and the source all find it so), and running the same
    failover again finishes what is left. Exit 9, like any local storage error, but the
    message says the job is promoted: an operator told only "failed" may start the VM on
    the source too."""

    def __init__(
        self, job: str, promotion: Promotion, step: str, exc: OSError, *, exec_cmd: bool = False
    ) -> None:
        self.job, self.promotion, self.step, self.error = job, promotion, step, exc
        why = exc.strerror or str(exc)
        super().__init__(
            f"job {job!r} IS promoted (generation {promotion.generation}, consistency point "
            f"lsn {promotion.point_lsn}): its replicas are the primary copy from now on and "
            f"the source is refused; but {step} failed: {why}"
            + ("; --exec was not run" if exec_cmd else ""),
            hint="do not start the VM on the source; check the disk here (free space, dmesg), "
            "then run the same `replicator failover` again: it finishes what is left and says "
            "the job was already promoted",
        )

    def exec_not_run(self) -> PromotedUnfinished:
        """The same, said by a failover that had an ``--exec`` to run."""
        return PromotedUnfinished(self.job, self.promotion, self.step, self.error, exec_cmd=True)


def load_promotion(state_dir: Path) -> Promotion | None:
    """The job's promotion, or None when it is a plain replica. A file that exists but
    cannot be read counts as a promotion (``damaged`` says why): refusing a sender is
    recoverable, overwriting a promoted replica is not."""
    path = state_dir / PROMOTED_FILE
    try:
        raw = read_state(path)
        if raw is None:
            return None
        return Promotion(
            generation=_int(raw, "generation"),
            previous=_int(raw, "previous"),
            at_ns=_int(raw, "at_ns"),
            point_lsn=_int(raw, "point_lsn"),
            point_ts_ns=_int(raw, "point_ts_ns"),
            consistent=raw.get("consistent", True) is not False,
            point_target_ns=_int(raw, "point_target_ns") if "point_target_ns" in raw else 0,
        )
    except (StateFileError, OSError, TypeError, ValueError) as exc:
        log.error("receiver.promotion_unreadable", path=str(path), error=str(exc))
        return Promotion(0, 0, 0, 0, 0, damaged=f"{path} cannot be read: {exc}")


def save_promotion(state_dir: Path, promotion: Promotion) -> None:
    """Durably record the promotion (blocking)."""
    saved: dict[str, object] = {
        "generation": promotion.generation,
        "previous": promotion.previous,
        "at_ns": promotion.at_ns,
        "point_lsn": promotion.point_lsn,
        "point_ts_ns": promotion.point_ts_ns,
    }
    if not promotion.consistent:
        saved["consistent"] = False
    if promotion.point_target_ns:
        saved["point_target_ns"] = promotion.point_target_ns
    write_state(state_dir / PROMOTED_FILE, saved)


def clear_promotion(state_dir: Path) -> None:
    """Demote: the job is a replica again (blocking, durable)."""
    from replicator.journal.durable import remove_state

    remove_state(state_dir / PROMOTED_FILE)


def new_promotion(
    generation: int,
    point_lsn: int,
    point_ts_ns: int,
    *,
    consistent: bool = True,
    point_target_ns: int = 0,
) -> Promotion:
    return Promotion(
        generation + 1,
        generation,
        time.time_ns(),
        point_lsn,
        point_ts_ns,
        consistent=consistent,
        point_target_ns=point_target_ns,
    )


def session_refusal(
    job: str,
    *,
    sender_generation: int,
    replica_generation: int,
    promotion: Promotion | None,
    fresh: bool,
    purpose: frozenset[str],
) -> tuple[str, str] | None:
    """(code, message) when a sender may not write this replica, or None.

    ``purpose`` holds the Hello's session capabilities ("verify", "resync"); ``fresh``: the
    replica holds nothing yet (any history may start it).
    """
    if "verify" in purpose:
        return None  # reads only
    if promotion is not None:
        if promotion.damaged:
            return (
                "promoted",
                f"job {job!r} may be promoted ({promotion.damaged}); refusing to write it",
            )
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(promotion.at_ns / 1e9))
        return (
            "promoted",
            f"job {job!r} was promoted by failover at {when} (generation "
            f"{promotion.generation}); this source is at generation {sender_generation or '?'} "
            f"and writing would overwrite what the promoted side wrote since",
        )
    if fresh or 0 in (sender_generation, replica_generation):
        return None  # a new replica, or one side does not know (its state was rebuilt)
    if sender_generation == replica_generation:
        return None
    if "resync" in purpose:
        return None  # an explicit choice: compare with the replica as it is, send what differs
    return (
        "generation",
        f"job {job!r}: the replica is at generation {replica_generation}, this source at "
        f"{sender_generation}; they have separate histories since a failover",
    )


def refusal_error(code: str, message: str) -> SplitBrainError:
    """What a sender tells the user about a "promoted" or "generation" refusal."""
    if code == "promoted":
        return SplitBrainError(
            f"receiver refused (split brain): {message}; nothing was written",
            hint="to keep the promoted replica, bring this source up to date with "
            "`replicator failback`; to throw away what the promoted side wrote, run "
            "`replicator demote --dir DIR --job JOB --discard-changes` on the target, then "
            "`replicator send --resync` here",
        )
    return SplitBrainError(
        f"receiver refused (split brain): {message}; nothing was written",
        hint="`replicator send --resync` compares with the replica as it is and overwrites "
        "what differs with this source's data; make sure that is the copy you want",
    )


# -- the sender's side --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """What the receiver last welcomed this sender with (``peer.state``): its generation
    (sent back in every Hello; 0: unknown) and the identity of its replica ("": unknown;
    engine/replica_id.py)."""

    generation: int = 0
    replica: str = ""


def load_peer(state_dir: Path) -> Peer:
    """``peer.state``; damaged or missing: unknown (logged)."""
    path = state_dir / PEER_FILE
    try:
        raw = read_state(path)
        if raw is None:
            return Peer()
        replica = raw.get("replica", "")
        return Peer(_int(raw, "generation"), replica if isinstance(replica, str) else "")
    except (StateFileError, OSError, TypeError, ValueError) as exc:
        log.error("sender.state_damaged", path=str(path), error=str(exc))
        return Peer()  # unknown: a promoted receiver still refuses, a plain one tells us again


def save_peer(state_dir: Path, peer: Peer) -> None:
    saved: dict[str, object] = {"generation": peer.generation}
    if peer.replica:
        saved["replica"] = peer.replica
    write_state(state_dir / PEER_FILE, saved)


def _int(raw: dict[str, object], key: str) -> int:
    value = raw.get(key)
    if type(value) is not int or value < 0:
        raise ValueError(f"{key} is {value!r}")
    return value
