"""The quiesce hooks as an operator meets them: a guest agent that fails, hangs or is
slow, a thaw that fails, a sender stopped while the guest is frozen (engine/hooks.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from replicator.engine.errors import ExitCode
from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    ReceiverProc,
    b3,
    one_line_error,
    qemu_compare,
    replicator,
    running,
    sender_job,
    start_send,
    status_json,
    stop_and_read,
    wait_for,
)


def _send(
    receiver: ReceiverProc, tmp_path: Path, disk: Path, *hooks: str
) -> subprocess.CompletedProcess[str]:
    return replicator(
        "send", "--to", receiver.address, "--job", "vm", "--state-dir", str(tmp_path / "state"),
        "--once", "--json", "--insecure", *hooks, str(disk), timeout=60,
    )  # fmt: skip


def _disk(tmp_path: Path, size: int = 1024 * 1024) -> Path:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(size))
    return disk


def _point(receiver: ReceiverProc) -> dict[str, Any]:
    """The job's consistency point on the running receiver (``status --dir --json``)."""
    jobs = [job for job in status_json(directory=receiver.dir)["jobs"] if job["job"] == "vm"]
    point: dict[str, Any] = jobs[0]["consistency_point"]
    return point


def test_a_failed_freeze_takes_no_point_thaws_and_says_what_the_hook_said(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk, thawed = _disk(tmp_path), tmp_path / "thawed"
    out = _send(
        receiver, tmp_path, disk,
        "--pre-hook", "echo freezing; echo 'error: Guest agent is not responding' >&2; exit 3",
        "--post-hook", f'echo "$REPLICATOR_JOB $REPLICATOR_HOOK $REPLICATOR_PRE_RESULT" > {thawed}',
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG, out.stderr
    error = one_line_error(out.stderr)
    assert "pre hook failed with exit code 3" in error
    assert "it said: error: Guest agent is not responding" in error
    assert thawed.read_text().split() == ["vm", "post", "failed"]  # the thaw ran all the same
    assert out.stdout == ""  # neither a summary nor the hook's words on stdout
    point = _point(receiver)  # the copy made before the freeze went, but no point
    assert point["lsn"] == 0 and point["consistent"] is False, point

    said = _send(
        receiver, tmp_path, disk, "--pre-hook", "echo frozen", "--post-hook", "echo thawed"
    )
    assert said.returncode == 0, said.stderr
    assert json.loads(said.stdout)["epoch"] == 1  # stdout is the summary alone
    assert b3(receiver.dir / "vm" / "disk.img") == b3(disk)


def test_a_failed_thaw_keeps_the_durable_point_and_exits_3_after_the_summary(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk = _disk(tmp_path)
    out = _send(receiver, tmp_path, disk, "--pre-hook", "true", "--post-hook", "echo no; exit 4")
    assert out.returncode == ExitCode.CONFIG, out.stderr
    summary = json.loads(out.stdout)
    assert summary["epoch"] == 1  # the point was taken frozen: it stands
    assert "post hook failed with exit code 4" in summary["thaw_failed"]
    assert b3(receiver.dir / "vm" / "disk.img") == b3(disk)
    error = one_line_error(out.stderr)
    assert "post hook failed with exit code 4" in error and "may still be frozen" in error


def test_a_hung_freeze_is_killed_with_its_children_at_the_timeout(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk, child, thawed = _disk(tmp_path), tmp_path / "child.pid", tmp_path / "thawed"
    out = _send(
        receiver, tmp_path, disk, "--hook-timeout", "1",
        "--pre-hook", f"sleep 300 & echo $! > {child}; sleep 300",
        "--post-hook", f"echo $REPLICATOR_PRE_RESULT > {thawed}",
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert "pre hook did not finish within 1 s (killed)" in one_line_error(out.stderr)
    assert thawed.read_text().strip() == "failed"
    pid = int(child.read_text())
    deadline = time.monotonic() + 10
    while running(pid):  # killed with the hook's process group, not left behind
        assert time.monotonic() < deadline, f"the hook's child {pid} outlived the timeout"
        time.sleep(0.1)


def test_a_continuous_sender_waits_out_a_failing_freeze_and_a_planned_failover_is_refused(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A guest agent down for a while (the VM rebooting): no point while the freeze fails,
    the status says so, a planned failover has no final point (nothing promoted), and
    replication goes on once the freeze works again."""
    disk, failing, state = _disk(tmp_path), tmp_path / "failing", tmp_path / "state"
    failing.touch()
    proc = start_send(
        receiver.address, "vm", state, disk,
        extra=("--interval", "0.3", "--pre-hook", f"test ! -e {failing}", "--post-hook", "true"),
    )  # fmt: skip
    try:
        wait_for(lambda: sender_job(state).get("state") == "hook_failed", proc, "hook_failed")
        job = sender_job(state)
        assert "pre hook failed with exit code 1" in str(job["last_error"])
        assert _point(receiver)["lsn"] == 0  # copied before each freeze, never a point

        def tries() -> int:
            return int((sender_job(state).get("errors") or {}).get("hook", 0))

        def sent() -> int:
            return int(sender_job(state)["bytes"]["payload"])

        wait_for(lambda: tries() >= 2, proc, "two tries")
        # no point is taken, so nothing is captured: the RPO grows (it read 0 here)
        wait_for(lambda: float(sender_job(state)["lag"]["seconds"]) >= 1.0, proc, "the lag grows")
        before, tried = sent(), tries()
        wait_for(lambda: tries() >= tried + 2, proc, "two more tries")
        # each try copies what changed since the copy the receiver holds: nothing here
        assert sent() - before < 64 * 1024, (before, sent())
        asked = time.monotonic()
        out = replicator(
            "failover", "--dir", str(receiver.dir), "--job", "vm", "--planned", "--timeout", "60"
        )
        # refused at the sender's next try, not when the timeout runs out
        assert time.monotonic() - asked < 30
        assert out.returncode == ExitCode.REFUSED, out.stderr
        error = one_line_error(out.stderr)
        assert "the source refused the planned failover" in error, error
        assert "nothing was promoted" in error and "last_error" in error, error
        assert _point(receiver)["lsn"] == 0
        assert proc.poll() is None  # the sender goes on
        out = replicator(  # asked again in the same session: refused again, not an error
            "failover", "--dir", str(receiver.dir), "--job", "vm", "--planned", "--timeout", "60"
        )
        assert out.returncode == ExitCode.REFUSED, out.stderr

        failing.unlink()
        replica = receiver.dir / "vm" / "disk.img"
        wait_for(lambda: replica.exists() and b3(replica) == b3(disk), proc, "the replica")
        wait_for(lambda: sender_job(state).get("state") == "replicating", proc, "replicating")
        assert int(sender_job(state)["errors"]["hook"]) >= 2
        wait_for(lambda: float(sender_job(state)["lag"]["seconds"]) < 1.0, proc, "a small lag")
    finally:
        rc, err = stop_and_read(proc)
    assert rc == 0, err[-3000:]
    assert '"event": "sender.handover_refused"' in err


def test_a_second_planned_failover_while_one_runs_is_told_so(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """Two `failover --planned` of one job at once: the second said "failover failed:
    RuntimeError: a handover was already requested in this session", exit 3 (bad input)."""
    disk, state = _disk(tmp_path), tmp_path / "state"
    proc = start_send(  # each freeze lasts 2 s: the first failover's last scan too
        receiver.address, "vm", state, disk,
        extra=("--interval", "0.3", "--pre-hook", "sleep 2", "--post-hook", "true"),
    )  # fmt: skip
    try:
        replica = receiver.dir / "vm" / "disk.img"
        wait_for(lambda: replica.exists() and _point(receiver)["lsn"] > 0, proc, "a point")
        first = subprocess.Popen(
            [*REPLICATOR, "failover", "--dir", str(receiver.dir), "--job", "vm", "--planned"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        time.sleep(0.7)
        second = replicator(
            "failover", "--dir", str(receiver.dir), "--job", "vm", "--planned", timeout=60
        )
        assert second.returncode == ExitCode.REFUSED, second.stderr
        assert "a planned failover of this job is already under way" in second.stderr
        assert first.wait(timeout=60) == 0, first.stderr.read() if first.stderr else ""
        assert proc.wait(timeout=60) == ExitCode.HANDED_OVER
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_sender_stopped_while_the_guest_is_frozen_thaws_it_first(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk, frozen = _disk(tmp_path, 8 * 1024 * 1024), tmp_path / "frozen"
    # the freeze has frozen one file system and waits on the next one
    proc = LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "vm", "--state-dir",
         str(tmp_path / "state"), "--once", "--insecure", "--pre-hook",
         f"touch {frozen} && sleep 30", "--post-hook", f"rm {frozen}", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    wait_for(frozen.exists, proc, "the freeze")
    time.sleep(0.5)
    # one SIGTERM (stop_and_read's): a second one during the thaw would leave it to finish
    # on its own after the sender exits (engine/hooks.py), and this check would race it
    rc, err = stop_and_read(proc, timeout=20)
    assert rc == ExitCode.INTERRUPTED, err[-3000:]
    assert not frozen.exists(), "the sender stopped and left the guest frozen"


def test_the_guest_is_frozen_for_a_scan_not_for_a_transfer(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A freeze held while a first sync (or a large change) crossed a slow link would stop
    the guest for the transfer (hours over a WAN). The changes are copied before the
    freeze, and the receiver holds them all when the pre hook runs: it asks the sender's
    status then. The frozen scan finds (almost) nothing left and journals it."""
    disk, state, seen = _disk(tmp_path, 6 * 1024 * 1024), tmp_path / "state", tmp_path / "seen"
    status = " ".join([*REPLICATOR, "status", "--state-dir", str(state), "--json"])
    hooks = ("--rate", "4MB/s", "--pre-hook", f"{status} > {seen}", "--post-hook", "true")

    def at_freeze() -> tuple[int, dict[str, int]]:
        job = json.loads(seen.read_text())["jobs"][0]
        return job["bytes"]["payload"], job["lsn"]

    assert _send(receiver, tmp_path, disk, *hooks).returncode == 0, "first sync"
    sent, lsn = at_freeze()
    assert sent >= 6 * 1024 * 1024, sent  # all of it had crossed the link
    assert lsn["received"] == lsn["journaled"], lsn
    with disk.open("r+b") as f:  # a large change: its cycle copies it before the freeze too
        f.seek(1024 * 1024)
        f.write(os.urandom(4 * 1024 * 1024))
    out = _send(receiver, tmp_path, disk, *hooks)
    assert out.returncode == 0, out.stderr
    sent, lsn = at_freeze()
    assert sent >= 4 * 1024 * 1024, sent
    assert lsn["received"] == lsn["journaled"], lsn
    summary = json.loads(out.stdout)
    assert summary["copied_before_freeze"] == summary["bytes_changed"] == 4 * 1024 * 1024
    assert summary["bytes_scanned"] == 6 * 1024 * 1024  # the point's scan alone
    assert summary["frozen_seconds"] is not None
    assert b3(receiver.dir / "vm" / "disk.img") == b3(disk)


def test_a_copy_before_the_freeze_that_ends_unsynced_still_ships(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A cycle that copies first (here `--resync`: its basis is the replica's) waits for the
    receiver to hold the copy before it freezes the guest. When the copy's last records
    were not synced yet (a configuration file alone changed; or a disk's last batch came
    while a background sync ran), they never shipped, and the sender waited for ever, a
    continuous one with its replica going stale and its status saying `replicating`."""
    disk, config, state = _disk(tmp_path), tmp_path / "vm.xml", tmp_path / "state"
    config.write_text("<domain>v1</domain>")
    hooks = ("--pre-hook", "true", "--post-hook", "true")

    def send(*extra: str) -> subprocess.CompletedProcess[str]:
        return replicator(
            "send", "--to", receiver.address, "--job", "vm", "--state-dir", str(state),
            "--once", "--insecure", *hooks, *extra, str(disk), str(config), timeout=30,
        )  # fmt: skip

    assert send().returncode == 0
    config.write_text("<domain>v2</domain>")
    out = send("--resync")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (receiver.dir / "vm" / "vm.xml").read_text() == "<domain>v2</domain>"
    assert b3(receiver.dir / "vm" / "disk.img") == b3(disk)
    config.write_text("<domain>v3</domain>")
    proc = start_send(  # the same in a continuous sender, whose first cycle copies first
        receiver.address, "vm", state, disk, config, extra=("--interval", "0.5", *hooks)
    )
    try:
        replica = receiver.dir / "vm" / "vm.xml"
        wait_for(lambda: replica.read_text() == "<domain>v3</domain>", proc, "v3", timeout=30)
    finally:
        rc, err = stop_and_read(proc)
    assert rc == 0, err[-3000:]


def test_a_sender_killed_at_the_freeze_after_its_copy_moves_no_point_and_converges(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """The copy before the freeze reaches the receiver as records with no barrier. SIGKILL
    the sender right at the freeze (its pre hook kills it), after the guest wrote an
    extent back to what the last point holds: the replica stays at that point (nothing
    is called durable), and the next send, whose saved manifests still say the old
    content, must not take the copy for the replica: it converges to the source."""
    disk, state = _disk(tmp_path, 4 * 1024 * 1024), tmp_path / "state"
    assert _send(receiver, tmp_path, disk).returncode == 0
    replica, point = receiver.dir / "vm" / "disk.img", _point(receiver)
    at_point = b3(replica)
    old = tmp_path / "old.bin"
    old.write_bytes(disk.read_bytes()[1024 * 1024 : 1024 * 1024 + 65536])
    with disk.open("r+b") as f:  # the change the copy ships...
        f.seek(1024 * 1024)
        f.write(os.urandom(65536))
    write_back = f"dd if={old} of={disk} bs=64K seek=16 conv=notrunc status=none"
    out = _send(  # ...undone by the guest just before its freeze, which kills the sender
        receiver, tmp_path, disk, "--pre-hook", f"{write_back} && kill -9 $PPID",
        "--post-hook", "true",
    )  # fmt: skip
    assert out.returncode == -signal.SIGKILL, out.stderr
    now = _point(receiver)
    assert (now["lsn"], now["consistent"]) == (point["lsn"], True), (point, now)
    assert b3(replica) == at_point  # the copy waits unapplied: no point, no change
    assert b3(disk) == at_point  # the source is back at the last point too
    out = replicator("status", "--dir", str(receiver.dir), "--json")
    [job] = [j for j in json.loads(out.stdout)["jobs"] if j["job"] == "vm"]
    assert job["lsn"]["received"] > point["lsn"], job["lsn"]  # the copy had arrived

    assert _send(receiver, tmp_path, disk).returncode == 0
    assert b3(replica) == b3(disk)
    assert qemu_compare("raw", disk, replica).returncode == 0
    verify = replicator(
        "verify", "--to", receiver.address, "--job", "vm", "--state-dir", str(state),
        "--insecure", str(disk),
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_paused_link_never_holds_the_guest_frozen(tmp_path: Path, receiver: ReceiverProc) -> None:
    """`replicator rate 0` (or a schedule's office hours at 0): the journal fills with
    small changes, and a frozen scan that needed room in it would wait for the link, the
    guest frozen until the rate came back. Such a cycle copies first, unfrozen."""
    disk, frozen, state = _disk(tmp_path, 8 * 1024 * 1024), tmp_path / "frozen", tmp_path / "st"
    hooks = ("--pre-hook", f"touch {frozen}", "--post-hook", f"rm -f {frozen}")
    proc = start_send(
        receiver.address, "vm", state, disk,
        extra=("--interval", "0.5", "--journal-max", "4M", *hooks),
    )  # fmt: skip
    try:
        replica = receiver.dir / "vm" / "disk.img"
        wait_for(lambda: replica.exists() and b3(replica) == b3(disk), proc, "the first sync")
        with disk.open("r+b") as f:  # a small change: the next cycles do not copy first
            f.write(os.urandom(4096))
        wait_for(lambda: b3(replica) == b3(disk), proc, "a small change")
        assert replicator("rate", "--state-dir", str(state), "0").returncode == 0
        for i in range(8):  # each under a quarter of the cap, a cycle each; then no room
            epoch = sender_job(state)["last_epoch"]
            with disk.open("r+b") as f:
                f.seek(i * 1024 * 1024)
                f.write(os.urandom(700 * 1024))
            deadline = time.monotonic() + 3
            while sender_job(state)["last_epoch"] == epoch and time.monotonic() < deadline:
                time.sleep(0.1)
            if sender_job(state)["last_epoch"] == epoch:
                break  # the cycle waits for the link: frozen or not is the question
        else:
            raise AssertionError("eight cycles journaled past a 4 MiB cap with the link paused")
        time.sleep(1.0)
        assert not frozen.exists(), "the guest is frozen while the link is paused"
        assert sender_job(state)["state"] == "paused"
        assert replicator("rate", "--state-dir", str(state), "unlimited").returncode == 0
        wait_for(lambda: b3(replica) == b3(disk), proc, "the replica after the pause")
    finally:
        rc, err = stop_and_read(proc)
    assert rc == 0, err[-3000:]


def test_hooks_with_live_capture_are_refused(tmp_path: Path) -> None:
    out = replicator(
        "send", "--to", "127.0.0.1:9", "--job", "vm", "--insecure", "--capture", "nbd",
        "--nbd-socket", str(tmp_path / "nbd.sock"), "--pre-hook", "true", str(_disk(tmp_path)),
    )  # fmt: skip
    assert out.returncode == ExitCode.USAGE, out.stderr
    assert "--pre-hook only applies to --capture scan" in one_line_error(out.stderr)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_changes_larger_than_the_journal_made_during_the_copy_never_hold_the_guest_frozen(
    tmp_path: Path, receiver: ReceiverProc, stop: signal.Signals
) -> None:
    """The guest wrote more than the journal holds while its last changes were copied
    (a busy VM during a long first sync over a WAN), and the link is paused (`replicator
    rate 0`): the frozen scan finds no room in the journal. It thaws at once rather than
    wait for the link frozen, and the changes are copied first, unfrozen. SIGTERM stops the
    sender at once; SIGKILL right there leaves the released scan's records journaled with
    no barrier. Either way the replica's point does not move, and the next run converges
    (what was journaled frozen is sent again)."""
    disk, frozen, trigger = _disk(tmp_path, 8 * 1024 * 1024), tmp_path / "frozen", tmp_path / "big"
    state, armed, thawed = tmp_path / "state", tmp_path / "armed", tmp_path / "thawed"
    pause = " ".join([*REPLICATOR, "rate", "--state-dir", str(state), "0"])
    pre = (
        f"if [ -e {trigger} ]; then rm {trigger} && touch {armed} && {pause} >/dev/null && "
        f"head -c 8M /dev/urandom | dd of={disk} conv=notrunc status=none; fi; touch {frozen}"
    )
    post = f"rm -f {frozen}; if [ -e {armed} ]; then rm {armed} && touch {thawed}; fi"
    proc = start_send(
        receiver.address, "vm", state, disk,
        extra=("--interval", "0.5", "--journal-max", "4M", "--pre-hook", pre,
               "--post-hook", post),
    )  # fmt: skip
    try:
        replica = receiver.dir / "vm" / "disk.img"
        wait_for(lambda: replica.exists() and b3(replica) == b3(disk), proc, "the first sync")
        trigger.touch()
        # the large freeze is released, however slow the machine: held frozen, it would
        # stay so until the rate is above 0
        wait_for(thawed.exists, proc, "the guest thawed with the link paused", 60)
        time.sleep(1.0)  # the copy waits for the link, the guest not frozen again
        assert sender_job(state)["state"] == "paused"
        assert not frozen.exists(), "the guest is held frozen while the link is paused"
        held = _point(receiver)
        started = time.monotonic()
        if stop is signal.SIGKILL:
            proc.kill()
        rc, err = stop_and_read(proc, timeout=30)  # else one SIGTERM: a graceful stop
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == (0 if stop is signal.SIGTERM else -signal.SIGKILL), err[-3000:]
    assert stopped_in < 10, f"the sender took {stopped_in:.1f} s to stop"
    assert "sender.freeze_released" in err
    assert _point(receiver) == held  # nothing released or copied since counts as a point
    out = _send(receiver, tmp_path, disk, "--rate", "unlimited", "--journal-max", "4M")
    assert out.returncode == 0, out.stderr
    assert b3(replica) == b3(disk)
    assert qemu_compare("raw", replica, disk).returncode == 0


def test_what_a_released_freeze_journaled_is_sent_again_even_if_written_back(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A frozen scan that found no room is released with part of its changes journaled;
    they reach the replica before the next point. The guest writes those extents back to
    their old content before the copy that follows: the copy must send them again, or the
    replica would keep the journaled bytes the disk no longer holds."""
    disk, wrote, trigger = _disk(tmp_path, 8 * 1024 * 1024), tmp_path / "wrote", tmp_path / "big"
    assert _send(receiver, tmp_path, disk).returncode == 0, "first sync"
    before = tmp_path / "before.img"
    before.write_bytes(disk.read_bytes())
    pre = (
        f"if [ -e {trigger} ]; then rm {trigger} && touch {wrote} && "
        f"head -c 8M /dev/urandom | dd of={disk} conv=notrunc status=none; fi"
    )
    post = f"if [ -e {wrote} ]; then rm {wrote} && dd if={before} of={disk} conv=notrunc; fi"
    trigger.touch()
    out = _send(
        receiver, tmp_path, disk, "--rate", "2MB/s", "--journal-max", "4M",
        "--pre-hook", pre, "--post-hook", post,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sender.freeze_released" in out.stderr
    assert disk.read_bytes() == before.read_bytes()
    replica = receiver.dir / "vm" / "disk.img"
    assert b3(replica) == b3(disk)
    assert qemu_compare("raw", replica, disk).returncode == 0


def test_a_guest_that_outwrites_the_journal_at_every_freeze_gets_no_point_and_is_thawed(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk, frozen = _disk(tmp_path, 8 * 1024 * 1024), tmp_path / "frozen"
    assert _send(receiver, tmp_path, disk).returncode == 0, "first sync"
    point = _point(receiver)
    pre = f"head -c 8M /dev/urandom | dd of={disk} conv=notrunc status=none && touch {frozen}"
    out = _send(
        receiver, tmp_path, disk, "--rate", "2MB/s", "--journal-max", "4M",
        "--pre-hook", pre, "--post-hook", f"rm {frozen}",
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG, out.stderr[-3000:]
    error = one_line_error(out.stderr)
    assert "no consistency point" in error and "--journal-max" in error, error
    assert out.stderr.count("sender.freeze_released") == 3
    assert not frozen.exists(), "the guest was left frozen"
    assert _point(receiver) == point  # what was copied and journaled waits for a point
    out = _send(receiver, tmp_path, disk)
    assert out.returncode == 0, out.stderr[-3000:]
    replica = receiver.dir / "vm" / "disk.img"
    assert b3(replica) == b3(disk)
    assert qemu_compare("raw", replica, disk).returncode == 0


def test_a_cycle_held_by_a_slow_freeze_shows_in_the_lag(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A guest agent that takes its time (or a hung read) holds a cycle: the sender is
    connected and its journal is empty, and it said "lag 0.0 s" (and so did
    replicator_lag_seconds) while a write made meanwhile was on the source only."""
    disk, slow, state = _disk(tmp_path), tmp_path / "slow", tmp_path / "state"
    proc = start_send(
        receiver.address, "vm", state, disk,
        extra=(
            "--interval", "0.3", "--hook-timeout", "100",
            "--pre-hook", f"while [ -e {slow} ]; do sleep 0.1; done", "--post-hook", "true",
        ),
    )  # fmt: skip
    try:
        replica = receiver.dir / "vm" / "disk.img"
        wait_for(lambda: replica.exists() and b3(replica) == b3(disk), proc, "the first point")
        wait_for(lambda: float(sender_job(state)["lag"]["seconds"]) < 1.0, proc, "a small lag")
        slow.touch()
        time.sleep(1.0)  # the next cycle's freeze waits now
        with disk.open("r+b") as f:
            f.write(os.urandom(4096))
        wait_for(lambda: float(sender_job(state)["lag"]["seconds"]) >= 3.0, proc, "the lag grows")
        assert b3(replica) != b3(disk)  # the write is on the source only
        slow.unlink()
        wait_for(lambda: b3(replica) == b3(disk), proc, "the write replicated")
        wait_for(lambda: float(sender_job(state)["lag"]["seconds"]) < 1.0, proc, "a small lag")
    finally:
        rc, err = stop_and_read(proc)
    assert rc == 0, err[-3000:]


def test_a_stop_during_a_slow_freeze_does_not_wait_for_it(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """SIGTERM while a continuous sender's pre hook ran waited for the hook (up to
    --hook-timeout: systemd's stop timeout could SIGKILL the sender with the guest
    frozen). The freeze is killed, the thaw runs, and the sender stops at once."""
    disk, slow, state = _disk(tmp_path), tmp_path / "slow", tmp_path / "state"
    thawed = tmp_path / "thawed"
    proc = start_send(
        receiver.address, "vm", state, disk,
        extra=(
            "--interval", "0.3", "--hook-timeout", "100",
            "--pre-hook", f"if [ -e {slow} ]; then touch {slow}.held; sleep 60; fi",
            "--post-hook", f'echo "$REPLICATOR_PRE_RESULT" >> {thawed}',
        ),
    )  # fmt: skip
    try:
        wait_for(lambda: thawed.exists(), proc, "a first cycle")
        slow.touch()
        wait_for(lambda: (tmp_path / "slow.held").exists(), proc, "the slow freeze")
        asked = time.monotonic()
        rc, err = stop_and_read(proc, timeout=60)
        waited = time.monotonic() - asked
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err[-3000:]
    assert waited < 10, f"the stop waited {waited:.1f} s for the freeze"
    assert thawed.read_text().splitlines()[-1] == "failed"  # the thaw ran after it
    assert '"event": "sender.hook_stopped"' in err


def test_a_pre_hook_without_a_post_hook_is_warned_about(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """Nothing would thaw what such a freeze froze; it was accepted silently (and the
    summary said "guest frozen 0.01 s")."""
    out = _send(receiver, tmp_path, _disk(tmp_path), "--pre-hook", "true")
    assert out.returncode == 0, out.stderr
    assert '"event": "sender.pre_hook_alone"' in out.stderr
    assert "--post-hook" in out.stderr
