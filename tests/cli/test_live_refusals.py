"""A live sender keeps serving its VM whatever the target refuses, split brain aside.

Once an NBD or FUSE capture serves a VM, stopping the sender takes the VM's disk away:
the target's problems must never do that. Each case here makes the receiver refuse a
running live sender in a different way and checks that the VM's writes still succeed,
the refusal shows in `status`, SIGTERM still stops the sender cleanly, and the way out
the message names brings the replica level with the source (qemu-img compare, blake3).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tests.tools import (
    LiveNbdSender,
    ReceiverProc,
    b3,
    qemu_compare,
    replicator,
    send_once,
    sender_errors,
    sender_job,
    start_receiver,
    wait_for,
)

MiB = 1024 * 1024


def _refused_says(sender: LiveNbdSender, words: str) -> None:
    """``status`` shows the job refused (not "connecting": the receiver was reached) and
    why, while the sender waits to ask again."""

    def job() -> dict[str, Any]:
        return sender_job(sender.state)

    wait_for(lambda: job().get("state") == "refused", sender.proc, "the refused state")
    assert words in str(job().get("last_error")), job()
    table = replicator("status", "--state-dir", str(sender.state)).stdout
    assert "refused" in table, table


def _level(sender: LiveNbdSender, receiver: ReceiverProc) -> None:
    compared = qemu_compare("raw", sender.source, sender.replica)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert b3(sender.replica) == b3(sender.source)


def test_a_replica_changed_on_the_target_does_not_stop_a_live_sender(tmp_path: Path) -> None:
    receiver = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    sender = LiveNbdSender(tmp_path, receiver)
    try:
        sender.write("write -P 0x11 0 4M")
        wait_for(sender.caught_up, sender.proc, "the first write to be replicated")
        with sender.replica.open("r+b") as f:  # a hand edit on the target
            f.seek(8 * MiB)
            f.write(b"edited on the target")
        sender.write("write -P 0x22 4M 4M")
        wait_for(lambda: "refused" in sender_errors(sender.state), sender.proc, "the refusal")
        _refused_says(sender, "diverged")
        sender.write("write -P 0x33 16M 4M")  # the VM goes on
        assert sender.proc.poll() is None
        rc, err = sender.stop()
        assert rc == 0, err[-3000:]
        assert "sender.replication_refused" in err and "diverged" in err
        # the way out the refusal names: --resync, once the operator has chosen to
        send_once(receiver, "vm1", sender.state, sender.source, extra=("--resync",))
        _level(sender, receiver)
    finally:
        sender.stop()
        receiver.stop()


def test_a_receiver_that_lost_its_state_does_not_stop_a_live_sender(tmp_path: Path) -> None:
    """The target's job folders are deleted while its receiver is down: the records the
    replica lacks were trimmed from the sender's small journal, so only a comparison can
    bring it level. The live sender says so and goes on serving until it is restarted."""
    target, log = tmp_path / "target", tmp_path / "receiver.log"
    receiver = start_receiver(target, log=log)
    sender = LiveNbdSender(tmp_path, receiver, "--journal-max", "8M")
    try:
        for i in range(4):  # 16 MiB through an 8 MiB journal: its first records trimmed
            sender.write(f"write -P {i + 1} {i * 4}M 4M")
            wait_for(sender.caught_up, sender.proc, "each write to be replicated")
        receiver.stop()
        shutil.rmtree(target / "vm1")
        shutil.rmtree(target / ".replicator" / "vm1")
        receiver = start_receiver(target, receiver.port, log=log)
        wait_for(lambda: "refused" in sender_errors(sender.state), sender.proc, "the refusal")
        _refused_says(sender, "lost its state")
        sender.write("write -P 0x44 32M 4M")  # the VM goes on
        assert sender.proc.poll() is None
        rc, err = sender.stop()
        assert rc == 0, err[-3000:]
        assert "it lost its state" in err
        send_once(receiver, "vm1", sender.state, sender.source)  # what a restart does
        _level(sender, receiver)
    finally:
        sender.stop()
        receiver.stop()


def test_a_receiver_that_no_longer_trusts_the_sender_does_not_stop_a_live_sender(
    tmp_path: Path,
) -> None:
    """The target's TLS keys are replaced by another CA's (a certificate that expired is
    refused the same way, at the next handshake): the sender cannot get in, and says so,
    until the target trusts it again; its VM's writes go on meanwhile."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder in (ours, theirs):
        made = replicator("keygen", "--out", str(folder))
        assert made.returncode == 0, made.stderr
    target, log = tmp_path / "target", tmp_path / "receiver.log"
    receiver = start_receiver(target, log=log, security=("--tls-dir", str(ours)))
    sender = LiveNbdSender(tmp_path, receiver, security=("--tls-dir", str(ours)))
    try:
        receiver.stop()
        receiver = start_receiver(
            target, receiver.port, log=log, security=("--tls-dir", str(theirs))
        )
        sender.write("write -P 0x55 0 4M")
        wait_for(lambda: "auth" in sender_errors(sender.state), sender.proc, "the refusal")
        _refused_says(sender, "certificate")
        sender.write("write -P 0x66 8M 4M")  # the VM goes on
        receiver.stop()
        receiver = start_receiver(target, receiver.port, log=log, security=("--tls-dir", str(ours)))
        wait_for(sender.caught_up, sender.proc, "the replica to catch up once trusted again")
        rc, err = sender.stop()
        assert rc == 0, err[-3000:]
        assert "sender.replication_refused" in err
        _level(sender, receiver)
    finally:
        sender.stop()
        receiver.stop()
