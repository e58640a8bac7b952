"""The sender's record of a role change: ``failback.state`` in its state folder.

While this file exists the source's volumes do not belong to replication in the original
direction, and ``replicator send`` refuses to start (exit 11, naming ``replicator
failback``):

* ``handed-over``: a planned failover moved the job to the target (the receiver promoted
  its replicas at the final point this sender shipped); the VM runs there now. Written
  after the receiver confirmed the promotion.
* ``failback``: ``replicator failback`` is bringing the volumes to the promoted replica's
  state. Written, durably, before the first byte of a volume changes: until the failback
  finishes the volumes may be half old, half new.
* ``handing-back``: the volumes equal the promoted replica, the sender's state was set
  to continue from ``lsn`` (its manifests, journal and peer generation), and the receiver
  is being told. A failback run again finishes the hand-back.

``replicator failback`` removes the file when both sides agree (the receiver welcomes
it at ``lsn`` and ``generation``, no longer promoted). A state-file framing error
(``journal/durable.py``) counts as present: refusing ``send`` is recoverable, sending
half-restored volumes over a replica is not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from replicator.engine.errors import ExitCode, ReplicatorError, SplitBrainError
from replicator.journal.durable import StateFileError, read_state, remove_state, write_state

log = structlog.get_logger()

MARKER_FILE = "failback.state"
PHASES = ("handed-over", "failback", "handing-back")


class HandedOver(ReplicatorError):
    """``send`` ends: a planned failover handed the job to the target (not a failure, but
    not "done" either: a service manager must not restart it; exit 12)."""

    exit_code = ExitCode.HANDED_OVER


@dataclass(frozen=True, slots=True)
class Marker:
    phase: str  # one of PHASES, or "damaged"
    generation: int = 0  # the receiver's (promoted) generation
    lsn: int = 0  # handed-over: the final point; handing-back: where both sides continue
    at_ns: int = 0
    why: str = ""  # damaged: what could not be read


def load_marker(state_dir: Path) -> Marker | None:
    path = state_dir / MARKER_FILE
    try:
        raw = read_state(path)
        if raw is None:
            return None
        phase = raw.get("phase")
        values = [raw.get(k) for k in ("generation", "lsn", "at_ns")]
        if phase not in PHASES or not all(type(v) is int and v >= 0 for v in values):
            raise ValueError(f"unexpected content {raw!r}")
        return Marker(str(phase), *(int(v) for v in values))  # type: ignore[arg-type]
    except (StateFileError, OSError, ValueError) as exc:
        log.error("sender.failback_state_unreadable", path=str(path), error=str(exc))
        return Marker("damaged", why=f"{path} cannot be read: {exc}")


def save_marker(state_dir: Path, phase: str, *, generation: int = 0, lsn: int = 0) -> Marker:
    """Durably record ``phase`` (blocking)."""
    assert phase in PHASES
    marker = Marker(phase, generation, lsn, time.time_ns())
    write_state(
        state_dir / MARKER_FILE,
        {"phase": phase, "generation": generation, "lsn": lsn, "at_ns": marker.at_ns},
    )
    return marker


def clear_marker(state_dir: Path) -> None:
    """The roles are back in the original direction (blocking, durable)."""
    remove_state(state_dir / MARKER_FILE)


def describe(marker: Marker) -> str:
    """One line for ``status`` and for refusals."""
    if marker.phase == "handed-over":
        return (
            f"handed over to the target by a planned failover (final lsn {marker.lsn}, "
            f"target generation {marker.generation})"
        )
    if marker.phase == "failback":
        return "a failback is under way: the volumes may be part old, part new"
    if marker.phase == "handing-back":
        return f"a failback is handing the roles back (at lsn {marker.lsn})"
    return f"failback state unreadable ({marker.why})"


def refuse_if_marked(state_dir: Path, job: str) -> None:
    """Raise SplitBrainError when the state folder says the volumes are not ours to send."""
    marker = load_marker(state_dir)
    if marker is None:
        return
    raise SplitBrainError(
        f"job {job!r}: {describe(marker)}; refusing to send from {state_dir}",
        hint="run `replicator failback --from HOST:PORT --job JOB VOLUME...` here (with the "
        "VM stopped on both sides) to bring the volumes to the target's state and hand the "
        "job back; `replicator send` works again after it",
    )
