"""What the receiver last told this sender it had applied: ``peer_applied.state`` in the sender's
state folder, for ``status`` when no sender runs.

The journal keeps acknowledged records until their whole segment can be dropped, so at rest
it cannot tell which of its records the receiver already applied: a `send --once` run from
cron would show hours of "lag" the receiver no longer has. Each time a link closes, the
sender writes the receiver's applied LSN and the wall-clock time it knew it by; the files
at rest then count as unapplied only records past that LSN, or journaled after that time
(a journal started again under the same folder). A lost or damaged file only takes the view
back to "every journaled record, at most".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from replicator.journal.durable import StateFileError, read_state, write_state_async

log = structlog.get_logger()

APPLIED_FILE = "peer_applied.state"


@dataclass(frozen=True, slots=True)
class PeerApplied:
    lsn: int  # every record up to this LSN was applied on the receiver
    at_ns: int  # wall clock when the sender learned it (a record after this is not covered)


def load_peer_applied(state_dir: Path) -> PeerApplied | None:
    """The last applied LSN heard, or None when never heard or the file is unreadable."""
    try:
        raw = read_state(state_dir / APPLIED_FILE)
    except (StateFileError, OSError):
        return None
    if raw is None:
        return None
    lsn, at_ns = raw.get("lsn"), raw.get("at_ns")
    if type(lsn) is not int or type(at_ns) is not int or lsn < 0 or at_ns < 0:
        return None
    return PeerApplied(lsn, at_ns)


async def save_peer_applied(state_dir: Path, applied: PeerApplied) -> bool:
    """Record ``applied`` durably; False (and a warning) when it could not be written: only
    the at-rest status depends on it, never replication."""
    try:
        await write_state_async(
            state_dir / APPLIED_FILE, {"lsn": applied.lsn, "at_ns": applied.at_ns}
        )
    except OSError as exc:
        log.warning(
            "sender.applied_state_unwritten",
            path=str(state_dir / APPLIED_FILE),
            error=str(exc),
            hint="`status` at rest will count every journaled record as possibly unapplied",
        )
        return False
    return True
