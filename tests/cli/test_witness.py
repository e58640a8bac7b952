"""Automatic failover with the built-in witness, as an admin would run it: real
`replicator witness`, `receive --auto-failover-after` and `send --witness` processes;
the sender and the witness are SIGKILLed (docs/OPERATIONS.md, "Automatic failover")."""

from __future__ import annotations

import asyncio
import errno
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from replicator.engine import replica_id as replica_ids
from replicator.engine.errors import ExitCode, PeerProtocolError
from replicator.engine.names import RECEIVER_STATE_NAME
from replicator.engine.witness_client import ETCD_SCHEME, BuiltinWitness
from replicator.engine.witness_etcd import PREFIX, UNBOUND
from replicator.journal.durable import read_state
from tests.faultfs import FaultFS
from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    ReceiverProc,
    b3,
    free_port,
    one_line_error,
    qemu_img,
    qemu_io,
    replicator,
    start_receiver,
    status_json,
    wait_port,
)

AFTER = 1.5  # --auto-failover-after: short, so each case takes a few seconds
LEASE = ("--witness-interval", "0.3")


def start_witness(state: Path, port: int | None = None) -> tuple[subprocess.Popen[str], str]:
    port = port or free_port()
    proc = LoggedPopen(
        [*REPLICATOR, "witness", "--listen", f"127.0.0.1:{port}", "--dir", str(state),
         "--insecure"],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    wait_port(port, proc)
    return proc, f"127.0.0.1:{port}"


def start_sender(
    rcv: ReceiverProc, state: Path, disk: Path, witness: str, *extra: str
) -> subprocess.Popen[str]:
    return LoggedPopen(
        [*REPLICATOR, "send", "--to", rcv.address, "--job", "vm1", "--state-dir", str(state),
         "--insecure", "--interval", "0.2", "--witness", witness, *LEASE, *extra, str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip


def replicating_pair(
    tmp_path: Path,
    disk: Path,
    procs: list[subprocess.Popen[str]],
    witness: str,
    receive_args: tuple[str, ...] = (),
    send_args: tuple[str, ...] = (),
) -> tuple[ReceiverProc, subprocess.Popen[str]]:
    """A receiver that fails over automatically (more options: ``receive_args``) and a
    sender renewing its lease with ``witness`` (more options: ``send_args``), replicating;
    both in ``procs`` (killed at the end)."""
    auto = ("--auto-failover-after", str(AFTER), "--witness", witness, *receive_args)
    rcv = start_receiver(tmp_path / "target", security=("--insecure", *auto))
    procs.append(rcv.proc)
    sender = start_sender(rcv, tmp_path / "state", disk, witness, *send_args)
    procs.append(sender)
    assert wait_for(replicating(rcv), 30), "the sender never replicated"
    # the source declares its replica in a renewal sent when its session begins, which
    # may still be on its way once the replica has its first point: a source killed
    # before it lands leaves the witness refusing every copy (rightly), so wait for it
    assert wait_for(declared(tmp_path, witness, rcv), 30), witness_replica(tmp_path, witness)
    return rcv, sender


def witness_replica(tmp_path: Path, witness: str) -> str | None:
    """The replica the witness at ``witness`` knows job vm1's source replicates to: ""
    when the source said it reached none (unbound), None when it knows nothing. A built-in
    witness is read from its book, ``tmp_path/witness/witness.state`` (where these tests
    keep it); etcd from its replica key."""
    if witness.startswith(ETCD_SCHEME):
        return asyncio.run(_etcd_replica(witness))
    book = read_state(tmp_path / "witness" / "witness.state") or {}
    if "vm1" in book.get("unbound", []):
        return UNBOUND
    replica: str | None = book.get("replicas", {}).get("vm1")
    return replica


async def _etcd_replica(witness: str) -> str | None:
    import aetcd

    host, port = witness.removeprefix(ETCD_SCHEME).rsplit(":", 1)
    client = aetcd.Client(host, int(port), timeout=5)
    try:
        await client.connect()
        got = await client.get(f"{PREFIX}vm1/replica".encode())
    finally:
        await client.close()
    return None if got is None else bytes(got.value).decode()


def declared(tmp_path: Path, witness: str, rcv: ReceiverProc) -> Callable[[], bool]:
    """True once the witness knows job vm1's source replicates to ``rcv``'s replica."""
    id_file = rcv.dir / RECEIVER_STATE_NAME / "vm1" / replica_ids.FILE_NAME

    def check() -> bool:
        ours = read_state(id_file) if id_file.exists() else None
        return ours is not None and witness_replica(tmp_path, witness) == ours["id"]

    return check


def receiver_job(rcv: ReceiverProc) -> dict[str, object]:
    """Job vm1 as `status --dir --json` shows it (asked in process: polled)."""
    jobs = status_json(directory=rcv.dir)["jobs"]
    assert [j["job"] for j in jobs] == ["vm1"], jobs
    job: dict[str, object] = jobs[0]
    return job


def promoted_as(rcv: ReceiverProc, generation: int) -> Callable[[], bool]:
    """True once job vm1 is promoted with its new ``generation`` recorded: the receiver
    writes promoted.state first, then the generation into applied.state, and `status`
    shows the job promoted with the generation before meanwhile."""

    def check() -> bool:
        job = receiver_job(rcv)
        return job["promoted"] is True and job["generation"] == generation

    return check


def wait_for(what: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(step)
    return what()


def replicating(rcv: ReceiverProc) -> Callable[[], bool]:
    """True once the sender's first consistency point was applied on the receiver."""
    state = rcv.dir / ".replicator" / "vm1" / "applied.state"
    return lambda: state.exists() and receiver_job(rcv)["consistency_point"]["lsn"] > 0  # type: ignore[index]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "vm1.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
    qemu_io("qcow2", path, "write -P 0x11 0 2M")
    return path


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes to kill at the end, whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_the_target_promotes_when_the_witness_agrees(
    tmp_path: Path, disk: Path, procs: list[subprocess.Popen[str]]
) -> None:
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    rcv, sender = replicating_pair(tmp_path, disk, procs, address)
    time.sleep(2 * AFTER)  # the source is alive: nothing is promoted meanwhile
    assert receiver_job(rcv)["promoted"] is False

    sender.send_signal(signal.SIGKILL)
    sender.wait(timeout=10)
    killed = time.time()
    assert wait_for(promoted_as(rcv, 2), 30), receiver_job(rcv)
    job = receiver_job(rcv)
    # when the receiver promoted, as it recorded it: the time this test took to see it
    # (a `replicator status` a poll, each a process start) is not the product's
    at = datetime.fromisoformat(job["promotion"]["at"]).timestamp()  # type: ignore[index]
    took = at - killed
    # AFTER counts from the receiver's last poll that saw the session (every 0.25 s), up
    # to a poll before the kill: under load the promotion came 1.32 s after it
    assert AFTER - 0.5 < took < AFTER + 5, took
    assert job["generation"] == 2  # the first session made it 1, the promotion 2
    replica = rcv.dir / "vm1" / disk.name
    before = b3(replica)

    # the witness answers the old source's renewal "promoted"...
    host, port = address.rsplit(":", 1)
    old = BuiltinWitness(host, int(port), who="test", tls=None)
    renewal = asyncio.run(old.renew("vm1", 1))
    assert not renewal.ok and renewal.promoted_to == 2 and renewal.grantee.startswith("receiver@")
    # ...so when it comes back it stops (exit 11): told by the witness or, when its
    # session got there first, refused by the receiver; the replica is untouched
    again = start_sender(rcv, tmp_path / "state", disk, address)
    procs.append(again)
    _, err = again.communicate(timeout=20)
    assert again.returncode == ExitCode.SPLIT_BRAIN, err[-2000:]
    line = one_line_error(err)
    assert "promoted" in line and "failback" in line
    assert b3(replica) == before
    assert rcv.stop() == 0


def test_a_job_demoted_through_the_receiver_waits_the_full_time_again(
    tmp_path: Path, disk: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """Demoted through the running receiver, a job that failed over automatically is not
    promoted again at the next poll (its source went quiet long ago): the wait counts from
    the demote, as from the start of a receiver restarted to demote at rest."""
    after = 4.0
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    rcv, sender = replicating_pair(
        tmp_path, disk, procs, address, receive_args=("--auto-failover-after", str(after))
    )
    sender.send_signal(signal.SIGKILL)
    sender.wait(timeout=10)
    assert wait_for(lambda: receiver_job(rcv)["promoted"] is True, 20), receiver_job(rcv)
    # the receiver demotes some time after this (the command's start); the promotion
    # after it is dated as the receiver recorded it. (Watching `status` for "not promoted
    # within after - 1.5 s" took the answer of a probe that began in time, and ended on a
    # loaded machine seconds later, for one within it: it saw the legitimate promotion.)
    demoted = time.time()
    demote = replicator("demote", "--dir", str(rcv.dir), "--job", "vm1", "--discard-changes")
    assert demote.returncode == 0, demote.stderr
    assert wait_for(promoted_as(rcv, 3), 30), receiver_job(rcv)
    job = receiver_job(rcv)
    assert job["generation"] == 3  # the source is still gone: promoted again
    at = datetime.fromisoformat(job["promotion"]["at"]).timestamp()  # type: ignore[index]
    assert at - demoted > after - 0.5, at - demoted  # not at the next poll
    assert rcv.stop() == 0


def test_automatic_failover_without_a_witness_is_refused_at_start(tmp_path: Path) -> None:
    out = replicator(
        "receive", "--listen", f"127.0.0.1:{free_port()}", "--dir", str(tmp_path / "t"),
        "--insecure", "--auto-failover-after", "5",
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG, out.stderr
    line = one_line_error(out.stderr)
    assert "--witness" in line and "split brain" in line and "failover --force" in line
    bad = replicator(
        "receive", "--listen", f"127.0.0.1:{free_port()}", "--dir", str(tmp_path / "t"),
        "--insecure", "--auto-failover-after", "5", "--witness", "nowhere",
    )  # fmt: skip
    assert bad.returncode == ExitCode.CONFIG and "HOST:PORT" in one_line_error(bad.stderr)


def test_no_promotion_while_the_witness_is_down(
    tmp_path: Path, disk: Path, procs: list[subprocess.Popen[str]]
) -> None:
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    rcv, sender = replicating_pair(tmp_path, disk, procs, address)

    witness.send_signal(signal.SIGKILL)
    witness.wait(timeout=10)
    # losing the witness does not stop replication: a change still reaches the replica
    qemu_io("qcow2", disk, "write -P 0x22 4M 1M")
    point = receiver_job(rcv)["consistency_point"]["lsn"]  # type: ignore[index]
    assert wait_for(
        lambda: receiver_job(rcv)["consistency_point"]["lsn"] > point,  # type: ignore[index]
        30,
    )
    assert sender.poll() is None

    sender.send_signal(signal.SIGKILL)
    sender.wait(timeout=10)
    time.sleep(3 * AFTER)  # several timeouts: the target asks, nobody answers
    job = receiver_job(rcv)
    assert job["promoted"] is False and job["generation"] == 1
    assert "witness cannot be reached" in str(job["last_error"])

    # the witness comes back: it counts the source's silence from its own start, then agrees
    back, _ = start_witness(tmp_path / "witness", int(address.rsplit(":", 1)[1]))
    procs.append(back)
    restarted = time.monotonic()
    # the wait is over: status said "the witness cannot be reached" after the promotion
    # (its error is cleared once the promotion is done: not in the same instant)
    assert wait_for(lambda: promoted_as(rcv, 2)() and receiver_job(rcv)["last_error"] == "", 30), (
        receiver_job(rcv)
    )
    assert time.monotonic() - restarted > AFTER
    job = receiver_job(rcv)
    assert job["last_error"] == "" and job["errors"] != {}, job  # the count stays
    assert rcv.stop() == 0


@pytest.mark.parametrize("witness_down", [signal.SIGKILL, signal.SIGSTOP])
def test_a_waiting_failover_leaves_status_once_the_source_is_back(
    tmp_path: Path, disk: Path, procs: list[subprocess.Popen[str]], witness_down: int
) -> None:
    """The witness is down and the source dies: the target waits and says why. The source
    comes back and replicates again: the wait is over, and status says nothing about it
    (it went on saying "automatic failover waits: the witness cannot be reached" until a
    promotion, which does not come while the source is back: a stale alarm). A frozen
    witness (SIGSTOP) answers no question: each waits for the client's timeout (5 s), so
    one is on its way when the source comes back, and its failure must not say the wait
    again."""
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    rcv, sender = replicating_pair(tmp_path, disk, procs, address)
    witness.send_signal(witness_down)
    sender.send_signal(signal.SIGKILL)
    sender.wait(timeout=10)
    waits = "automatic failover waits: the witness cannot be reached"
    assert wait_for(lambda: waits in str(receiver_job(rcv)["last_error"]), 3 * AFTER + 15)

    back = start_sender(rcv, tmp_path / "state", disk, address)
    procs.append(back)
    point = receiver_job(rcv)["consistency_point"]["lsn"]  # type: ignore[index]
    qemu_io("qcow2", disk, "write -P 0x33 4M 1M")
    assert wait_for(
        lambda: receiver_job(rcv)["consistency_point"]["lsn"] > point,  # type: ignore[index]
        30,
    ), receiver_job(rcv)
    assert wait_for(lambda: receiver_job(rcv)["last_error"] == "", 15), receiver_job(rcv)
    time.sleep(6)  # and it stays gone while the source replicates (a question's timeout)
    job = receiver_job(rcv)
    assert job["last_error"] == "" and job["promoted"] is False, job
    assert job["errors"].get("witness", 0) > 0, job  # type: ignore[attr-defined]  # the count stays
    assert back.poll() is None
    assert rcv.stop() == 0


@pytest.mark.parametrize(("op", "err"), [("write", errno.ENOSPC), ("fsync", errno.EIO)])
def test_the_witness_grants_nothing_it_could_not_persist(
    tmp_path: Path, procs: list[subprocess.Popen[str]], op: str, err: int
) -> None:
    """witness.state's write fails (faultfs: real ENOSPC/EIO under `witness --dir`): the
    request is refused, nothing is granted (the old source is not told to stop, another
    target may still be granted), and what the witness says after a restart agrees."""
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        witness, address = start_witness(fs.mountpoint / "witness")
        procs.append(witness)
        host, port = address.rsplit(":", 1)

        def ask(who: str) -> tuple[bool, str]:
            client = BuiltinWitness(host, int(port), who=who, tls=None)
            decision = asyncio.run(client.may_promote("vm1", 1, 0.2))
            return decision.granted, decision.reason

        on_disk = tmp_path / "real" / "witness" / "witness.state"
        rule = fs.add(op, err, path="*witness.state*")
        time.sleep(0.3)  # the source has been quiet for longer than `after`
        granted, reason = ask("target-a")
        assert fs.hits()[str(rule)] >= 1
        assert not granted and "the witness cannot write" in reason
        assert not on_disk.exists()
        source = BuiltinWitness(host, int(port), who="source", tls=None)
        assert asyncio.run(source.renew("vm1", 1)).ok  # not told it was promoted away

        fs.clear()
        time.sleep(0.3)
        assert ask("target-b") == (True, "")  # nobody held generation 1
        assert read_state(on_disk) == {"grants": {"vm1": [[1, "target-b"]]}}
        witness.kill()
        witness.wait(timeout=10)
        again, _ = start_witness(fs.mountpoint / "witness", int(port))
        procs.append(again)
        granted, reason = ask("target-a")
        assert not granted and "granted to 'target-b'" in reason
        again.terminate()
        again.wait(timeout=10)


def test_a_replica_declaration_the_witness_could_not_write_binds_nothing(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """A renewal that names the source's replica is written before it is answered; when
    that write fails (ENOSPC), the renewal fails and the witness keeps nothing of it:
    a declaration held only in memory would refuse the real target now and be gone after
    a restart."""
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        witness, address = start_witness(fs.mountpoint / "witness")
        procs.append(witness)
        host, port = address.rsplit(":", 1)
        rule = fs.add("write", errno.ENOSPC, path="*witness.state*")
        source = BuiltinWitness(host, int(port), who="source", tls=None)
        with pytest.raises(PeerProtocolError, match="the witness cannot write"):
            asyncio.run(source.renew("vm1", 1, replica="aaaa"))
        assert fs.hits()[str(rule)] >= 1
        fs.clear()
        time.sleep(0.3)  # the source has been quiet for longer than `after`
        target = BuiltinWitness(host, int(port), who="target", tls=None)
        decision = asyncio.run(target.may_promote("vm1", 1, 0.2, replica="bbbb"))
        assert decision.granted, decision.reason  # "aaaa" was never the job's replica


def test_a_grant_whose_folder_fsync_failed_is_not_found_by_the_next_start(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """witness.state's write fails after its rename (the folder's fsync, EIO): the request
    is refused, but the file held the grant all the same, and the witness restarted told
    the live source it was promoted away (to a target that was told no, and may never
    ask again). Now the refused grant is taken back on disk too."""
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        witness, address = start_witness(fs.mountpoint / "witness")
        procs.append(witness)
        host, port = address.rsplit(":", 1)
        rule = fs.add("fsyncdir", errno.EIO, path="witness", times=1)
        time.sleep(0.3)  # the source has been quiet for longer than `after`
        client = BuiltinWitness(host, int(port), who="target-a", tls=None)
        decision = asyncio.run(client.may_promote("vm1", 1, 0.2))
        assert fs.hits()[str(rule)] == 1
        assert not decision.granted and "the witness cannot write" in decision.reason
        witness.kill()
        witness.wait(timeout=10)
        again, _ = start_witness(fs.mountpoint / "witness", int(port))
        procs.append(again)
        source = BuiltinWitness(host, int(port), who="source", tls=None)
        assert asyncio.run(source.renew("vm1", 1)).ok  # not told it was promoted away
        again.terminate()
        again.wait(timeout=10)


def test_the_auto_failover_command_runs_once_after_the_promotion(
    tmp_path: Path, disk: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """``--auto-failover-exec``: run as `failover --exec` runs its command (no shell, in
    the replica folder, REPLICATOR_JOB and REPLICATOR_REPLICA_DIR set), once."""
    ran = tmp_path / "ran"
    script = f'echo "$REPLICATOR_JOB $REPLICATOR_REPLICA_DIR $PWD" >> {shlex.quote(str(ran))}'
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    rcv, sender = replicating_pair(
        tmp_path, disk, procs, address,
        receive_args=("--auto-failover-exec", f"sh -c {shlex.quote(script)}"),
    )  # fmt: skip
    assert not ran.exists()  # the source is alive: nothing promoted, nothing run
    sender.send_signal(signal.SIGKILL)
    sender.wait(timeout=10)
    assert wait_for(ran.exists, 30), receiver_job(rcv)
    assert receiver_job(rcv)["promoted"] is True
    time.sleep(AFTER + 0.5)  # more rounds of the automatic failover: it does not run again
    replica_dir = rcv.dir / "vm1"
    assert ran.read_text().splitlines() == [f"vm1 {replica_dir} {replica_dir}"]
    assert rcv.stop() == 0


def test_an_auto_failover_command_needs_automatic_failover(tmp_path: Path) -> None:
    base = ("receive", "--listen", f"127.0.0.1:{free_port()}", "--dir", str(tmp_path / "t"),
            "--insecure")  # fmt: skip
    alone = replicator(*base, "--auto-failover-exec", "virsh start vm1")
    assert alone.returncode == ExitCode.CONFIG, alone.stderr
    assert "--auto-failover-after" in one_line_error(alone.stderr)
    empty = replicator(
        *base, "--auto-failover-after", "5", "--witness", "127.0.0.1:1",
        "--auto-failover-exec", " ",
    )  # fmt: skip
    assert empty.returncode == ExitCode.CONFIG and "is empty" in one_line_error(empty.stderr)


def test_over_tls_another_certificate_of_the_ca_is_no_witness(
    tmp_path: Path, disk: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """A host holding only site-b's key serves as the witness: the source does not renew
    its lease there and the target never promotes on its word (nothing reaches it); named
    with --witness-peer it is asked. The real witness's --allow keeps site-b off vm1."""
    from replicator.engine.tls import TlsIdentity

    keys = tmp_path / "keys"
    for extra in ((), ("--name", "witness"), ("--name", "site-b")):
        made = replicator("keygen", "--out", str(keys), *extra)
        assert made.returncode == 0, made.stderr
    tls = ("--tls-dir", str(keys))

    def serve(folder: str, *args: str) -> str:
        port = free_port()
        proc = subprocess.Popen(
            [*REPLICATOR, "witness", "--listen", f"127.0.0.1:{port}", "--dir",
             str(tmp_path / folder), *tls, *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=ENV,
        )  # fmt: skip
        procs.append(proc)
        wait_port(port, proc)
        return f"127.0.0.1:{port}"

    impostor = serve("impostor", "--tls-name", "site-b")
    auto = ("--auto-failover-after", str(AFTER), "--witness", impostor)
    rcv = start_receiver(tmp_path / "target", security=(*tls, *auto))
    procs.append(rcv.proc)

    def source(*extra: str) -> subprocess.Popen[str]:
        proc = LoggedPopen(
            [*REPLICATOR, "send", "--to", rcv.address, "--job", "vm1", "--state-dir",
             str(tmp_path / "state"), *tls, "--interval", "0.2", "--witness", impostor,
             *LEASE, *extra, str(disk)],
            stdout=subprocess.DEVNULL, env=ENV,
        )  # fmt: skip
        procs.append(proc)
        return proc

    sender = source()
    assert wait_for(replicating(rcv), 30), "the sender never replicated"
    sender.send_signal(signal.SIGKILL)
    _, err = sender.communicate(timeout=10)
    assert "presented certificate 'site-b', not 'witness'" in err, err[-3000:]
    time.sleep(3 * AFTER)  # the target asks several times; the impostor is never asked
    job = receiver_job(rcv)
    assert job["promoted"] is False, job
    assert "presented certificate 'site-b'" in str(job["last_error"]), job
    assert not (tmp_path / "impostor" / "witness.state").exists()

    named = source("--witness-peer", "site-b")  # asked on purpose: its renewal lands
    assert wait_for((tmp_path / "impostor" / "witness.state").exists, 10)
    named.send_signal(signal.SIGKILL)
    named.wait(timeout=10)
    assert rcv.stop() == 0

    real = serve("real", "--allow", "sender:vm1", "--allow", "receiver:vm1")
    host, port = real.rsplit(":", 1)
    identity = TlsIdentity(keys, "site-b", server=False, peer="witness")
    identity.load()
    site_b = BuiltinWitness(host, int(port), who="sender", tls=identity)
    with pytest.raises(PeerProtocolError, match="'site-b' may not renew or promote job 'vm1'"):
        asyncio.run(site_b.renew("vm1", 1, 0.6))
    assert not (tmp_path / "real" / "witness.state").exists()
    for args, words in (
        (("witness", "--listen", "127.0.0.1:1", "--insecure", "--allow", "a:vm1"), "--allow"),
        (("receive", "--listen", "127.0.0.1:1", "--dir", str(tmp_path / "t"), "--insecure",
          "--auto-failover-after", "5", "--witness", real, "--witness-peer", "w"), "--tls-dir"),
    ):  # fmt: skip
        out = replicator(*args)
        assert out.returncode == ExitCode.CONFIG, out.stderr
        assert words in one_line_error(out.stderr), out.stderr


def test_a_sender_aimed_at_the_witness_is_told_it_is_no_receiver(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """It was "lost mid-session, run again" (exit 4), retried for ever by a continuous
    sender: the witness answers a replication Hello, in that protocol, that it is none."""
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    image = tmp_path / "d.img"
    image.write_bytes(b"\x01" * 65536)
    for once in (("--once",), ()):
        out = replicator(
            "send", "--to", address, "--job", "vm1", "--state-dir", str(tmp_path / "s"),
            "--insecure", *once, str(image), timeout=60,
        )  # fmt: skip
        assert out.returncode == ExitCode.PROTOCOL, out.stderr[-2000:]
        line = one_line_error(out.stderr)
        assert "is a replicator witness" in line and "not a receiver" in line, line
    assert witness.poll() is None
