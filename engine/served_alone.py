"""A live sender that started serving without its receiver (``--wait-for-receiver``):
``served_alone.state`` in its state folder.

Such a sender scans its volumes against its own last manifests, journals the difference
and serves, numbering records past the last LSN of its journal (``since``) without having
heard what the receiver holds. That numbering is only right if the receiver holds nothing
past ``since``: it cannot, unless this state folder is older than the replica (restored
from a backup, or another state folder replicated the job meanwhile). Then the receiver's
records past ``since`` and ours carry the same LSNs with other contents, and shipping from
the receiver's LSN would skip ours: a replica silently unlike its source.

So ``since`` is written durably before the first record is numbered that way, and every
session checks it at its handshake, whether this run or a later one (the process may be
restarted before it reaches the receiver): a receiver at or below ``since`` is the one this
journal follows, and the file is removed; one above it is refused with what to do.
"""

from __future__ import annotations

from pathlib import Path

from replicator.engine.errors import RefusedError
from replicator.journal.durable import StateFileError, read_state, remove_state, write_state

SERVED_ALONE_FILE = "served_alone.state"


def load_served_alone(state_dir: Path) -> int | None:
    """The LSN a sender served alone from, or None when it never did (or it was checked).

    A damaged file is taken as ``since`` 0: every receiver that holds anything is refused
    until the operator looks (a false "the receiver is ahead" costs a restart; a false
    "it is not" could cost the replica)."""
    try:
        raw = read_state(state_dir / SERVED_ALONE_FILE)
    except StateFileError:
        return 0
    if raw is None:
        return None
    since = raw.get("since")
    return since if type(since) is int and since >= 0 else 0


def save_served_alone(state_dir: Path, since: int) -> None:
    """Durably note that records past ``since`` are numbered without the receiver's word."""
    write_state(state_dir / SERVED_ALONE_FILE, {"since": since})


def clear_served_alone(state_dir: Path) -> None:
    """The receiver was found at or below ``since``: its history is this journal's."""
    remove_state(state_dir / SERVED_ALONE_FILE)


def receiver_ahead(received: int, since: int) -> RefusedError | None:
    """The refusal when the receiver holds records past ``since`` (see the module)."""
    if received <= since:
        return None
    return RefusedError(
        f"the receiver holds records up to LSN {received}, past LSN {since} from which this "
        "sender served without it: this state folder is older than the replica (restored "
        "from a backup, or another state folder replicated the job), and its later records "
        "are not the ones the receiver has",
        hint="when the VM can pause, stop this sender and start it with a new --state-dir: "
        "it compares every volume with the replica and sends what differs",
    )
