"""What ``--target-rpo``'s pacer (``Shaping.pace_once``) reads of a sending job: how many
bytes the receiver has not applied yet and how old the oldest of them is.

The age is the link's lag (``SenderCore.lag``: the source time of the oldest record not
applied, shipped or read for shipping). The bytes are estimated from the journal without
reading it: the journal keeps whole segments until every record in them is applied, so
its size overstates the backlog by up to a segment (64 MiB); the records not applied
(``last_lsn - applied``) are its share of the records it holds, in proportion. That is
exact for records of one size, and close for a mix. A first sync is not in the journal
(``Link.ship_direct``): its backlog is what was shipped or queued and not applied, plus
what its scan has still to read (all of which it may have to send).
"""

from __future__ import annotations

from collections.abc import Callable

from replicator.engine.status import SenderJobStatus


def backlog_probe(status: SenderJobStatus) -> Callable[[], tuple[float, float] | None]:
    """A ``Shaping.probe`` for ``status``'s job: None while it has no connection."""

    def probe() -> tuple[float, float] | None:
        link, journal = status.link, status.journal
        if link is None or journal is None or link.core is None:
            return None
        age = float(link.lag()["seconds"])
        backlog = unapplied_bytes(journal.bytes_used, journal.first_lsn,
                                  journal.last_lsn, link.applied_lsn)  # fmt: skip
        backlog += link.direct_backlog()
        if link.direct_lsn > link.applied_lsn and status.progress is not None:
            done, total = status.progress  # a first sync: the rest of the scan may follow
            backlog += max(0, total - done)
        return float(backlog), age

    return probe


def unapplied_bytes(used: int, first: int, last: int, applied: int) -> int:
    """Bytes of the records after ``applied``, of a journal of ``used`` bytes holding the
    records ``first..last`` (an estimate: see the module docstring)."""
    held = last - first + 1
    behind = last - max(applied, first - 1)
    if held <= 0 or behind <= 0:
        return 0
    return used * behind // held
