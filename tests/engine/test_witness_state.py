"""The built-in witness's state machine (engine/witness_state.py) and its server's
answers (engine/witness_server.py): never two grants for one job generation, also
across restarts; a source renewing is never overtaken; a promoted source is told."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.engine import witness_server
from replicator.engine.witness_server import WitnessServer
from replicator.engine.witness_state import STATE_FILE, WitnessBook, fence_wait
from replicator.journal import durable
from replicator.journal.durable import StateFileError, read_state
from tests.journal.helpers import FirstWriteHeld

JOBS = ("vm1", "vm2")
WHO = ("target-a", "target-b", "target-c")

# one step: (kind, job, generation, requester, seconds that pass first)
steps = st.lists(
    st.tuples(
        st.sampled_from(("renew", "promote", "restart")),
        st.sampled_from(JOBS),
        st.integers(0, 3),
        st.sampled_from(WHO),
        st.floats(0, 4, allow_nan=False),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps, st.floats(0.5, 3, allow_nan=False))
def test_never_two_grants_for_one_generation(script: list[tuple[str, str, int, str, float]],
                                             after: float) -> None:  # fmt: skip
    now = 0.0
    book = WitnessBook(started=now)
    saved = book.to_state()
    granted: dict[tuple[str, int], set[str]] = {}
    last_renewal: dict[str, float] = {}
    for kind, job, gen, who, wait in script:
        now += wait
        if kind == "restart":  # what was durably written survives, leases do not
            book = WitnessBook.from_state(saved, started=now)
            last_renewal.clear()
            continue
        if kind == "renew":
            renewal = book.renew(job, gen, now)
            later = [g for (j, g) in granted if j == job and g >= gen]
            assert renewal.ok == (not later)  # told exactly when a grant overtook it
            if renewal.ok:
                last_renewal[job] = now
            continue
        decision = book.decide(job, gen, after, who, now)
        if decision.new:
            book.record(job, gen, who)
            saved = book.to_state()  # the server writes it before answering
        if decision.granted:
            granted.setdefault((job, gen), set()).add(who)
            # a grant only after the source was quiet for longer than `after`
            if decision.new and job in last_renewal:
                assert now - last_renewal[job] > after
    for (job, gen), whom in granted.items():
        assert len(whom) == 1, f"{job} generation {gen} granted to {whom}"


def test_quiet_time_counts_from_the_witness_start_after_a_restart() -> None:
    book = WitnessBook(started=100.0)
    assert not book.decide("vm1", 0, 5.0, "t", 104.0).granted  # may have renewed meanwhile
    assert book.decide("vm1", 0, 5.0, "t", 105.5).granted


def test_renewal_keeps_the_target_waiting_and_a_grant_stops_the_source() -> None:
    book = WitnessBook(started=0.0)
    assert book.renew("vm1", 1, 10.0).ok
    refused = book.decide("vm1", 1, 2.0, "t", 11.0)
    assert not refused.granted and "renewed its lease 1.0s ago" in refused.reason
    decision = book.decide("vm1", 1, 2.0, "t", 12.5)
    assert decision.granted and decision.new
    book.record("vm1", 1, "t")
    stale = book.renew("vm1", 1, 13.0)
    assert not stale.ok and stale.promoted_to == 2 and stale.grantee == "t"
    assert book.renew("vm1", 2, 13.0).ok  # the source after failback holds the new history
    assert not book.decide("vm1", 1, 2.0, "other", 20.0).granted
    assert book.decide("vm1", 1, 2.0, "t", 20.0).granted  # the same target, asking again


async def test_server_writes_the_grant_before_answering_and_keeps_it(tmp_path: Path) -> None:
    server = WitnessServer(tmp_path)
    server.book.started -= 10  # the witness has run for 10 s without a renewal for vm1
    ask = {"op": "promote", "job": "vm1", "generation": 3, "after": 2.0, "who": "a"}
    assert await server.answer(ask, None) == {"granted": True, "generation": 4}
    assert read_state(tmp_path / STATE_FILE) == {"grants": {"vm1": [[3, "a"]]}}
    restarted = WitnessServer(tmp_path)
    restarted.book.started -= 10
    other = await restarted.answer({**ask, "who": "b"}, None)
    assert other["granted"] is False and "granted to 'a'" in str(other["reason"])
    # with TLS the certificate names the requester, whatever the message says
    assert (await restarted.answer({**ask, "who": "b"}, "a"))["granted"] is True
    renewal = await restarted.answer({"op": "renew", "job": "vm1", "generation": 3}, None)
    assert renewal == {"ok": False, "promoted_to": 4, "grantee": "a"}
    bad = await restarted.answer({"op": "renew", "job": "../x", "generation": 1}, None)
    assert "bad request" in str(bad["error"])


async def test_over_mutual_tls_the_certificate_names_the_requester(tmp_path: Path) -> None:
    """Both clients and the witness with keygen's files: the grant goes to the certificate
    name, and a client without a certificate of the CA gets no answer."""
    import asyncio

    from replicator.engine import keys
    from replicator.engine.errors import ConnectError
    from replicator.engine.tls import TlsIdentity
    from replicator.engine.witness_client import BuiltinWitness

    keys.keygen(tmp_path / "keys", ["witness", "receiver", "sender"])
    keys.keygen(tmp_path / "other", ["receiver"])  # another CA
    witness = WitnessServer(tmp_path / "state")
    witness.book.started -= 10
    tls = TlsIdentity(tmp_path / "keys", "witness", server=True)
    server = await asyncio.start_server(witness.handle, "127.0.0.1", 0, ssl=tls.load())
    port = server.sockets[0].getsockname()[1]

    def client(folder: str, name: str) -> BuiltinWitness:
        identity = TlsIdentity(tmp_path / folder, name, server=False, peer="witness")
        identity.load()
        return BuiltinWitness("127.0.0.1", port, who="claims-anything", tls=identity)

    try:
        assert (await client("keys", "sender").renew("vm1", 0)).ok
        witness.book.leases.clear()  # as if the source had been silent since the start
        assert (await client("keys", "receiver").may_promote("vm1", 0, 2.0)).granted
        assert witness.book.grants == {"vm1": {0: "receiver"}}
        stale = await client("keys", "sender").renew("vm1", 0)
        assert not stale.ok and stale.promoted_to == 1 and stale.grantee == "receiver"
        with pytest.raises(ConnectError):
            await client("other", "receiver").may_promote("vm1", 0, 2.0)
    finally:
        server.close()
        await server.wait_closed()


async def test_another_certificate_of_the_ca_can_neither_pose_as_the_witness_nor_use_it(
    tmp_path: Path,
) -> None:
    """A host holding only ``site-b``'s key: serving as the witness, its clients refuse it
    before sending anything (the request would keep a lease alive or take a grant); asking
    a witness whose ``--allow`` rules give it nothing, it is refused and changes nothing."""
    import asyncio

    from replicator.engine import keys
    from replicator.engine.authz import Allow
    from replicator.engine.errors import PeerProtocolError
    from replicator.engine.tls import PeerNameError, TlsIdentity
    from replicator.engine.witness_client import BuiltinWitness

    keys.keygen(tmp_path / "keys", ["witness", "receiver", "sender", "site-b"])
    rules = [Allow("sender", "vm1"), Allow("receiver", "vm1"), Allow("site-b", "vm2")]
    witness = WitnessServer(tmp_path / "state", rules)
    witness.book.started -= 10
    impostor = WitnessServer(tmp_path / "impostor")
    servers = []
    for book, name in ((witness, "witness"), (impostor, "site-b")):
        tls = TlsIdentity(tmp_path / "keys", name, server=True)
        servers.append(await asyncio.start_server(book.handle, "127.0.0.1", 0, ssl=tls.load()))
    port, impostor_port = (server.sockets[0].getsockname()[1] for server in servers)

    def client(name: str, at: int, peer: str = "witness") -> BuiltinWitness:
        identity = TlsIdentity(tmp_path / "keys", name, server=False, peer=peer)
        identity.load()
        return BuiltinWitness("127.0.0.1", at, who="claims-anything", tls=identity)

    try:
        with pytest.raises(PeerNameError, match="presented certificate 'site-b', not 'witness'"):
            await client("sender", impostor_port).renew("vm1", 0, 4.0)
        with pytest.raises(PeerNameError, match="--witness-peer site-b"):
            await client("receiver", impostor_port).may_promote("vm1", 0, 2.0)
        assert impostor.book.leases == {} and impostor.book.fences == {}
        assert not impostor.path.exists()  # a renewal declaring fence_after writes it
        # the same witness named on purpose is asked
        assert (await client("sender", impostor_port, peer="site-b").renew("vm1", 0, 4.0)).ok
        assert impostor.book.fences == {"vm1": 4.0}

        # the real witness: site-b may not keep vm1's lease alive nor take its grant
        for ask in (
            client("site-b", port).renew("vm1", 0, 4.0),
            client("site-b", port).may_promote("vm1", 0, 2.0),
        ):
            with pytest.raises(PeerProtocolError, match="'site-b' may not renew or promote"):
                await ask
        assert witness.book.leases == {} and witness.book.grants == {}
        assert witness.book.fences == {}
        assert (await client("site-b", port).renew("vm2", 0)).ok  # its own job
        assert (await client("sender", port).renew("vm1", 0)).ok
        witness.book.leases.pop("vm1")
        assert (await client("receiver", port).may_promote("vm1", 0, 2.0)).granted
        assert witness.book.grants == {"vm1": {0: "receiver"}}
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


# -- source self-fencing: the source declares fence_after with its renewals ---------------

fence_steps = st.lists(
    st.tuples(
        st.sampled_from(("renew", "promote", "restart")),
        st.sampled_from((None, 0.5, 2.0, 6.0)),  # the fence_after a renewal declares
        st.floats(0, 4, allow_nan=False),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(fence_steps, st.floats(0.1, 3, allow_nan=False))
def test_never_granted_before_the_source_has_fenced_itself(
    script: list[tuple[str, float | None, float]], after: float
) -> None:
    """Whatever the target's ``after``, a grant comes only once the source's last
    renewal (or the witness's start) is more than fence_after + margin old."""
    now = 0.0
    book = WitnessBook(started=now)
    saved = book.to_state()
    last_heard = now  # the source's last renewal, or the witness's (re)start
    declared: float | None = None
    for kind, fence_after, wait in script:
        now += wait
        if kind == "restart":
            book = WitnessBook.from_state(saved, started=now)
            last_heard = now
            continue
        if kind == "renew":
            if book.declare_fence("vm1", fence_after):
                saved = book.to_state()  # the server writes it before answering
            declared = fence_after
            if book.renew("vm1", 0, now).ok:
                last_heard = now
            continue
        decision = book.decide("vm1", 0, after, "t", now)
        if decision.new:
            book.record("vm1", 0, "t")
            saved = book.to_state()
            assert now - last_heard > max(after, fence_wait(declared))


def test_a_promotion_waits_until_the_source_has_fenced_itself() -> None:
    book = WitnessBook(started=0.0)
    book.declare_fence("vm1", 4.0)
    assert book.renew("vm1", 1, 10.0).ok
    assert fence_wait(4.0) == 5.0 and fence_wait(10.0) == 12.5  # 1 s, or 25 % when more
    early = book.decide("vm1", 1, 1.0, "t", 12.0)  # the target's own 1 s is long past
    assert not early.granted and "until the source has fenced itself" in early.reason
    assert not book.decide("vm1", 1, 1.0, "t", 15.0).granted  # exactly 5 s: not more
    assert book.decide("vm1", 1, 1.0, "t", 15.1).granted
    assert book.decide("vm1", 1, 9.0, "t", 15.1).granted is False  # a longer `after` wins


def test_declared_fences_survive_a_restart_and_an_old_source_clears_them() -> None:
    book = WitnessBook(started=0.0)
    assert book.declare_fence("vm1", 4.0) and not book.declare_fence("vm1", 4.0)
    state = book.to_state()
    assert state["fences"] == {"vm1": 4.0}
    restarted = WitnessBook.from_state(state, started=100.0)
    # nothing heard since the restart: counted from the witness's start, fence included
    assert not restarted.decide("vm1", 1, 1.0, "t", 104.0).granted
    assert restarted.decide("vm1", 1, 1.0, "t", 105.5).granted
    # a renewal without fence_after (a source that does not fence): as before
    assert restarted.declare_fence("vm1", None)
    assert "fences" not in restarted.to_state()
    assert WitnessBook.from_state({"grants": {}}, started=0.0).fences == {}  # older files
    with pytest.raises(StateFileError):
        WitnessBook.from_state({"grants": {}, "fences": {"vm1": -1}}, started=0.0)


async def test_server_keeps_a_declared_fence_durably(tmp_path: Path) -> None:
    server = WitnessServer(tmp_path)
    server.book.started -= 10  # the witness has run for 10 s
    renew = {"op": "renew", "job": "vm1", "generation": 1, "who": "s"}
    assert await server.answer({**renew, "fence_after": 0.6}, None) == {"ok": True}
    assert read_state(tmp_path / STATE_FILE) == {"grants": {}, "fences": {"vm1": 0.6}}
    for bad in (0, -1, "2", True):
        answer = await server.answer({**renew, "fence_after": bad}, None)
        assert "'fence_after' must be a positive number" in str(answer["error"])
    server.book.leases["vm1"] = (1, server.book.leases["vm1"][1] - 1.2)  # renewed 1.2 s ago
    promote = {"op": "promote", "job": "vm1", "generation": 1, "after": 0.5, "who": "t"}
    refused = await server.answer(promote, None)
    assert refused["granted"] is False and "fenced itself" in str(refused["reason"])
    server.book.leases["vm1"] = (1, server.book.leases["vm1"][1] - 0.5)  # 1.7 s > 0.6 + 1
    assert (await server.answer(promote, None))["granted"] is True


async def test_a_request_timed_out_in_its_write_cannot_undo_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``handle`` gives up on a request after REQUEST_TIMEOUT, also during its write of
    witness.state; the lock is then free and the next request writes the file. The timed
    out write must have ended by then: landing after it, it would take back a grant (a
    restarted witness could grant that generation again: two primaries)."""
    server = WitnessServer(tmp_path)
    server.book.started -= 10  # the witness has run for 10 s without a renewal
    held = FirstWriteHeld(durable.write_state)
    monkeypatch.setattr(durable, "write_state", held)
    renew = {"op": "renew", "job": "vm1", "generation": 1, "who": "s", "fence_after": 0.6}
    timed_out = asyncio.create_task(server.answer(renew, None))
    await held.wait_started()
    timed_out.cancel()  # what asyncio.timeout(REQUEST_TIMEOUT) does
    with pytest.raises(asyncio.CancelledError):
        await timed_out
    promote = {"op": "promote", "job": "vm2", "generation": 3, "after": 2.0, "who": "t"}
    assert await server.answer(promote, None) == {"granted": True, "generation": 4}
    await asyncio.get_running_loop().shutdown_default_executor()
    assert read_state(tmp_path / STATE_FILE) == {
        "grants": {"vm2": [[3, "t"]]},
        "fences": {"vm1": 0.6},
    }


A, B = "a" * 32, "b" * 32  # two replica identities (engine/replica_id.py)


def test_only_the_replica_the_source_declared_is_promoted() -> None:
    book = WitnessBook(started=0.0)
    assert book.declare_replica("vm1", A) and not book.declare_replica("vm1", A)
    assert not book.declare_replica("vm1", None)  # a renewal that does not say keeps it
    assert book.renew("vm1", 1, 10.0).ok
    other = book.decide("vm1", 1, 1.0, "old-target", 20.0, B)
    assert not other.granted and f"replicates to replica {A}; this is replica {B}" in other.reason
    assert book.decide("vm1", 1, 1.0, "target", 20.0, A).granted
    older = book.decide("vm1", 1, 1.0, "older-target", 20.0)  # says none: cannot show it
    assert not older.granted and "does not say which replica it is" in older.reason
    assert WitnessBook(started=0.0).decide("vm1", 1, 1.0, "t", 20.0).granted  # none declared
    state = book.to_state()
    assert state["replicas"] == {"vm1": A}
    restarted = WitnessBook.from_state(state, started=100.0)  # the source dead meanwhile
    assert not restarted.decide("vm1", 1, 1.0, "old-target", 200.0, B).granted
    assert WitnessBook.from_state({"grants": {}}, started=0.0).replicas == {}  # older files
    for bad in ({"vm1": "xyz"}, {"vm1": 3}, ["vm1"]):
        with pytest.raises(StateFileError):
            WitnessBook.from_state({"grants": {}, "replicas": bad}, started=0.0)


async def test_server_keeps_the_declared_replica_durably(tmp_path: Path) -> None:
    server = WitnessServer(tmp_path)
    renew = {"op": "renew", "job": "vm1", "generation": 1, "who": "s", "replica": A}
    assert await server.answer(renew, None) == {"ok": True}
    assert read_state(tmp_path / STATE_FILE) == {"grants": {}, "replicas": {"vm1": A}}
    bad = await server.answer({**renew, "replica": "../x"}, None)
    assert "'replica' must be a replica identity" in str(bad["error"])
    restarted = WitnessServer(tmp_path)
    restarted.book.started -= 10  # the source is gone: 10 s without a renewal
    promote = {"op": "promote", "job": "vm1", "generation": 1, "after": 2.0, "who": "old"}
    refused = await restarted.answer({**promote, "replica": B}, None)
    assert refused["granted"] is False and "another copy of the job" in str(refused["reason"])
    assert (await restarted.answer({**promote, "who": "t", "replica": A}, None))["granted"]


async def test_a_copy_under_the_same_certificate_is_not_granted_again(tmp_path: Path) -> None:
    """With TLS the requester is its certificate name, and keygen names every receiver
    `receiver`: the old copy of the job on another host asked as the same requester as the
    real target, and was told "yes" again after the real target's grant (the answer it
    "may have lost"): both promoted, two primaries."""
    server = WitnessServer(tmp_path)
    server.book.started -= 20
    renew = {"op": "renew", "job": "vm1", "generation": 1, "who": "s", "replica": A}
    assert await server.answer(renew, "sender") == {"ok": True}
    server.book.leases["vm1"] = (1, server.book.leases["vm1"][1] - 10)  # gone 10 s ago
    promote = {"op": "promote", "job": "vm1", "generation": 1, "after": 2.0, "who": "x"}
    assert (await server.answer({**promote, "replica": A}, "receiver"))["granted"] is True
    again = await server.answer({**promote, "replica": B}, "receiver")
    assert again["granted"] is False and "another copy of the job" in str(again["reason"])
    assert (await server.answer({**promote, "replica": A}, "receiver"))["granted"] is True


def test_a_grant_binds_the_replica_that_asked() -> None:
    """A source that never declared its replica (from before, or gone before its first
    session said it): the grant's replica is the job's, so a copy asking as the same
    requester (one certificate on two hosts) is not granted again."""
    book = WitnessBook(started=0.0)
    assert book.decide("vm1", 1, 1.0, "receiver", 5.0, A).new
    book.record("vm1", 1, "receiver", A)
    again = book.decide("vm1", 1, 1.0, "receiver", 6.0, B)
    assert not again.granted and "another copy of the job" in again.reason
    assert book.decide("vm1", 1, 1.0, "receiver", 6.0, A).granted
    assert WitnessBook.from_state(book.to_state(), 10.0).replicas == {"vm1": A}
    book.forget("vm1", 1, None)  # its write failed: as before
    assert book.grants == {"vm1": {}} and book.replicas == {}


def test_no_copy_is_promoted_while_the_source_has_reached_no_replica() -> None:
    """A source whose state folder never had a session says so ("unbound"): every copy
    that asks is refused, also one the job's earlier source declared, until it names the
    replica it reached (or says it reached one that names none: a receiver from before)."""
    book = WitnessBook(started=0.0)
    assert book.declare_replica("vm1", A)  # an earlier source of the job
    assert book.declare_replica("vm1", None, unbound=True)
    assert not book.declare_replica("vm1", None, unbound=True)  # unchanged: no write
    assert not book.declare_replica("vm1", None)  # an older source says neither
    assert book.renew("vm1", 1, 10.0).ok
    for replica in (A, B, None):
        refused = book.decide("vm1", 1, 1.0, "target", 20.0, replica)
        assert not refused.granted and "reached no replica" in refused.reason, replica
    restarted = WitnessBook.from_state(book.to_state(), started=0.0)
    assert restarted.unbound == {"vm1"} and book.to_state()["unbound"] == ["vm1"]
    assert not restarted.decide("vm1", 1, 1.0, "target", 20.0, A).granted
    assert book.declare_replica("vm1", B)  # it reached its target
    assert book.unbound == set() and "unbound" not in book.to_state()
    assert book.decide("vm1", 1, 1.0, "target", 20.0, B).granted
    old_receiver = WitnessBook(started=0.0)
    assert old_receiver.declare_replica("vm1", None, unbound=True)
    assert old_receiver.declare_replica("vm1", None, unbound=False)
    assert old_receiver.decide("vm1", 1, 1.0, "target", 20.0).granted
    with pytest.raises(StateFileError):
        WitnessBook.from_state({"grants": {}, "unbound": "vm1"}, started=0.0)


async def test_server_keeps_an_unbound_source_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = WitnessServer(tmp_path)
    renew = {"op": "renew", "job": "vm1", "generation": 1, "who": "s", "unbound": True}
    assert await server.answer(renew, None) == {"ok": True}
    assert read_state(tmp_path / STATE_FILE) == {"grants": {}, "unbound": ["vm1"]}
    bad = await server.answer({**renew, "unbound": 1}, None)
    assert "'unbound' must be true or false" in str(bad["error"])
    restarted = WitnessServer(tmp_path)
    restarted.book.started -= 10  # the source is gone: 10 s without a renewal
    promote = {"op": "promote", "job": "vm1", "generation": 1, "after": 2.0, "who": "t"}
    refused = await restarted.answer({**promote, "replica": A}, None)
    assert refused["granted"] is False and "reached no replica" in str(refused["reason"])

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(witness_server, "write_state_async", full)
    failed = await restarted.answer({**renew, "unbound": False, "replica": A}, None)
    assert "cannot write" in str(failed["error"])
    assert restarted.book.unbound == {"vm1"} and restarted.book.replicas == {}  # rolled back
