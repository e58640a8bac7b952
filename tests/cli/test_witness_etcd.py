"""Automatic failover with etcd as the witness (``--witness etcd://HOST:PORT``): a real
etcd (Debian's etcd-server) on loopback, started and SIGKILLed by the tests."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from replicator.engine.witness_etcd import EtcdWitness
from replicator.engine.witness_state import Renewal
from tests.cli.test_witness import (
    AFTER,
    disk,  # noqa: F401 - a fixture
    procs,  # noqa: F401 - a fixture
    promoted_as,
    receiver_job,
    replicating_pair,
    start_sender,
    wait_for,
)
from tests.tools import LoggedPopen, b3, free_port, one_line_error, require_tool, wait_port

pytestmark = pytest.mark.tools


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A one-member etcd on free loopback ports, its data in tmp_path; SIGKILLed at the end.
    Its log (chatty: raft at info) goes to a file, which wait_port shows if it exits."""
    client, peer = free_port(), free_port()
    proc = LoggedPopen(
        [require_tool("etcd"), "--name", "witness", "--data-dir", str(tmp_path / "etcd"),
         "--listen-client-urls", f"http://127.0.0.1:{client}",
         "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"witness=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(client, proc)
        yield proc, f"etcd://127.0.0.1:{client}"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_etcd_the_target_promotes_when_the_source_key_is_gone(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
    etcd: tuple[subprocess.Popen[str], str],
) -> None:
    _, address = etcd
    rcv, sender = replicating_pair(tmp_path, disk, procs, address)
    time.sleep(2 * AFTER)
    assert receiver_job(rcv)["promoted"] is False  # the source holds its key

    sender.send_signal(signal.SIGKILL)
    sender.wait(timeout=10)
    killed = time.monotonic()
    # the key goes with its lease (3 x --witness-interval, rounded up to etcd's seconds)
    assert wait_for(promoted_as(rcv, 2), 10), receiver_job(rcv)
    assert time.monotonic() - killed > AFTER
    assert receiver_job(rcv)["generation"] == 2
    replica = rcv.dir / "vm1" / disk.name
    before = b3(replica)

    again = start_sender(rcv, tmp_path / "state", disk, address)
    procs.append(again)
    _, err = again.communicate(timeout=20)
    assert again.returncode == ExitCode.SPLIT_BRAIN, err[-2000:]
    assert "promoted" in one_line_error(err)  # by etcd's answer, or the receiver's refusal
    # etcd's answer to the old source's renewal (what stops it when the receiver is not
    # reachable from there)
    host, port = address.removeprefix("etcd://").rsplit(":", 1)

    async def renew() -> Renewal:
        old = EtcdWitness(host, int(port), who="test", lease_seconds=2)
        try:
            return await old.renew("vm1", 1)
        finally:
            await old.aclose()

    renewal = asyncio.run(renew())
    assert not renewal.ok and renewal.promoted_to == 2 and renewal.grantee.startswith("receiver@")
    assert b3(replica) == before
    assert rcv.stop() == 0


def test_etcd_down_promotes_nobody(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
    etcd: tuple[subprocess.Popen[str], str],
) -> None:
    server, address = etcd
    rcv, sender = replicating_pair(tmp_path, disk, procs, address)

    server.send_signal(signal.SIGKILL)
    server.wait(timeout=10)
    time.sleep(2 * AFTER)
    assert sender.poll() is None  # the source goes on replicating without its witness
    sender.send_signal(signal.SIGKILL)
    sender.wait(timeout=10)
    time.sleep(3 * AFTER)  # several timeouts
    job = receiver_job(rcv)
    assert job["promoted"] is False and job["generation"] == 1
    assert "witness cannot be reached" in str(job["last_error"])
    assert rcv.stop() == 0


def test_etcd_an_unbound_source_then_bound_to_a_receiver_without_identity(
    etcd: tuple[subprocess.Popen[str], str],
) -> None:
    """A source that says it has reached no replica leaves the replica key empty: no copy
    is promoted. Once it says it reached one that names none (a receiver from before
    replica identities), the key goes, and a target that says none is granted, as before."""
    host, port = etcd[1].removeprefix("etcd://").rsplit(":", 1)
    replica = "a" * 32

    async def run() -> None:
        source = EtcdWitness(host, int(port), who="source", lease_seconds=1)
        target = EtcdWitness(host, int(port), who="target", lease_seconds=1)
        try:
            assert (await source.renew("vm1", 1, replica=None, unbound=True)).ok
            refused = await target.may_promote("vm1", 1, 1.0, replica)
            assert not refused.granted and "reached no replica" in refused.reason, refused
            assert (await source.renew("vm2", 1, replica=None, unbound=True)).ok
            assert (await source.renew("vm2", 1, replica=None, unbound=False)).ok
            await source.aclose()  # its key expires (etcd's TTL, with some slack)
            deadline = time.monotonic() + 15
            while not (decision := await target.may_promote("vm2", 1, 1.0)).granted:
                assert "reached no replica" not in decision.reason, decision
                assert time.monotonic() < deadline, decision
                await asyncio.sleep(0.5)
        finally:
            await source.aclose()
            await target.aclose()

    asyncio.run(run())
