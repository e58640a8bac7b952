"""`send --capture nbd --wait-for-receiver SECONDS`: a source host restarted while its target
is away can still start its VM.

Without the option a live sender serves nothing until it has synced with its receiver (the
safe default: a promoted replica is never written beside). With it, after SECONDS without
the receiver the sender compares the disk with its own last sync, journals what differs,
serves, and ships everything once the receiver answers. Each case ends with the replica
checked by qemu-img compare and blake3, or with the refusal that keeps it from being
silently wrong.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.tools import (
    ENV,
    REPLICATOR,
    LiveNbdSender,
    LoggedPopen,
    ReceiverProc,
    b3,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    send_once,
    sender_errors,
    start_receiver,
    wait_for,
)

MARKER = "served_alone.state"


def _level(sender: LiveNbdSender) -> None:
    compared = qemu_compare("raw", sender.source, sender.replica)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert b3(sender.replica) == b3(sender.source)


def _stopped_having_served_alone(sender: LiveNbdSender) -> str:
    """SIGTERM: a clean exit, having served alone at some point; its log."""
    rc, err = sender.stop()
    assert rc == 0, err[-3000:]
    assert "sender.serving_alone" in err
    return err


def _synced_then_stopped(tmp_path: Path, receiver: ReceiverProc) -> LiveNbdSender:
    """A live sender's first sync and one write replicated, then the sender stopped."""
    sender = LiveNbdSender(tmp_path, receiver)
    sender.write("write -P 0x11 0 4M")
    wait_for(sender.caught_up, sender.proc, "the first write to be replicated")
    rc, err = sender.stop()
    assert rc == 0, err[-3000:]
    return sender


def test_a_live_sender_serves_alone_and_catches_up_when_the_receiver_returns(
    tmp_path: Path,
) -> None:
    target, log = tmp_path / "target", tmp_path / "receiver.log"
    receiver = start_receiver(target, log=log)
    first = _synced_then_stopped(tmp_path, receiver)
    receiver.stop()
    # written while no sender ran: only a comparison with the last sync can find it
    qemu_io("raw", first.source, "write -P 0x22 40M 1M")
    sender = LiveNbdSender(
        tmp_path, receiver, "--wait-for-receiver", "1", fresh=False, until="export"
    )
    try:
        assert (sender.state / MARKER).exists()
        sender.write("write -P 0x33 8M 2M", "write -P 0x44 63M 1M")  # the VM runs
        assert sender.proc.poll() is None
        status = replicator("status", "--state-dir", str(sender.state), "--json")
        job = json.loads(status.stdout)["jobs"][0]
        assert job["state"] == "connecting", job
        assert job["served_alone"]["since_lsn"] > 0, job
        # what it journals alone shows, and the replica's age: it read LSN 0 and a lag
        # of 0.0 s while every write went unreplicated
        assert job["lsn"]["journaled"] > job["served_alone"]["since_lsn"], job
        assert job["lsn"]["applied"] > 0 and job["lag"]["records"] > 0, job
        assert job["lag"]["seconds"] > 0, job
        table = replicator("status", "--state-dir", str(sender.state)).stdout
        assert "serving alone from LSN" in table, table
        receiver = start_receiver(target, receiver.port, log=log)
        wait_for(sender.caught_up, sender.proc, "the replica to catch up")
        sender.write("write -P 0x55 20M 4M")
        wait_for(sender.caught_up, sender.proc, "a write after the receiver came back")
        _level(sender)
        assert not (sender.state / MARKER).exists()  # the receiver was found at its LSN
        status = replicator("status", "--state-dir", str(sender.state), "--json")
        assert json.loads(status.stdout)["jobs"][0]["served_alone"] is None
        _stopped_having_served_alone(sender)
    finally:
        sender.stop()
        receiver.stop()


def test_status_at_rest_shows_a_sender_stopped_while_serving_alone(tmp_path: Path) -> None:
    """Stopped while its receiver is still away, the sender's folder notes the LSN it
    served alone from: `status` at rest says so (the next session checks the receiver
    against it), and no longer once a session has found the receiver there."""
    target, log = tmp_path / "target", tmp_path / "receiver.log"
    receiver = start_receiver(target, log=log)
    first = _synced_then_stopped(tmp_path, receiver)
    receiver.stop()
    alone = LiveNbdSender(
        tmp_path, receiver, "--wait-for-receiver", "1", fresh=False, until="export"
    )
    try:
        alone.write("write -P 0x33 8M 2M")
        _stopped_having_served_alone(alone)
        status = replicator("status", "--state-dir", str(first.state), "--json")
        job = json.loads(status.stdout)["jobs"][0]
        assert job["state"] == "not_running" and job["served_alone"]["since_lsn"] > 0, job
        table = replicator("status", "--state-dir", str(first.state)).stdout
        assert "served alone from LSN" in " ".join(table.split()), table
        receiver = start_receiver(target, receiver.port, log=log)
        back = LiveNbdSender(tmp_path, receiver, fresh=False)
        wait_for(back.caught_up, back.proc, "the replica to catch up")
        _level(back)
        rc, err = back.stop()
        assert rc == 0, err[-3000:]
        status = replicator("status", "--state-dir", str(first.state), "--json")
        assert json.loads(status.stdout)["jobs"][0]["served_alone"] is None
    finally:
        alone.stop()
        receiver.stop()


def test_without_a_sync_from_its_state_folder_it_waits_for_the_receiver(
    tmp_path: Path,
) -> None:
    """Nothing to compare with but the replica: the disk is not served, and the log says
    why; the receiver's arrival starts the first sync as usual."""
    target = tmp_path / "target"
    receiver = start_receiver(target)
    receiver.stop()
    source, sock = tmp_path / "disk.raw", tmp_path / "nbd.sock"
    qemu_img("create", "-q", "-f", "raw", str(source), "64M")
    proc = _start(receiver, tmp_path / "state", sock, source)
    try:
        time.sleep(4)  # past the 1 s wait and a few tries
        assert not sock.exists()
        assert proc.poll() is None
        # and status says why (it said "connecting", the reason in the log only)
        job = _live_job(tmp_path / "state")
        assert "no sync from this state folder has completed yet" in job["not_served"], job
        table = " ".join(
            replicator("status", "--state-dir", str(tmp_path / "state")).stdout.split()
        )
        assert "the VM's disks are not served yet, and cannot be without the receiver" in table
        receiver = start_receiver(target, receiver.port)
        wait_for(sock.exists, proc, "the export once synced")
        assert _live_job(tmp_path / "state")["not_served"] is None
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert "sender.cannot_serve_alone" in err
        assert "no sync from this state folder has completed yet" in err
        assert "sender.serving_alone" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
        receiver.stop()


def _live_job(state: Path) -> dict[str, Any]:
    out = replicator("status", "--state-dir", str(state), "--json")
    assert out.returncode == 0, out.stderr
    snapshot = json.loads(out.stdout)
    assert snapshot["running"] and snapshot["jobs"][0].get("source") != "files", snapshot
    job: dict[str, Any] = snapshot["jobs"][0]
    return job


def _start(receiver: ReceiverProc, state: Path, sock: Path, source: Path) -> subprocess.Popen[str]:
    return LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "vm1", "--state-dir",
         str(state), "--capture", "nbd", "--nbd-socket", str(sock), "--wait-for-receiver",
         "1", "--insecure", str(source)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip


def test_a_state_folder_older_than_the_replica_is_refused_not_shipped(tmp_path: Path) -> None:
    """The state folder is put back from a copy taken before the last session, then the
    sender serves alone: its new records carry LSNs the receiver already holds with other
    contents. Shipping from the receiver's LSN would skip them (a replica unlike its source,
    reported durable); the handshake refuses instead, this run and the next, and a new
    state folder brings the replica level."""
    target, log = tmp_path / "target", tmp_path / "receiver.log"
    receiver = start_receiver(target, log=log)
    first = _synced_then_stopped(tmp_path, receiver)
    old_state = tmp_path / "state-copy"
    shutil.copytree(first.state, old_state)
    again = LiveNbdSender(tmp_path, receiver, fresh=False)  # the receiver moves on
    again.write("write -P 0x66 12M 4M")
    wait_for(again.caught_up, again.proc, "the later session")
    assert again.stop()[0] == 0
    receiver.stop()
    # written while no sender ran: the scan finds it first, numbered at an LSN the
    # receiver already holds (from the later session)
    qemu_io("raw", first.source, "write -P 0x69 1M 1M")
    replica_before = b3(again.replica)
    sender = LiveNbdSender(
        tmp_path,
        receiver,
        "--wait-for-receiver",
        "1",
        state=old_state,
        fresh=False,
        until="export",
    )
    try:
        sender.write("write -P 0x77 30M 1M")
        assert sender.stop()[0] == 0  # stopped and started again, still alone
        sender = LiveNbdSender(
            tmp_path, receiver, "--wait-for-receiver", "1", state=old_state, fresh=False,
            until="export",
        )  # fmt: skip
        sender.write("write -P 0x79 32M 1M")
        receiver = start_receiver(target, receiver.port, log=log)
        wait_for(lambda: "refused" in sender_errors(old_state), sender.proc, "the refusal")
        sender.write("write -P 0x78 31M 1M")  # the VM goes on
        assert sender.proc.poll() is None
        assert b3(sender.replica) == replica_before  # nothing of ours applied
        rc, err = sender.stop()
        assert rc == 0, err[-3000:]
        assert "past LSN" in err and "--state-dir" in err
        # restarted before it could ever ship: still refused, now at its start
        out = replicator(
            "send", "--to", receiver.address, "--job", "vm1", "--state-dir", str(old_state),
            "--once", "--insecure", str(sender.source),
        )  # fmt: skip
        assert out.returncode == 6, out.stderr[-3000:]
        assert "past LSN" in out.stderr
        assert b3(sender.replica) == replica_before
        # the way out named: a new state folder compares with the replica
        send_once(receiver, "vm1", tmp_path / "state-new", sender.source)
        _level(sender)
    finally:
        sender.stop()
        receiver.stop()


def test_wait_for_receiver_is_refused_where_nothing_is_served(tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    source.write_bytes(b"\0" * 65536)
    for capture in ("scan", "fuse"):
        out = replicator(
            "send", "--to", "127.0.0.1:9", "--job", "vm1", "--state-dir",
            str(tmp_path / "state"), "--capture", capture, "--wait-for-receiver", "5",
            "--insecure", str(source),
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert "--wait-for-receiver only applies to --capture nbd" in out.stderr


def test_with_a_witness_a_source_whose_target_was_promoted_never_serves_alone(
    tmp_path: Path,
) -> None:
    """The case the default wait guards against: the source died, the target was promoted
    (the witness agreed), and the target is unreachable when the source host comes back.
    Serving alone would run the VM on both sides. With --witness the sender serves alone
    only once the witness confirms it is still the primary: here it says the target took
    over, and the sender stops (split brain) without ever serving the disk."""
    from tests.cli.test_network_faults import ProxyThread
    from tests.cli.test_witness import AFTER, LEASE, receiver_job, start_witness
    from tests.cli.test_witness import wait_for as wait_until

    witness, address = start_witness(tmp_path / "witness")
    host, port = address.rsplit(":", 1)
    proxy = ProxyThread((host, int(port)))
    via = f"127.0.0.1:{proxy.address[1]}"
    target = tmp_path / "target"
    auto = ("--insecure", "--auto-failover-after", str(AFTER), "--witness", address)
    receiver = start_receiver(target, security=auto)
    first = LiveNbdSender(tmp_path, receiver, "--witness", address, *LEASE)
    sender = None
    try:
        first.write("write -P 0x11 0 4M")
        wait_for(first.caught_up, first.proc, "the first write to be replicated")
        first.proc.kill()
        first.proc.wait(timeout=30)
        assert wait_until(lambda: receiver_job(receiver)["promoted"] is True, 20)
        receiver.stop()  # the promoted target is out of the source's reach
        first.sock.unlink(missing_ok=True)
        proxy.call(lambda: proxy.wan.stall())  # and the witness slow to answer
        sender = LiveNbdSender(
            tmp_path, receiver, "--wait-for-receiver", "0", "--witness", via, *LEASE,
            fresh=False, until="start",
        )  # fmt: skip
        time.sleep(3)
        assert not sender.sock.exists()  # not served on the chance it is still primary
        proxy.call(proxy.wan.resume)  # the source hears "promoted"
        rc = sender.proc.wait(timeout=60)
        _, err = sender.stop()
        assert rc == 11, err[-3000:]
        assert "sender.serving_alone" not in err
        assert not sender.sock.exists()
    finally:
        for proc in (first, sender):
            if proc is not None:
                proc.stop()
        receiver.stop()
        proxy.close()
        witness.kill()
        witness.wait(timeout=30)


def test_with_a_witness_away_the_source_waits_for_it_before_serving_alone(
    tmp_path: Path,
) -> None:
    """Neither the receiver nor the witness answers: nothing says the target was not
    promoted, so the disk is not served; once the witness confirms the source, it is."""
    from tests.cli.test_witness import LEASE, start_witness

    witness, address = start_witness(tmp_path / "witness")
    port = int(address.rsplit(":", 1)[1])
    target = tmp_path / "target"
    receiver = start_receiver(target)
    first = LiveNbdSender(tmp_path, receiver, "--witness", address, *LEASE)
    first.write("write -P 0x11 0 4M")
    wait_for(first.caught_up, first.proc, "the first write to be replicated")
    assert first.stop()[0] == 0
    receiver.stop()
    witness.kill()
    witness.wait(timeout=30)
    sender = LiveNbdSender(
        tmp_path, receiver, "--wait-for-receiver", "0.5", "--witness", address, *LEASE,
        fresh=False, until="start",
    )  # fmt: skip
    try:
        time.sleep(4)  # past the wait, several times over
        assert not sender.sock.exists()
        assert sender.proc.poll() is None
        witness, _ = start_witness(tmp_path / "witness", port)
        wait_for(sender.sock.exists, sender.proc, "the export once the witness answered")
        sender.write("write -P 0x22 8M 1M")
        receiver = start_receiver(target, receiver.port)
        wait_for(sender.caught_up, sender.proc, "the replica to catch up")
        _level(sender)
        assert "the witness has not confirmed this source" in _stopped_having_served_alone(sender)
    finally:
        sender.stop()
        receiver.stop()
        witness.kill()
        witness.wait(timeout=30)


def test_a_target_that_refuses_at_start_is_served_alone_past_the_wait(tmp_path: Path) -> None:
    """The replica was changed on the target while no sender ran: the receiver refuses the
    job ("diverged"). Without the option the sender exits 6 and the VM stays down; with it,
    the sender serves alone once the wait is over, the replica untouched, and the way out
    the refusal names (--resync) brings it level."""
    target, log = tmp_path / "target", tmp_path / "receiver.log"
    receiver = start_receiver(target, log=log)
    first = _synced_then_stopped(tmp_path, receiver)
    with first.replica.open("r+b") as f:  # a hand edit on the target
        f.seek(6 * 1024 * 1024)
        f.write(b"edited on the target")
    edited = b3(first.replica)
    sender = LiveNbdSender(
        tmp_path, receiver, "--wait-for-receiver", "1", fresh=False, until="export"
    )
    try:
        sender.write("write -P 0x33 8M 2M")  # the VM runs
        assert sender.proc.poll() is None
        assert sender_errors(sender.state).get("refused", 0) >= 1
        assert b3(sender.replica) == edited
        rc, err = sender.stop()
        assert rc == 0, err[-3000:]
        assert "diverged" in err and "sender.serving_alone" in err
        send_once(receiver, "vm1", sender.state, sender.source, extra=("--resync",))
        _level(sender)
    finally:
        sender.stop()
        receiver.stop()


def test_after_a_long_run_a_clean_stop_leaves_a_state_to_serve_alone_from(
    tmp_path: Path,
) -> None:
    """16 MiB through an 8 MiB journal: the records since the first sync are long
    trimmed. A clean stop hashes the extents the run changed into the manifests
    (`sender.checkpoint`), so the next start compares with them: alone when the receiver
    is away, and with a local basis (no manifests read from the whole replica) when not.
    A SIGKILLed sender leaves no checkpoint, but the extents it changed were noted before
    each trim: the next start sends those again and serves alone; without that note it
    waits for the receiver."""
    target, log = tmp_path / "target", tmp_path / "receiver.log"
    receiver = start_receiver(target, log=log)
    first = LiveNbdSender(tmp_path, receiver, "--journal-max", "8M", loud=True)
    for i in range(4):
        first.write(f"write -P {i + 1} {i * 4}M 4M")
        wait_for(first.caught_up, first.proc, "each write to be replicated")
    rc, err = first.stop()
    assert rc == 0, err[-3000:]
    assert "sender.checkpoint" in err and "sender.checkpoint_skipped" not in err
    receiver.stop()
    qemu_io("raw", first.source, "write -P 0x22 40M 1M")  # while no sender ran
    alone = LiveNbdSender(
        tmp_path, receiver, "--journal-max", "8M", "--wait-for-receiver", "1", fresh=False,
        until="export", loud=True,
    )  # fmt: skip
    try:
        for i in range(4):  # the run goes on trimming, now without the receiver
            alone.write(f"write -P {i + 0x30} {20 + i * 4}M 4M")
        receiver = start_receiver(target, receiver.port, log=log)
        wait_for(alone.caught_up, alone.proc, "the replica to catch up")
        _level(alone)
        assert '"sender.checkpoint"' in _stopped_having_served_alone(alone)
        # with the receiver there: compared with the checkpoint, not the replica
        again = LiveNbdSender(tmp_path, receiver, "--journal-max", "8M", fresh=False, loud=True)
        for i in range(4):  # past its first sync's records again
            again.write(f"write -P {i + 0x44} {i * 4}M 4M")
            wait_for(again.caught_up, again.proc, "each write after the restart")
        _level(again)
        again.proc.kill()  # no clean stop: no checkpoint, but the extents it changed
        again.proc.wait(timeout=30)  # were noted before each trim (touched.state)
        again.sock.unlink()
        _, err = again.stop()
        assert '"basis": "local"' in err, err[-3000:]
        receiver.stop()
        (again.state / "touched.state").rename(tmp_path / "touched.state")
        lost = LiveNbdSender(
            tmp_path, receiver, "--journal-max", "8M", "--wait-for-receiver", "1",
            fresh=False, until="start",
        )  # fmt: skip
        time.sleep(4)  # without that note, only the receiver can say what it holds
        assert not lost.sock.exists()
        _, err = lost.stop()
        assert "the journal no longer holds every record since the last sync" in err
        (tmp_path / "touched.state").rename(again.state / "touched.state")
        last = LiveNbdSender(  # room for the 16 MiB it changed, sent again
            tmp_path, receiver, "--journal-max", "64M", "--wait-for-receiver", "1",
            fresh=False, until="export", loud=True,
        )  # fmt: skip
        last.write("write -P 0x55 50M 1M")
        receiver = start_receiver(target, receiver.port, log=log)
        wait_for(last.caught_up, last.proc, "the replica after a crash, served alone")
        _level(last)
        _stopped_having_served_alone(last)
    finally:
        alone.stop()
        receiver.stop()


def test_restarts_from_checkpoints_never_leave_the_replica_behind(tmp_path: Path) -> None:
    """Clean stops and starts in turn, each start compared with the last checkpoint (its
    manifests claim what the replica holds: a wrong digest would skip an extent for
    good). Unaligned writes through the export, writes to the image while no sender runs,
    starts alone and with the receiver: the replica equals the source after each cycle
    that reaches the receiver."""
    rng = random.Random(20261203)
    target, log = tmp_path / "target", tmp_path / "receiver.log"
    receiver = start_receiver(target, log=log)
    sender = LiveNbdSender(tmp_path, receiver, "--journal-max", "8M")
    try:
        for cycle in range(6):
            for _ in range(rng.randrange(3, 8)):  # the VM, unaligned
                length = rng.randrange(1, 3 << 20)
                offset = rng.randrange(0, (64 << 20) - length)
                sender.write(f"write -P {rng.randrange(1, 256)} {offset} {length}")
            alone = cycle % 2 == 1
            if not alone:
                wait_for(sender.caught_up, sender.proc, f"cycle {cycle} to be replicated")
                _level(sender)
            rc, err = sender.stop()
            assert rc == 0, err[-3000:]
            if alone:
                receiver.stop()
            offset = rng.randrange(0, 60 << 20)  # while no sender runs
            qemu_io("raw", sender.source, f"write -P {rng.randrange(1, 256)} {offset} 100k")
            sender.sock.unlink(missing_ok=True)
            extra = ("--wait-for-receiver", "0") if alone else ()
            until = "export" if alone else "sync"
            sender = LiveNbdSender(
                tmp_path, receiver, "--journal-max", "8M", *extra, fresh=False, until=until
            )
            if alone:
                receiver = start_receiver(target, receiver.port, log=log)
        wait_for(sender.caught_up, sender.proc, "the last cycle to be replicated")
        _level(sender)
    finally:
        sender.stop()
        receiver.stop()


def test_more_change_than_the_journal_holds_waits_for_the_receiver(tmp_path: Path) -> None:
    """16 MiB written to the image while no sender ran, an 8 MiB journal: the comparison
    cannot journal it all, so the disk is not served alone (said why); the part it did
    journal is kept, and the receiver's return brings the replica level before serving."""
    target, log = tmp_path / "target", tmp_path / "receiver.log"
    receiver = start_receiver(target, log=log)
    first = LiveNbdSender(tmp_path, receiver, "--journal-max", "8M")
    first.write("write -P 0x11 0 4M")
    wait_for(first.caught_up, first.proc, "the first write to be replicated")
    assert first.stop()[0] == 0
    receiver.stop()
    qemu_io("raw", first.source, "write -P 0x22 16M 16M")
    first.sock.unlink(missing_ok=True)
    sender = LiveNbdSender(
        tmp_path, receiver, "--journal-max", "8M", "--wait-for-receiver", "1", fresh=False,
        until="start",
    )  # fmt: skip
    try:
        time.sleep(5)
        assert not sender.sock.exists()
        assert sender.proc.poll() is None
        status = replicator("status", "--state-dir", str(sender.state), "--json")
        job = json.loads(status.stdout)["jobs"][0]
        assert job["served_alone"] is None, job  # it does not: the status said it did
        receiver = start_receiver(target, receiver.port, log=log)
        wait_for(sender.sock.exists, sender.proc, "the export once synced")
        wait_for(sender.caught_up, sender.proc, "the replica to catch up")
        _level(sender)
        rc, err = sender.stop()
        assert rc == 0, err[-3000:]
        assert "does not fit in the journal" in err
        assert "sender.serving_alone" not in err
    finally:
        sender.stop()
        receiver.stop()
