"""Two receivers asking the witness about the same job name: only the replica the source
replicates to may be promoted (docs/WITNESS.md, "Rules"). Real `replicator witness`,
`receive --auto-failover-after` and `send --witness` processes; the sender is SIGKILLed."""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from replicator.engine.witness_client import BuiltinWitness
from replicator.engine.witness_etcd import UNBOUND
from replicator.journal.durable import read_state
from tests.cli.test_witness import (  # noqa: F401  (fixtures)
    AFTER,
    LEASE,
    declared,
    disk,
    procs,
    promoted_as,
    receiver_job,
    replicating,
    replicating_pair,
    start_sender,
    start_witness,
    wait_for,
    witness_replica,
)
from tests.cli.test_witness_etcd import etcd  # noqa: F401  (a fixture)
from tests.faultfs import FaultFS
from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    b3,
    free_port,
    qemu_io,
    replicator,
    send_once,
    start_receiver,
    stop_and_read,
    wait_port,
)


def test_a_stale_replica_of_the_same_job_elsewhere_is_never_promoted(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
) -> None:
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    stale_copy_is_never_promoted(tmp_path, disk, procs, address, 3.0)


@pytest.mark.tools
def test_etcd_a_stale_replica_of_the_same_job_elsewhere_is_never_promoted(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
    etcd: tuple[subprocess.Popen[str], str],  # noqa: F811
) -> None:
    # the source's key outlives its lease's TTL by up to a few seconds (etcd's minimum TTL
    # and its expiry checks): the real target waits well past that
    stale_copy_is_never_promoted(tmp_path, disk, procs, etcd[1], 8.0)


def stale_copy_is_never_promoted(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
    address: str,
    after: float,
) -> None:
    """Another receiver holds an old replica of job vm1 (a first try, a decommissioned
    target) and runs with automatic failover against the same witness, quicker than the
    real target. When the source dies it asks first: before, the witness granted it, that
    old copy became the primary, every write since was lost and the real target was
    refused for good ("granted to ..."). The source declares its replica at each renewal;
    the witness grants only that one."""
    old = start_receiver(tmp_path / "old-target")
    procs.append(old.proc)
    send_once(old, "vm1", tmp_path / "old-state", disk)  # its copy: 0x11 only
    assert old.stop() == 0

    qemu_io("qcow2", disk, "write -P 0x22 4M 1M")  # written after the old copy was made
    rcv, sender = replicating_pair(
        tmp_path, disk, procs, address, receive_args=("--auto-failover-after", str(after))
    )
    quick = ("--auto-failover-after", "0.5", "--witness", address)
    old = start_receiver(tmp_path / "old-target", port=old.port, security=("--insecure", *quick))
    procs.append(old.proc)
    time.sleep(1.5)  # the old target asks, and is refused, while the source renews
    sender.send_signal(signal.SIGKILL)
    sender.wait(timeout=10)
    assert wait_for(lambda: receiver_job(rcv)["promoted"] is True, 20), {
        k: receiver_job(old)[k] for k in ("promoted", "generation", "state")
    }
    assert receiver_job(old)["promoted"] is False
    assert b3(rcv.dir / "vm1" / disk.name) == b3(disk)  # the 0x22 write is there
    code, err = stop_and_read(old.proc)
    assert code == 0, err[-2000:]
    assert "receiver.auto_failover_refused" in err and "replicates to replica" in err, err[-2000:]
    assert rcv.stop() == 0


def test_a_replica_that_cannot_be_promoted_asks_the_witness_for_nothing(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
) -> None:
    """The source is gone and the target's replica is no consistency point (here a file
    changed on the target outside replication): promoting it is refused. It used to ask the
    witness first and be granted: the grant stayed, the promotion failed, and the source,
    back, was told the target had been promoted (exit 11, its VM's writes failed): no
    primary at all. Now it says why it waits and asks nothing; once the replica can be
    promoted (here: the source back, replicating again), nothing was lost."""
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    rcv, sender = replicating_pair(tmp_path, disk, procs, address)
    sender.send_signal(signal.SIGKILL)
    sender.wait(timeout=10)
    replica = rcv.dir / "vm1" / disk.name
    with replica.open("r+b") as f:  # someone opened it on the target
        f.seek(0, 2)
        f.write(b"\0")
    time.sleep(3 * 1.5 + 2)  # --auto-failover-after 1.5: it would have asked by now
    job = receiver_job(rcv)
    assert job["promoted"] is False, job
    assert "automatic failover waits" in str(job["last_error"]), job
    host, port = address.rsplit(":", 1)
    source = BuiltinWitness(host, int(port), who="source", tls=None)
    assert asyncio.run(source.renew("vm1", 1)).ok  # the source, back, is still the primary
    code, err = stop_and_read(rcv.proc)
    assert code == 0, err[-2000:]
    assert err.count("receiver.auto_failover_waiting") == 1, err[-3000:]


def test_over_tls_a_copy_holding_the_same_certificate_is_not_promoted_too(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
) -> None:
    """Under TLS the witness knows a requester by its certificate, and keygen names every
    receiver's `receiver`: the old copy of the job, asking after the real target's grant,
    was "the same requester asking again" and was promoted as well (two primaries)."""
    keys = tmp_path / "keys"
    for extra in ((), ("--name", "witness")):
        made = replicator("keygen", "--out", str(keys), *extra)
        assert made.returncode == 0, made.stderr
    tls = ("--tls-dir", str(keys))
    port = free_port()
    witness = subprocess.Popen(
        [*REPLICATOR, "witness", "--listen", f"127.0.0.1:{port}", "--dir",
         str(tmp_path / "witness"), *tls],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=ENV,
    )  # fmt: skip
    procs.append(witness)
    wait_port(port, witness)
    address = f"127.0.0.1:{port}"
    old = start_receiver(tmp_path / "old-target", security=tls)
    procs.append(old.proc)
    send_once(old, "vm1", tmp_path / "old-state", disk, security=tls)
    assert old.stop() == 0
    qemu_io("qcow2", disk, "write -P 0x22 4M 1M")
    auto = ("--auto-failover-after", "3", "--witness", address)
    rcv = start_receiver(tmp_path / "target", security=(*tls, *auto))
    procs.append(rcv.proc)
    sender = subprocess.Popen(
        [*REPLICATOR, "send", "--to", rcv.address, "--job", "vm1", "--state-dir",
         str(tmp_path / "state"), *tls, "--interval", "0.2", "--witness", address, *LEASE,
         str(disk)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=ENV,
    )  # fmt: skip
    procs.append(sender)
    assert wait_for(replicating(rcv), 30), "the sender never replicated"
    # declared at its session's start, by a renewal that may still be on its way
    assert wait_for(declared(tmp_path, address, rcv), 30), witness_replica(tmp_path, address)
    quick = ("--auto-failover-after", "0.5", "--witness", address)
    old = start_receiver(tmp_path / "old-target", port=old.port, security=(*tls, *quick))
    procs.append(old.proc)
    time.sleep(1.5)
    sender.send_signal(signal.SIGKILL)
    sender.wait(timeout=10)
    assert wait_for(lambda: receiver_job(rcv)["promoted"] is True, 20), receiver_job(rcv)
    time.sleep(3)  # the old copy asks again, once a second
    assert receiver_job(old)["promoted"] is False
    assert b3(rcv.dir / "vm1" / disk.name) == b3(disk)
    assert old.stop() == 0 and rcv.stop() == 0


def test_a_receiver_restarted_with_its_folder_spelled_otherwise_keeps_its_grant(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
) -> None:
    """The witness grants the target, whose promotion then fails (EIO on promoted.state),
    and the receiver dies before it could promote. Restarted on the same folder reached
    through a symlink (as a service file may name it), it is the requester the grant was
    given to and is promoted. Its name at the witness was `--dir` as typed: it was refused
    for good ("generation 1 of job 'vm1' was granted to 'receiver@HOST:/.../target'"),
    and nothing could promote the job but `failover --force`."""
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    auto = ("--insecure", "--auto-failover-after", str(AFTER), "--witness", address)
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        folder = fs.mountpoint / "target"
        rcv = start_receiver(folder, security=auto)
        procs.append(rcv.proc)
        sender = start_sender(rcv, tmp_path / "state", disk, address)
        procs.append(sender)
        assert wait_for(replicating(rcv), 30), "the sender never replicated"
        # declared at its session's start, by a renewal that may still be on its way: killed
        # before it lands, the source leaves the witness refusing every copy
        assert wait_for(declared(tmp_path, address, rcv), 30), witness_replica(tmp_path, address)
        rule = fs.add("write", errno.EIO, path="*promoted.state*")
        sender.send_signal(signal.SIGKILL)
        sender.wait(timeout=10)
        fs.wait_for_hit(rule)  # granted, then the promotion failed
        rcv.proc.send_signal(signal.SIGKILL)  # and the receiver died before it promoted
        rcv.proc.wait(timeout=10)
        fs.clear()
        grants = read_state(tmp_path / "witness" / "witness.state")
        assert grants is not None and [g for _, g in grants["grants"]["vm1"]] == [
            f"receiver@{socket.gethostname()}:{folder}"
        ], grants

        link = tmp_path / "replicas"
        link.symlink_to(folder)
        again = start_receiver(link, port=rcv.port, security=auto)
        procs.append(again.proc)
        assert wait_for(promoted_as(again, 2), 15), receiver_job(again)
        code, err = stop_and_read(again.proc)
        assert code == 0, err[-2000:]
        assert "receiver.auto_failover_refused" not in err, err[-2000:]


def test_a_receivers_name_at_the_witness_is_its_folder_not_its_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every spelling of one folder names one requester; another folder (a copy) another."""
    from replicator.cli.witness_opts import receiver_requester

    folder = tmp_path / "srv" / "replicas"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path / "srv")
    names = {
        receiver_requester("receiver", Path(spelling))
        for spelling in (
            "replicas", "./replicas", "replicas/", "replicas/sub/..", str(folder),
            str(tmp_path / "link"), "../link/",
        )
    }  # fmt: skip
    assert names == {f"receiver@{socket.gethostname()}:{folder.resolve()}"}
    copy = tmp_path / "copy"
    copy.mkdir()
    assert receiver_requester("receiver", copy) not in names


def test_no_copy_is_promoted_for_a_source_that_reached_no_replica(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
) -> None:
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    no_copy_promoted_for_an_unbound_source(tmp_path, disk, procs, address, 5.0)


@pytest.mark.tools
def test_etcd_no_copy_is_promoted_for_a_source_that_reached_no_replica(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
    etcd: tuple[subprocess.Popen[str], str],  # noqa: F811
) -> None:
    # the source's key outlives its lease's TTL by a few seconds (etcd's minimum TTL)
    no_copy_promoted_for_an_unbound_source(tmp_path, disk, procs, etcd[1], 12.0)


def no_copy_promoted_for_an_unbound_source(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
    address: str,
    quiet: float,
) -> None:
    """A source with a new state folder renews its lease while its receiver is not up yet,
    then dies: no replica holds what it wrote. The witness knew no replica for the job and
    granted the first copy that asked: an old copy of the job elsewhere, running automatic
    failover, was promoted (lacking every write since it was made) and the source, back,
    was told to stop. Now the source says it has reached no replica, and no copy is
    promoted (``quiet``: seconds after which the old copy would have been); once it has
    reached its target, that one is."""
    old = start_receiver(tmp_path / "old-target")
    procs.append(old.proc)
    send_once(old, "vm1", tmp_path / "old-state", disk)
    assert old.stop() == 0
    qemu_io("qcow2", disk, "write -P 0x22 4M 1M")  # written after the old copy was made

    port = free_port()  # the target is not up yet
    sender = LoggedPopen(
        [*REPLICATOR, "send", "--to", f"127.0.0.1:{port}", "--job", "vm1", "--state-dir",
         str(tmp_path / "state"), "--insecure", "--interval", "0.2", "--witness", address,
         *LEASE, str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    procs.append(sender)
    # it renews its lease (the first renewal comes at its start), saying it reached none
    assert wait_for(lambda: witness_replica(tmp_path, address) == UNBOUND, 30)
    quick = ("--insecure", "--auto-failover-after", "0.5", "--witness", address)
    old = start_receiver(tmp_path / "old-target", port=old.port, security=quick)
    procs.append(old.proc)
    time.sleep(1.5)  # the old copy asks, and is refused, while the source renews
    assert sender.poll() is None
    sender.send_signal(signal.SIGKILL)
    sender.wait(timeout=10)
    time.sleep(quiet)  # the source is long gone: the old copy asks, again and again
    job = receiver_job(old)
    assert job["promoted"] is False and job["generation"] == 1, job
    # its status says why it waits, and what to do
    assert "the witness refuses" in str(job["last_error"]), job
    assert "reached no replica" in str(job["last_error"]), job
    assert "failover --force" in str(job["last_error"]), job

    # the source comes back with its target up: that replica is the one from now on
    auto = ("--insecure", "--auto-failover-after", str(AFTER), "--witness", address)
    rcv = start_receiver(tmp_path / "target", port=port, security=auto)
    procs.append(rcv.proc)
    back = start_sender(rcv, tmp_path / "state", disk, address)
    procs.append(back)
    assert wait_for(replicating(rcv), 30), "the sender never replicated"
    # a renewal declares the replica (sent as the session begins: it may still be on its way)
    assert wait_for(declared(tmp_path, address, rcv), 30), witness_replica(tmp_path, address)
    back.send_signal(signal.SIGKILL)
    back.wait(timeout=10)
    assert wait_for(lambda: receiver_job(rcv)["promoted"] is True, 20), receiver_job(rcv)
    assert b3(rcv.dir / "vm1" / disk.name) == b3(disk)
    assert receiver_job(old)["promoted"] is False
    code, err = stop_and_read(old.proc)
    assert code == 0, err[-2000:]
    assert "reached no replica" in err, err[-2000:]
    assert rcv.stop() == 0


def test_the_replica_a_new_source_reaches_is_declared_at_once(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
) -> None:
    """A new source declares the replica it reached when its session begins, not at its
    next renewal (here 120 s after its first, at its start): dying between the two, it
    would leave the witness knowing no replica for the job, and its target, which holds
    its data, refused. (The interval was 10 s, and a loaded machine took most of it to
    start the processes: the deadline measured the machine, not the declaration.)"""
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    rcv = start_receiver(tmp_path / "target")
    procs.append(rcv.proc)
    started = time.monotonic()
    sender = subprocess.Popen(
        [*REPLICATOR, "send", "--to", rcv.address, "--job", "vm1", "--state-dir",
         str(tmp_path / "state"), "--insecure", "--interval", "0.2", "--witness", address,
         "--witness-interval", "120", str(disk)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=ENV,
    )  # fmt: skip
    procs.append(sender)
    assert wait_for(replicating(rcv), 50), "the sender never replicated"
    ours = read_state(rcv.dir / ".replicator" / "vm1" / "replica.id")
    assert ours is not None
    book = tmp_path / "witness" / "witness.state"
    assert wait_for(lambda: (read_state(book) or {}).get("replicas") == {"vm1": ours["id"]}, 50)
    assert time.monotonic() - started < 110, "too slow to tell: the next renewal was due"
    assert "unbound" not in (read_state(book) or {})
    assert rcv.stop() == 0
