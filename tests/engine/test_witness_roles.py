"""The receiver's automatic failover (engine/witness_roles.py, ``AutoFailover``): what it
logs while the witness refuses."""

from __future__ import annotations

from typing import cast

from structlog.testing import capture_logs

from replicator.engine.receiver import Receiver
from replicator.engine.witness_client import Witness
from replicator.engine.witness_roles import AutoFailover


class _Where:
    where = "127.0.0.1:7080"


def test_a_refusal_is_logged_once_while_only_its_figures_change() -> None:
    """A source cut off from its target but renewing: the target asks once a second and
    each answer says how long ago the source renewed. Each was logged (a warning a second,
    for as long as the partition lasts); the same refusal is now said once, and a new one
    again."""
    auto = AutoFailover(cast(Receiver, None), cast(Witness, _Where()), 2.0)
    reasons = [
        f"the source renewed its lease {ago}s ago; promotion needs more than 1.6s "
        "(until the source has fenced itself)"
        for ago in ("0.3", "0.1", "1.2", "0.4")
    ]
    reasons.append("generation 1 of job 'vm1' was granted to 'receiver@b:/srv'")
    with capture_logs() as logs:
        for why in reasons:
            auto._say("vm1", "receiver.auto_failover_refused", why)
    said = [e for e in logs if e["event"] == "receiver.auto_failover_refused"]
    assert [e["why"] for e in said] == [reasons[0], reasons[-1]]
