"""A receiver that lacks records no journal here holds (docs/PROTOCOL.md, "Records the
receiver lost").

The sender keeps what it journaled until the receiver has applied it, so a receiver that
lost records to a damaged journal gets them again. A scan's records travel without the
journal, though (``Link.ship_direct``): only its EPOCH is journaled, once the receiver
holds the rest. A receiver that loses some of them after acknowledging them would get
that EPOCH again across the gap, and a replica without them would be a consistency point;
the sender's manifests, saved after that EPOCH, would never send them again either.

So each connect looks for LSNs above the receiver's position that the journal does not
hold, below a record it does hold (``receiver_gap``). When there is one, the sender notes
durably that the replica must be compared (``compare.state``: every session takes the
replica's manifests as its basis until a comparison's manifests are saved), and tells the
receiver that no barrier below the journal's next LSN ends a consistency point
(PointFloor), before it ships anything.
"""

from __future__ import annotations

from pathlib import Path

from replicator.engine.errors import RefusedError
from replicator.journal import Journal
from replicator.journal.durable import StateFileError, read_state, remove_state, write_state

FILE_NAME = "compare.state"


async def receiver_gap(journal: Journal, received: int) -> tuple[int, int] | None:
    """The first LSNs above ``received`` that ``journal`` does not hold, below a record it
    does hold: the receiver would see a gap before that record. None when there is none."""
    await journal.sync()  # every record appended counts
    expected = received + 1
    for first, last in await journal.runs_after(received):
        if first > expected:
            return expected, first - 1
        expected = last + 1
    return None


def why(gap: tuple[int, int]) -> str:
    return f"the receiver lacks lsn {gap[0]} to {gap[1]}, which no journal here holds"


def load(state_dir: Path) -> str | None:
    """Why the replica must be compared, or None. A damaged note says so (the safe side:
    a comparison costs reading the replica; a wrong basis could cost it)."""
    try:
        raw = read_state(state_dir / FILE_NAME)
    except StateFileError as exc:
        return f"{FILE_NAME} is damaged ({exc})"
    if raw is None:
        return None
    reason = raw.get("why")
    return reason if isinstance(reason, str) and reason else "the replica must be compared"


def save(state_dir: Path, reason: str) -> None:
    """Durably note that the replica must be compared (blocking)."""
    write_state(state_dir / FILE_NAME, {"why": reason})


def clear(state_dir: Path) -> None:
    """A comparison's manifests are saved (blocking)."""
    remove_state(state_dir / FILE_NAME)


def refusal(gap: tuple[int, int]) -> RefusedError:
    """For a session that compares nothing (a live sender reconnecting, ``verify``)."""
    return RefusedError(
        f"{why(gap)}: it lost its state or records it had acknowledged (its job folders "
        "deleted or restored from an old backup, or its journal damaged), and only a "
        "comparison can bring the replica level",
        hint="restart this sender (when its VM can pause, for a live one): it compares "
        "every volume with the replica and sends what differs",
    )
