"""A failover asked of a receiver that is stopped or stuck (SIGSTOP: the kernel still
queues the request on its control socket): the operator gives up, and the receiver, run
again minutes later, must not carry the request out unwatched."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from tests.tools import (
    ENV,
    REPLICATOR,
    ReceiverProc,
    forced_failover,
    send_once,
    sender_job,
    start_receiver,
    start_send,
    status_json,
    stop_and_read,
    wait_for,
)


def _job(target: Path) -> dict[str, object]:
    [job] = status_json(directory=target)["jobs"]
    assert isinstance(job, dict)
    return job


def _waiting_for_an_answer(pid: int) -> bool:
    """``pid`` holds a connected unix stream socket and sleeps: a control client that has
    sent its request (``control.request``: connect, then send, then it waits for the
    answer; between the two it does not sleep)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    with open("/proc/net/unix") as table:
        connected = any(
            fields[5] == "03" and fields[6] in inodes  # SS_CONNECTED
            for fields in (line.split() for line in table.readlines()[1:])
        )
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return connected and state == "S"


def _asked_then_given_up(rcv: ReceiverProc, *command: str) -> None:
    """Run ``command`` against the receiver stopped (SIGSTOP: its control socket still
    queues the request), then give up on it as an operator would (SIGTERM): the command
    must end at once, interrupted; the receiver runs again after."""
    os.kill(rcv.proc.pid, signal.SIGSTOP)
    try:
        asked = subprocess.Popen(
            [*REPLICATOR, *command],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        # the request waits on the stopped receiver's socket (a fixed 2 s here was the
        # start of the command on a loaded machine: given up before it asked, it left the
        # receiver nothing to abandon)
        wait_for(lambda: _waiting_for_an_answer(asked.pid), asked, "the request", timeout=60)
        assert asked.poll() is None
        asked.send_signal(signal.SIGTERM)  # the operator gives up
        t0 = time.monotonic()
        _, err = asked.communicate(timeout=30)
        assert time.monotonic() - t0 < 5, "the interrupted command went on waiting"
        assert asked.returncode == ExitCode.INTERRUPTED, err
    finally:
        os.kill(rcv.proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("how", ["--force", "--planned"])
def test_a_failover_given_up_on_a_stopped_receiver_is_never_carried_out(
    tmp_path: Path, how: str
) -> None:
    """Seen: `failover` hung on a SIGSTOPped receiver, SIGTERM printed "interrupted" and
    went on hanging, and after SIGCONT the receiver promoted the job with nobody there
    (a planned one also stopped the source's capture: its sender exited 12)."""
    disk, state, log = tmp_path / "disk.raw", tmp_path / "state", tmp_path / "receiver.log"
    disk.write_bytes(os.urandom(1024 * 1024))
    target = tmp_path / "target"
    rcv = start_receiver(target, log=log)
    sender = None
    try:
        send_once(rcv, "vm", state, disk)
        if how == "--planned":  # the source's sender, connected: the one a handover stops
            sender = start_send(rcv.address, "vm", state, disk, extra=("--interval", "0.3"))
            wait_for(lambda: sender_job(state).get("connected") is True, sender, "connected")
        _asked_then_given_up(rcv, "failover", "--dir", str(target), "--job", "vm", how)
        wait_for(lambda: "receiver.failover_abandoned" in log.read_text(), rcv.proc, "abandoned")
        assert _job(target)["promoted"] is False
        assert not (target / ".replicator" / "vm" / "promoted.state").exists()
        if sender is not None:  # replication goes on
            time.sleep(1.0)
            assert sender.poll() is None
    finally:
        if sender is not None:
            rc, err = stop_and_read(sender)
            assert rc == 0, err[-3000:]
        assert rcv.stop() == 0


def test_a_demote_given_up_on_a_stopped_receiver_is_never_carried_out(tmp_path: Path) -> None:
    """The same for `demote`: an abandoned one gave a promoted job (perhaps running its VM
    by now) back to replication, unwatched."""
    _, _, target, _ = forced_failover(tmp_path)
    log = tmp_path / "receiver.log"
    rcv = start_receiver(target, log=log)
    try:
        _asked_then_given_up(
            rcv, "demote", "--dir", str(target), "--job", "vm", "--discard-changes"
        )
        wait_for(lambda: "receiver.demote_abandoned" in log.read_text(), rcv.proc, "abandoned")
        assert _job(target)["promoted"] is True
    finally:
        assert rcv.stop() == 0
