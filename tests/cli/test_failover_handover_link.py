"""A planned failover whose link drops in the middle of the handover, after the source
has stopped its capture: real `receive`, `send --capture nbd` and `failover --planned`
processes, the link through the WAN emulator (a delay of DELAY seconds each way holds
what is in flight, so the cut lands between two known steps).

The source used to end with "not confirmed by the receiver" whatever had happened, and
the operator could not tell a promoted target from one that was not. It now asks the
target again and says which case it is: promoted at its final point (handed over, exit
12), or not promoted with nobody asking any more (exit 4: send may start again). A target
still carrying out the failover is asked again by it, and promotes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from replicator.engine.errors import ExitCode
from replicator.transport.wan import LinkProfile
from tests.cli.faults import log_events
from tests.cli.test_network_faults import ProxyThread
from tests.tools import (
    ENV,
    REPLICATOR,
    LiveNbdSender,
    b3,
    one_line_error,
    qemu_compare,
    start_receiver,
    wait_for,
)

# seconds each way while the handover runs: a cut made on a log line (polled every 0.2 s)
# lands before what was sent just before that line reaches the other side
DELAY = 4.0
FAST = LinkProfile(delay=0.002)


def _logged(log: Path, event: str) -> list[dict[str, Any]]:
    return [e for e in log_events(log.read_text(errors="replace")) if e.get("event") == event]


class Pair:
    """A receiver, the WAN emulator in front of it, and an NBD sender through it that has
    replicated one write; logs in files, read while they run."""

    def __init__(self, tmp_path: Path) -> None:
        self.receiver_log, self.sender_log = tmp_path / "receiver.log", tmp_path / "sender.log"
        self.rcv = start_receiver(tmp_path / "target", log=self.receiver_log)
        self.proxy = ProxyThread(("127.0.0.1", self.rcv.port))
        self.failover: subprocess.Popen[str] | None = None
        try:
            through = dataclasses.replace(self.rcv, port=self.proxy.address[1])
            self.sender = LiveNbdSender(tmp_path, through, log=self.sender_log)
        except BaseException:
            self.proxy.close()
            self.rcv.stop()
            raise
        try:
            self.sender.write("write -P 0x11 0 4M", "write -P 0x22 40M 1M")
            wait_for(self.sender.caught_up, self.sender.proc, "the writes to be replicated")
        except BaseException:
            self.close()
            raise

    def start_failover(self, timeout: float) -> subprocess.Popen[str]:
        self.proxy.call(lambda: setattr(self.proxy.wan, "profile", LinkProfile(delay=DELAY)))
        self.failover = subprocess.Popen(
            [*REPLICATOR, "failover", "--dir", str(self.rcv.dir), "--job", "vm1", "--planned",
             "--timeout", str(timeout), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        return self.failover

    def cut_when(self, log: Path, event: str, *, refuse: bool = False) -> None:
        """Cut the link as soon as ``event`` is in ``log`` (and, with ``refuse``, take no
        new connection until ``heal``); what the delay line held is lost with it."""
        assert self.failover is not None
        wait_for(lambda: bool(_logged(log, event)), self.failover, event, timeout=120)
        if refuse:
            self.proxy.call(lambda: self.proxy.wan.refuse(True))
        self.proxy.call(self.proxy.wan.cut)
        self.proxy.call(lambda: setattr(self.proxy.wan, "profile", FAST))

    def failover_cut(
        self, timeout: float, log: Path, event: str, *, refuse: bool = False
    ) -> tuple[int, str, str]:
        """A planned failover (``timeout``) with the link cut at ``event`` (``cut_when``):
        its exit code, output and error output."""
        failover = self.start_failover(timeout)
        self.cut_when(log, event, refuse=refuse)
        out, err = failover.communicate(timeout=120)
        return failover.returncode, out, err

    def heal(self) -> None:
        self.proxy.call(lambda: self.proxy.wan.refuse(False))

    def sender_end(self, timeout: float = 120) -> tuple[int | None, str]:
        """The sender's exit code (None: still running after ``timeout`` s) and its log."""
        deadline = time.monotonic() + timeout
        while self.sender.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.sender.proc.poll(), self.sender_log.read_text(errors="replace")

    def holds_the_source(self) -> None:
        self.sender.sock.unlink(missing_ok=True)
        compared = qemu_compare("raw", self.sender.source, self.sender.replica)
        assert compared.returncode == 0, compared.stdout + compared.stderr
        assert b3(self.sender.source) == b3(self.sender.replica)

    def close(self) -> None:
        if self.failover is not None and self.failover.poll() is None:
            self.failover.kill()
            self.failover.communicate(timeout=30)
        self.sender.stop()
        self.proxy.close()
        self.rcv.stop()


def _promoted(target: Path) -> bool:
    out = subprocess.run(
        [*REPLICATOR, "status", "--dir", str(target), "--json"],
        capture_output=True, text=True, env=ENV, timeout=60, check=True,
    )  # fmt: skip
    promoted: bool = json.loads(out.stdout)["jobs"][0]["promoted"]
    return promoted


def test_the_promotion_s_confirmation_lost_is_asked_for_and_the_source_says_handed_over(
    tmp_path: Path,
) -> None:
    """The target promoted at the final point; its "promoted" is lost with the link (held
    in the delay line when the link is cut). The source asks the target again, finds it
    promoted at its final point, and ends handed over (exit 12, recorded), not with "not
    confirmed" (exit 4), which left the operator to guess, and a service manager to start
    `send` again beside the VM now running on the target."""
    pair = Pair(tmp_path)
    try:
        exited, out, err = pair.failover_cut(60, pair.receiver_log, "receiver.planned_failover")
        assert exited == 0, err[-3000:]
        assert json.loads(out)["planned"] is True
        code, log = pair.sender_end()
        assert code == ExitCode.HANDED_OVER, log[-3000:]
        line = one_line_error(log)
        assert "handed over" in line and "confirmed by asking it again" in line, line
        assert "start the VM on the target" in line, line
        assert _logged(pair.sender_log, "sender.handover_link_lost")[0]["final_sent"] is True
        assert _promoted(pair.rcv.dir)
        pair.holds_the_source()
    finally:
        pair.close()


def test_a_final_point_lost_with_the_link_is_asked_for_again_and_promoted(
    tmp_path: Path,
) -> None:
    """The link drops as the source, asked, has stopped its capture and ships its final
    point (the barrier still in the delay line): the target is not promoted and waits for
    the source's next session. The source asks, finds it not promoted, opens a session
    again, is asked for its final point there, and the failover completes at it. It used
    to give up at once ("not confirmed"), and the failover then timed out: nothing
    promoted, the source's capture stopped."""
    pair = Pair(tmp_path)
    try:
        exited, out, err = pair.failover_cut(60, pair.sender_log, "sender.handover_requested")
        assert exited == 0, err[-3000:]
        assert json.loads(out)["planned"] is True
        assert _logged(pair.receiver_log, "receiver.handover_retried")
        code, log = pair.sender_end()
        assert code == ExitCode.HANDED_OVER, log[-3000:]
        assert "handed over" in one_line_error(log)
        [lost] = _logged(pair.sender_log, "sender.handover_link_lost")
        assert lost["final_sent"] is False, lost
        assert _logged(pair.sender_log, "sender.handover_rejoined")
        assert _promoted(pair.rcv.dir)
        pair.holds_the_source()
    finally:
        pair.close()


def test_a_target_that_gave_up_meanwhile_is_found_not_promoted_and_said_so(
    tmp_path: Path,
) -> None:
    """The link drops before the final point and stays down until the failover on the
    target has given up (its --timeout: nothing promoted). Back, the source asks, opens a
    session, is not asked again, and says the target is NOT promoted and send may start
    again (exit 4), instead of "not confirmed", which could mean either."""
    pair = Pair(tmp_path)
    try:
        exited, _, err = pair.failover_cut(
            8, pair.sender_log, "sender.handover_requested", refuse=True
        )
        assert exited == ExitCode.CONNECT, err[-3000:]
        assert "nothing was promoted" in one_line_error(err)
        pair.heal()
        code, log = pair.sender_end()
        assert code == ExitCode.CONNECT, log[-3000:]
        line = one_line_error(log)
        assert "the target is NOT promoted" in line, line
        assert "no failover there asks for this source's final point" in line, line
        assert "start `replicator send` here again" in line, line
        assert not _promoted(pair.rcv.dir)
        pair.holds_the_source()  # everything journaled reached it: the next send goes on
    finally:
        pair.close()


def test_a_target_forced_over_meanwhile_is_found_promoted_short_of_the_final_point(
    tmp_path: Path,
) -> None:
    """The link drops before the final point; while it is down the operator gives up on
    the planned failover and forces one on the target, which promotes the last point it
    has. Back, the source finds the target promoted short of its final point and says so
    (exit 11: the writes between are not there; the VM not to be started here), where
    it used to say "not confirmed" as for every other case."""
    pair = Pair(tmp_path)
    try:
        exited, _, err = pair.failover_cut(
            8, pair.sender_log, "sender.handover_requested", refuse=True
        )
        assert exited == ExitCode.CONNECT, err[-3000:]
        forced = subprocess.run(
            [*REPLICATOR, "failover", "--dir", str(pair.rcv.dir), "--job", "vm1", "--force",
             "--json"],
            capture_output=True, text=True, env=ENV, timeout=120, check=False,
        )  # fmt: skip
        assert forced.returncode == 0, forced.stderr[-3000:]
        point = json.loads(forced.stdout)["point_lsn"]
        pair.heal()
        code, log = pair.sender_end()
        assert code == ExitCode.SPLIT_BRAIN, log[-3000:]
        line = one_line_error(log)
        assert "the target was promoted (generation 2) while this source handed it over" in line
        assert f"but at lsn {point}, before this source's final point (lsn" in line, line
        assert "do not start the VM here" in line, line
        pair.holds_the_source()  # the final point is an empty barrier: the data is all there
    finally:
        pair.close()
