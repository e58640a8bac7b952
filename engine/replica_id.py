"""Which replica a sender writes to: a random identity per job on the receiver.

Two jobs of the same name on two hosts, each with its own receiver, reach the same LSNs
and the same generation (every new history starts at 1). A sender aimed at the other's
receiver by mistake (a typo in ``--to``, swapped job files, DNS) found nothing amiss:
it scanned against its own manifests, sent its few changes, said "durable", and that
replica, now neither host's disk, said "consistent". DRBD refuses such a peer ("unrelated
data"); so does this.

The receiver makes a random identity when it first opens a job (``replica.id`` in the
job's state folder) and says it in the Welcome, as the capability ``replica-<hex>``. The
sender keeps the last one it replicated to (``peer.state``, beside the generation), and
a session that would build on the replica (not ``--resync``, not ``verify``) is refused
when the receiver holds a history (its received LSN above 0) under another identity.
``send --resync`` compares with that replica and takes it over (the identity is saved);
a receiver that holds nothing yet (a new job folder) is simply taken. A receiver or a
sender from before this says nothing or knows nothing: the check is skipped, and the
identity saved at the next session.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import structlog

from replicator.journal.durable import StateFileError, read_state, write_state

log = structlog.get_logger()

FILE_NAME = "replica.id"
CAPABILITY_PREFIX = "replica-"


def load_or_make(state_dir: Path, job: str) -> str:
    """The job's replica identity, made (durably) when there is none or it cannot be read
    (blocking). A new one makes every sender that knew the old one refuse until
    ``--resync``: the safe side for a state folder that lost track of itself."""
    path = state_dir / FILE_NAME
    try:
        raw = read_state(path)
        value = raw.get("id") if raw is not None else None
        if isinstance(value, str) and len(value) == 32 and _is_hex(value):
            return value
        if raw is not None:
            log.error("receiver.replica_id_damaged", job=job, path=str(path))
    except StateFileError as exc:
        log.error("receiver.replica_id_damaged", job=job, path=str(path), error=str(exc))
    made = secrets.token_hex(16)
    write_state(path, {"id": made})
    return made


def capability(replica_id: str) -> str:
    return CAPABILITY_PREFIX + replica_id


def from_capabilities(capabilities: tuple[str, ...]) -> str:
    """The identity a Welcome says ("" when it says none: a receiver from before)."""
    for cap in capabilities:
        if cap.startswith(CAPABILITY_PREFIX) and _is_hex(cap[len(CAPABILITY_PREFIX) :]):
            return cap[len(CAPABILITY_PREFIX) :]
    return ""


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text)
