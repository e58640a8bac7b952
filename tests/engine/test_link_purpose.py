"""What each session purpose announces in its Hello: the receiver reads nothing else."""

from __future__ import annotations

from replicator.engine.link import SessionPurpose


def test_each_purpose_announces_its_capability() -> None:
    # Debian 12's Python 3.11.2 turned REPLICATE's old value, an empty tuple, into a bare
    # object(): every plain `send` failed there with "'object' object is not iterable".
    assert SessionPurpose.REPLICATE.capabilities == ()
    assert SessionPurpose.RESYNC.capabilities == ("resync",)
    assert SessionPurpose.VERIFY.capabilities == ("verify",)
    assert SessionPurpose.FAILBACK.capabilities == ("failback",)
    assert len({p.value for p in SessionPurpose}) == len(SessionPurpose)  # no aliases
