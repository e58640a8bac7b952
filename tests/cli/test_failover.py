"""Failover on the target, and split-brain protection, as an admin would run them: real
processes, a qcow2 disk made by qemu-img, a libvirt domain XML sent with it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from replicator.engine.at_rest import sender_at_rest
from replicator.engine.errors import ExitCode
from replicator.engine.generations import (
    PROMOTED_FILE,
    Promotion,
    load_promotion,
    session_refusal,
)
from replicator.transport.wan import LinkProfile
from tests.cli.test_network_faults import ProxyThread
from tests.tools import (
    ENV,
    REPLICATOR,
    LiveNbdSender,
    LoggedPopen,
    ReceiverProc,
    b3,
    forced_failover,
    is_mounted,
    logs_after_failure,
    one_line_error,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    send_once,
    start_fuse_sender,
    start_receiver,
    wait_for,
)

DOMAIN = """<domain type='kvm'>
  <!-- the admin's comment stays -->
  <name>vm1</name>
  <devices>
    <disk type='file' device='disk'>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/installer.iso'/>
    </disk>
  </devices>
</domain>
"""


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    disk = src / "vm1.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "64M")
    qemu_io("qcow2", disk, "write -P 0x11 0 4M", "write -P 0x22 32M 1M")
    xml = src / "vm1.xml"
    xml.write_text(DOMAIN.format(disk=disk))
    return disk, xml


def test_forced_failover_promotes_and_a_stale_source_is_refused(
    tmp_path: Path, source: tuple[Path, Path]
) -> None:
    disk, xml = source
    target = tmp_path / "target"
    state = tmp_path / "state"
    rcv = start_receiver(target)
    try:
        send_once(rcv, "vm1", state, disk, xml)
    finally:
        assert rcv.stop() == 0
    replica = target / "vm1" / disk.name

    # the source keeps replicating (a continuous sender) until the target takes over
    # through its running receiver: the session is cut, the sender is refused from then on
    rcv = start_receiver(target)
    sender = LoggedPopen(
        [*REPLICATOR, "send", "--to", rcv.address, "--job", "vm1", "--state-dir", str(state),
         "--insecure", "--interval", "0.2", str(disk), str(xml)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        time.sleep(2)
        started = tmp_path / "vm-started"
        out = replicator(
            "failover", "--dir", str(target), "--job", "vm1", "--force", "--json",
            "--exec", f"touch {started}",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["through"] == "the running receiver"
        _, err = sender.communicate(timeout=60)
        assert sender.returncode == ExitCode.SPLIT_BRAIN, err[-2000:]
    finally:
        if sender.poll() is None:
            sender.kill()
        assert rcv.stop() == 0
    assert result["generation"] == 2 and result["previous_generation"] == 1
    assert result["point_lsn"] > 0 and result["point_time"]
    assert 0 <= result["rto_seconds"] < 30 and result["exec_pid"]
    assert qemu_compare("qcow2", disk, replica).returncode == 0
    # the domain now names the replica; the CD-ROM (not replicated) is left alone
    promoted_xml = (target / "vm1" / xml.name).read_text()
    assert f"file='{replica}'" in promoted_xml or f'file="{replica}"' in promoted_xml
    assert "/isos/installer.iso" in promoted_xml and "the admin's comment" in promoted_xml
    assert (target / "vm1" / (xml.name + ".pre-failover")).read_text() == xml.read_text()
    for _ in range(100):
        if started.exists():
            break
        time.sleep(0.05)
    assert started.exists()

    # the VM writes on the target; the old source comes back with writes of its own
    qemu_io("qcow2", replica, "write -P 0x33 8M 1M")
    before = b3(replica)
    qemu_io("qcow2", disk, "write -P 0x44 16M 1M")
    rcv = start_receiver(target)
    try:
        for extra in ((), ("--resync",)):
            stale = _from_source("send", rcv, state, "--once", *extra, str(disk), str(xml))
            assert stale.returncode == ExitCode.SPLIT_BRAIN, stale.stderr
            line = one_line_error(stale.stderr)
            assert "split brain" in line and "generation 2" in line and "failback" in line
        assert b3(replica) == before  # untouched
    finally:
        assert rcv.stop() == 0

    # failover again, at rest this time: idempotent
    again = replicator("failover", "--dir", str(target), "--job", "vm1", "--force", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["already_promoted"] is True

    # the explicit way back: demote (discarding the target's writes), then --resync
    no = replicator("demote", "--dir", str(target), "--job", "vm1")
    assert no.returncode == ExitCode.CONFIG and "--discard-changes" in no.stderr
    ok = replicator("demote", "--dir", str(target), "--job", "vm1", "--discard-changes")
    assert ok.returncode == 0, ok.stderr
    rcv = start_receiver(target)
    try:
        plain = _from_source("send", rcv, state, "--once", str(disk), str(xml))
        assert plain.returncode == ExitCode.SPLIT_BRAIN
        assert "generation 2, this source at 1" in one_line_error(plain.stderr)
        send_once(rcv, "vm1", state, disk, xml, extra=("--resync",))
        assert qemu_compare("qcow2", disk, replica).returncode == 0
        qemu_io("qcow2", disk, "write -P 0x55 40M 64k")
        summary = send_once(rcv, "vm1", state, disk, xml)  # the histories are one again
        assert summary["basis"] == "local"
        assert qemu_compare("qcow2", disk, replica).returncode == 0
    finally:
        assert rcv.stop() == 0


def test_failover_of_an_unknown_job(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    out = replicator("failover", "--dir", str(tmp_path / "target"), "--job", "nope", "--force")
    assert out.returncode == ExitCode.CONFIG
    assert "unknown job" in one_line_error(out.stderr)


def test_a_damaged_promotion_refuses_every_writer(tmp_path: Path) -> None:
    (tmp_path / PROMOTED_FILE).write_bytes(b"garbage")
    promotion = load_promotion(tmp_path)
    assert promotion is not None and promotion.damaged
    refusal = session_refusal(
        "j", sender_generation=1, replica_generation=1, promotion=promotion, fresh=False,
        purpose=frozenset({"resync"}),
    )  # fmt: skip
    assert refusal is not None and refusal[0] == "promoted"


@pytest.mark.parametrize(
    ("sender", "replica", "promoted", "fresh", "purpose", "code"),
    [
        (1, 1, False, False, set(), None),
        (0, 3, False, False, set(), None),  # the sender does not know yet: it learns
        (2, 0, False, True, set(), None),  # a new replica takes any history
        (2, 0, False, False, set(), None),  # a rebuilt applied.state forgot it: learns
        (1, 2, False, False, set(), "generation"),
        (1, 2, False, False, {"resync"}, None),  # the explicit choice
        (1, 2, True, False, {"resync"}, "promoted"),  # never over a promoted replica
        (2, 2, True, False, set(), "promoted"),
        (1, 2, True, False, {"verify"}, None),  # reading is fine
    ],
)
def test_the_split_brain_rule(
    sender: int, replica: int, promoted: bool, fresh: bool, purpose: set[str], code: str | None
) -> None:
    promotion = Promotion(replica, replica - 1, 1, 5, 1) if promoted else None
    refusal = session_refusal(
        "j", sender_generation=sender, replica_generation=replica, promotion=promotion,
        fresh=fresh, purpose=frozenset(purpose),
    )  # fmt: skip
    assert (refusal[0] if refusal else None) == code


PROMOTION_KEYS = ("state", "promoted", "generation", "promotion", "role_change")


def test_status_shows_a_promoted_job_at_rest_and_live(tmp_path: Path) -> None:
    disk, state, target = tmp_path / "vm1.raw", tmp_path / "state", tmp_path / "target"
    qemu_img("create", "-q", "-f", "raw", str(disk), "4M")
    qemu_io("raw", disk, "write -P 0x11 0 1M")
    rcv = start_receiver(target)
    try:
        send_once(rcv, "vm1", state, disk)
    finally:
        assert rcv.stop() == 0

    def status(*extra: str) -> subprocess.CompletedProcess[str]:
        out = replicator("status", "--dir", str(target), *extra)
        assert out.returncode == 0, out.stderr
        return out

    plain = json.loads(status("--json").stdout)["jobs"][0]
    assert plain["state"] == "not_running" and plain["promoted"] is False
    assert plain["promotion"] is None and "role_change" not in plain
    out = replicator("failover", "--dir", str(target), "--job", "vm1", "--force", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)

    snap = json.loads(status("--json").stdout)
    assert snap["running"] is False
    job = snap["jobs"][0]
    assert job["state"] == "promoted" and job["promoted"] is True and job["generation"] == 2
    promotion = job["promotion"]
    assert (promotion["generation"], promotion["previous_generation"]) == (2, 1)
    assert promotion["point_lsn"] == result["point_lsn"] > 0
    assert promotion["point_time"] == result["point_time"]
    age = time.time() - datetime.fromisoformat(promotion["at"]).timestamp()
    assert 0 <= age < 60, promotion["at"]
    assert job["role_change"]["phase"] == "promoted"
    assert "replicator failback" in job["role_change"]["next"]
    text = " ".join(status().stdout.split())  # the table a person reads
    assert f"promoted: by failover at {promotion['at']} (generation 1 -> 2" in text
    assert "replicator failback --from" in text and "--discard-changes" in text

    # a running receiver says the same: for a job it has not served since it started
    # (read from its files), and once a session opened the job (its own snapshot)
    rcv = start_receiver(target)
    try:
        live = json.loads(status("--json").stdout)
        assert live["running"] is True and live["jobs"][0]["source"] == "files"
        assert {k: live["jobs"][0][k] for k in PROMOTION_KEYS} == {
            k: job[k] for k in PROMOTION_KEYS
        }
        stale = _from_source("send", rcv, state, "--once", str(disk))
        assert stale.returncode == ExitCode.SPLIT_BRAIN, stale.stderr
        opened = json.loads(status("--json").stdout)["jobs"][0]
        assert "source" not in opened  # the process's own view of the job
        assert {k: opened[k] for k in PROMOTION_KEYS} == {k: job[k] for k in PROMOTION_KEYS}
    finally:
        assert rcv.stop() == 0


EXTENT = 64 * 1024


class MountWriter(threading.Thread):
    """Writes 64 KiB blocks at distinct offsets of a raw disk through the FUSE mount, one
    ``qemu-io`` (write, flush) each, until stopped; remembers the acknowledged ones
    (offset -> pattern) and counts the refused ones."""

    def __init__(self, disk: Path) -> None:
        super().__init__(daemon=True)
        self.disk, self.next = disk, 0
        self.disk_size = disk.stat().st_size  # distinct offsets: room for ~10 s of writes
        self.acked: dict[int, int] = {}
        self.failed = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set() and self.next < self.disk_size:
            pattern = (self.next // EXTENT) % 250 + 1
            out = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {self.next} 64k",
                 "-c", "flush", str(self.disk)],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if out.returncode == 0 and "error" not in (out.stdout + out.stderr).lower():
                self.acked[self.next] = pattern
            else:
                self.failed += 1
                time.sleep(0.02)
            self.next += EXTENT


def test_planned_failover_of_a_fuse_capturing_sender_loses_nothing(tmp_path: Path) -> None:
    """The FUSE counterpart of test_failback.py's NBD test: at the handover the mount is
    removed (engine/live.py stops the capture before the final point), so every write
    acknowledged through it is in the promoted replica and later ones find no disk."""
    source, mnt, state = tmp_path / "vm", tmp_path / "mnt", tmp_path / "state"
    source.mkdir()
    mnt.mkdir()
    disk, xml = source / "disk.raw", source / "vm.xml"
    qemu_img("create", "-q", "-f", "raw", str(disk), "64M")
    xml.write_text(DOMAIN.format(disk=disk))
    target = tmp_path / "target"
    replica = target / "fvm"
    rcv = start_receiver(target)
    sender = start_fuse_sender(rcv, tmp_path, source, mnt)  # job fvm, state in tmp_path/state
    work = MountWriter(mnt / disk.name)
    try:
        work.start()
        with (mnt / xml.name).open("a") as f:  # the admin edits the configuration
            f.write("<!-- memory 4096 -->\n")
            f.flush()
            os.fsync(f.fileno())
        time.sleep(1.0)  # the workload runs: some writes replicated, some in flight
        out = replicator(
            "failover", "--dir", str(target), "--job", "fvm", "--planned", "--timeout", "20",
            "--json",
        )  # fmt: skip
        if out.returncode != 0:  # keep what both logged (how a crash here was diagnosed)
            logs = logs_after_failure(sender=sender, receiver=rcv.proc)
            raise AssertionError(f"{out.stderr}\n{logs}")
        result = json.loads(out.stdout)
        _, err = sender.communicate(timeout=30)
        assert sender.returncode == ExitCode.HANDED_OVER, err[-3000:]
        assert "handed over" in one_line_error(err)
        # the capture has stopped: the mount is gone, writes through it find no disk
        assert not is_mounted(mnt)
        assert not (mnt / disk.name).exists()
        time.sleep(0.3)  # writes after the handover: none is acknowledged
        work.halt.set()
        work.join(timeout=30)
    finally:
        work.halt.set()
        if sender.poll() is None:
            sender.kill()
            sender.wait(timeout=30)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        assert rcv.stop() == 0
    assert result["planned"] is True and result["generation"] == 2
    assert 0 < result["rto_seconds"] < 10
    assert len(work.acked) >= 3 and work.failed >= 1  # writes on both sides of the handover
    # every acknowledged write is in the promoted replica; it equals the source exactly
    with (replica / disk.name).open("rb") as f:
        for offset, pattern in work.acked.items():
            f.seek(offset)
            assert f.read(EXTENT) == bytes([pattern]) * EXTENT, offset
    assert qemu_compare("raw", disk, replica / disk.name).returncode == 0
    assert b3(disk) == b3(replica / disk.name)
    # the configuration as the source last wrote it; promotion points the domain at the replica
    assert "memory 4096" in xml.read_text()
    assert b3(xml) == b3(replica / (xml.name + ".pre-failover"))
    promoted_xml = (replica / xml.name).read_text()
    path = replica / disk.name
    assert f"file='{path}'" in promoted_xml or f'file="{path}"' in promoted_xml
    assert "memory 4096" in promoted_xml
    # the source may not send again until it takes the job back
    rcv = start_receiver(target)
    try:
        again = replicator(
            "send", "--to", rcv.address, "--job", "fvm", "--state-dir", str(state), "--once",
            "--insecure", str(disk), str(xml),
        )  # fmt: skip
        assert again.returncode == ExitCode.SPLIT_BRAIN, again.stderr
        line = one_line_error(again.stderr)
        assert "handed over" in line and "replicator failback" in line
    finally:
        assert rcv.stop() == 0
    assert sender_at_rest(state)["jobs"][0]["state"] == "handed_over"  # what `status` shows


def test_a_planned_failover_whose_request_the_link_lost_asks_the_senders_next_session(
    tmp_path: Path,
) -> None:
    """The link drops while the handover request is on its way (held in the WAN
    emulator's delay line, then cut): the sender never heard it, and reconnects. The
    failover asks its new session, within the same --timeout, and promotes at that
    session's final point. (It failed at once, "the sender's session ended before its
    final point", leaving an operator to run it again.)"""
    log = tmp_path / "receiver.log"
    rcv = start_receiver(tmp_path / "target", log=log)
    proxy = ProxyThread(("127.0.0.1", rcv.port))
    sender = LiveNbdSender(tmp_path, dataclasses.replace(rcv, port=proxy.address[1]))
    failover: subprocess.Popen[str] | None = None
    try:
        sender.write("write -P 0x11 0 4M")
        wait_for(sender.caught_up, sender.proc, "the first write to be replicated")
        proxy.call(lambda: setattr(proxy.wan, "profile", LinkProfile(delay=3.0)))
        failover = subprocess.Popen(
            [*REPLICATOR, "failover", "--dir", str(rcv.dir), "--job", "vm1", "--planned",
             "--timeout", "60", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        wait_for(lambda: "handover_requested" in log.read_text(), failover, "the request")
        proxy.call(proxy.wan.cut)  # the request, 3 s from the sender, is lost with the link
        proxy.call(lambda: setattr(proxy.wan, "profile", LinkProfile(delay=0.002)))
        out, err = failover.communicate(timeout=90)
        assert failover.returncode == 0, err[-3000:]
        assert json.loads(out)["planned"] is True
        assert "handover_retried" in log.read_text()
        rc, err = sender.stop()
        assert rc == ExitCode.HANDED_OVER, err[-3000:]
        assert "handed over" in one_line_error(err)
        sender.sock.unlink(missing_ok=True)
        compared = qemu_compare("raw", sender.source, sender.replica)
        assert compared.returncode == 0, compared.stdout + compared.stderr
        assert b3(sender.source) == b3(sender.replica)
    finally:
        if failover is not None and failover.poll() is None:
            failover.kill()
        sender.stop()
        proxy.close()
        rcv.stop()


def test_an_overlay_sent_without_its_backing_file_is_told_at_send_and_at_failover(
    tmp_path: Path,
) -> None:
    """A qcow2 overlay replicated alone is a faithful copy no VM can start from: `send` says
    so while it can be fixed, and `failover` says so again before the VM is started."""
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(src / "base.qcow2"), "16M")
    qemu_io("qcow2", src / "base.qcow2", "write -P 0x11 0 1M")
    over = src / "over.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(over))
    qemu_io("qcow2", over, "write -P 0x22 1M 64k")
    target = tmp_path / "target"
    rcv = start_receiver(target)
    try:
        out = replicator("send", "--to", rcv.address, "--job", "vm1", "--state-dir",
                         str(tmp_path / "state"), "--once", "--insecure", str(over))  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "send.image_dependency" in out.stderr
        assert "backing file 'base.qcow2'" in out.stderr and "not replicated" in out.stderr
        assert b3(target / "vm1" / over.name) == b3(over)  # replicated byte for byte all the same
    finally:
        assert rcv.stop() == 0
    promoted = replicator("failover", "--force", "--dir", str(target), "--job", "vm1")
    assert promoted.returncode == 0, promoted.stderr
    replica = target / "vm1" / over.name
    assert f"warning: {replica}'s backing file 'base.qcow2' is not at" in promoted.stdout
    opened = subprocess.run(["qemu-img", "info", "--backing-chain", str(replica)],
                            capture_output=True, timeout=60, check=False)  # fmt: skip
    assert opened.returncode != 0  # what the warning spares the operator from finding later
    as_json = replicator("failover", "--force", "--json", "--dir", str(target), "--job", "vm1")
    assert as_json.returncode == 0, as_json.stderr
    (warning,) = json.loads(as_json.stdout)["warnings"]
    assert "is not at" in warning


def test_failover_with_a_relative_dir_names_absolute_paths(
    tmp_path: Path, source: tuple[Path, Path]
) -> None:
    """`failover --dir replicas` run from the folder above it (as docs/OPERATIONS.md writes
    it, `--dir DIR`): libvirt takes only absolute disk paths, and --exec runs in the replica
    folder, so the domain XML and REPLICATOR_REPLICA_DIR must not be relative to where
    failover ran (they said `replicas/vm1/vm1.qcow2`, `replicas/vm1`)."""
    disk, xml = source
    target = tmp_path / "replicas"
    rcv = start_receiver(target)
    try:
        send_once(rcv, "vm1", tmp_path / "state", disk, xml)
    finally:
        assert rcv.stop() == 0
    ran = tmp_path / "exec.txt"
    out = subprocess.run(
        [*REPLICATOR, "failover", "--dir", "replicas", "--job", "vm1", "--force",
         "--exec", f"sh -c 'echo \"$REPLICATOR_REPLICA_DIR\" > {ran}'"],
        capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    replica = target / "vm1" / disk.name
    promoted_xml = (target / "vm1" / xml.name).read_text()
    assert f"file='{replica}'" in promoted_xml or f'file="{replica}"' in promoted_xml
    for _ in range(600):  # --exec is left running: wait for what it wrote
        if ran.exists() and ran.read_text().endswith("\n"):
            break
        time.sleep(0.05)
    assert ran.read_text().strip() == str(target / "vm1")


def _from_source(
    command: str, rcv: ReceiverProc, state: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """``replicator COMMAND`` for job vm1 from the source's state folder, to ``rcv``
    (its outcome is the caller's to check)."""
    return replicator(
        command, "--to", rcv.address, "--job", "vm1", "--state-dir", str(state), "--insecure",
        *args,
    )  # fmt: skip


def _synced_then_state_damaged(disk: Path, xml: Path, target: Path, state: Path) -> None:
    """One sync of job vm1, the receiver stopped, then a byte of its applied.state flipped."""
    rcv = start_receiver(target)
    try:
        send_once(rcv, "vm1", state, disk, xml)
    finally:
        assert rcv.stop() == 0
    path = target / ".replicator" / "vm1" / "applied.state"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def _promoted_as_it_is(target: Path) -> dict[str, Any]:
    """``failover --force --allow-inconsistent --json`` of job vm1, which must succeed."""
    out = replicator(
        "failover", "--dir", str(target), "--job", "vm1", "--force", "--allow-inconsistent",
        "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _receiver_job_at_rest(target: Path) -> dict[str, object]:
    out = replicator("status", "--dir", str(target), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    (job,) = json.loads(out.stdout)["jobs"]
    assert isinstance(job, dict)
    return job


def test_a_replica_whose_state_was_damaged_is_compared_before_it_is_trusted(
    tmp_path: Path, source: tuple[Path, Path]
) -> None:
    """Used to be rebuilt "consistent" with its point floor and generation forgotten: a
    comparison cut short or lost records would have been promotable as a point."""
    disk, xml = source
    target, state = tmp_path / "target", tmp_path / "state"
    _synced_then_state_damaged(disk, xml, target, state)
    replica = target / "vm1" / disk.name

    point = _receiver_job_at_rest(target)["consistency_point"]
    assert isinstance(point, dict)
    assert point["consistent"] is False and "was damaged" in point["unknown"]
    table = replicator("status", "--dir", str(target))
    assert "none known" in table.stdout and "--resync" in table.stdout
    refused = replicator("failover", "--dir", str(target), "--job", "vm1", "--force")
    assert refused.returncode == ExitCode.REFUSED, refused.stderr[-2000:]
    assert "was damaged" in refused.stderr and "--allow-inconsistent" in refused.stderr

    qemu_io("qcow2", disk, "write -P 0x33 8M 1M")
    rcv = start_receiver(target)
    try:
        plain = _from_source("send", rcv, state, "--once", "--json", str(disk), str(xml))
        assert plain.returncode == ExitCode.REFUSED, plain.stderr[-2000:]
        assert "the replica is not known" in one_line_error(plain.stderr)
        assert "--resync" in plain.stderr
        assert send_once(rcv, "vm1", state, disk, xml, extra=("--resync",))["basis"] == "remote"
        assert qemu_compare("qcow2", disk, replica).returncode == 0
        qemu_io("qcow2", disk, "write -P 0x44 16M 64k")
        assert send_once(rcv, "vm1", state, disk, xml)["basis"] == "local"  # compared: done
    finally:
        assert rcv.stop() == 0
    assert qemu_compare("qcow2", disk, replica).returncode == 0
    assert b3(replica) == b3(disk)
    point = _receiver_job_at_rest(target)["consistency_point"]
    assert isinstance(point, dict)
    assert point["consistent"] is True and point["unknown"] is None and point["lsn"] > 0


def test_failover_allow_inconsistent_takes_the_replica_as_it_is(
    tmp_path: Path, source: tuple[Path, Path]
) -> None:
    """The source is gone for good and the replica's state was lost: the operator may still
    take it, told plainly that it is no consistency point, and the promotion says so."""
    disk, xml = source
    target, state = tmp_path / "target", tmp_path / "state"
    _synced_then_state_damaged(disk, xml, target, state)
    alone = replicator("failover", "--dir", str(target), "--job", "vm1", "--allow-inconsistent")
    assert alone.returncode == ExitCode.CONFIG and "--force" in alone.stderr

    result = _promoted_as_it_is(target)
    assert result["consistent"] is False and result["generation"] >= 1
    again = replicator("failover", "--dir", str(target), "--job", "vm1", "--force")
    assert again.returncode == 0, again.stderr[-2000:]  # promoted already: kept as it was
    assert "NOT at a consistency point" in again.stdout and "already promoted" in again.stdout
    job = _receiver_job_at_rest(target)
    promotion = job["promotion"]
    assert isinstance(promotion, dict) and promotion["consistent"] is False
    assert b3(target / "vm1" / disk.name) == b3(disk)  # nothing was lost either


def test_a_running_receiver_refuses_an_unknown_replica_with_the_way_out(
    tmp_path: Path, source: tuple[Path, Path]
) -> None:
    """Through the control socket, as at rest: exit 6 naming --allow-inconsistent (it
    used to come back as a failed request, exit 3, "check the request")."""
    disk, xml = source
    target, state = tmp_path / "target", tmp_path / "state"
    _synced_then_state_damaged(disk, xml, target, state)
    rcv = start_receiver(target)
    try:
        refused = replicator("failover", "--dir", str(target), "--job", "vm1", "--force")
        assert refused.returncode == ExitCode.REFUSED, refused.stderr[-2000:]
        error = one_line_error(refused.stderr)
        assert "--allow-inconsistent" in error and "check the request" not in error
        result = _promoted_as_it_is(target)
        assert result["through"] == "the running receiver" and result["consistent"] is False
    finally:
        assert rcv.stop() == 0


def test_verify_repair_also_brings_an_unknown_replica_back(
    tmp_path: Path, source: tuple[Path, Path]
) -> None:
    disk, xml = source
    target, state = tmp_path / "target", tmp_path / "state"
    _synced_then_state_damaged(disk, xml, target, state)
    rcv = start_receiver(target)
    try:
        fixed = _from_source("verify", rcv, state, "--repair", str(disk), str(xml))
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    finally:
        assert rcv.stop() == 0
    point = _receiver_job_at_rest(target)["consistency_point"]
    assert isinstance(point, dict)
    assert point["consistent"] is True and point["unknown"] is None
    assert qemu_compare("qcow2", disk, target / "vm1" / disk.name).returncode == 0


def test_demote_through_the_running_receiver(tmp_path: Path) -> None:
    """Like failover, demote goes through a running receiver (stopping it to demote one
    job would stop every job it serves); the receiver then takes the source's `--resync`
    at once, with no restart."""
    disk, state, target, replica = forced_failover(tmp_path)
    qemu_io("raw", replica, "write -P 0x66 1M 64k")  # the promoted side's write, discarded
    rcv = start_receiver(target)
    try:
        demote = ("demote", "--dir", str(target), "--discard-changes")
        unknown = replicator(*demote, "--job", "nope")
        assert unknown.returncode == ExitCode.CONFIG, unknown.stderr
        assert "unknown job 'nope'" in one_line_error(unknown.stderr)
        ok = replicator(*demote, "--job", "vm")
        assert ok.returncode == 0, ok.stderr
        assert "job vm is a replica again (generation 2)" in ok.stdout
        again = replicator(*demote, "--job", "vm")
        assert again.returncode == ExitCode.CONFIG, again.stderr
        assert "job 'vm' is not promoted" in one_line_error(again.stderr)
        send_once(rcv, "vm", state, disk, extra=("--resync",))
        assert qemu_compare("raw", disk, replica).returncode == 0
        status = replicator("status", "--dir", str(target), "--json")
        [job] = json.loads(status.stdout)["jobs"]
        assert job["promoted"] is False and job["generation"] == 2
    finally:
        assert rcv.stop() == 0


@pytest.mark.parametrize("refused_first", [False, True])
def test_a_replica_changed_on_the_target_is_no_consistency_point(
    tmp_path: Path, source: tuple[Path, Path], refused_first: bool
) -> None:
    """Bytes written into a replica on the target (by hand, by a VM started on it without
    a failover): `failover --force` promoted it as "the consistency point at lsn N", with
    the receiver itself holding it as diverged after a `send` it refused for it."""
    disk, xml = source
    target, state = tmp_path / "target", tmp_path / "state"
    replica = target / "vm1" / disk.name
    rcv = start_receiver(target)
    try:
        send_once(rcv, "vm1", state, disk, xml)
        with replica.open("r+b") as f:
            f.seek(1 << 20)
            f.write(b"TAMPER")
        if refused_first:
            refused = _from_source("send", rcv, state, "--once", str(disk), str(xml))
            assert refused.returncode == ExitCode.REFUSED, refused.stderr[-2000:]
    finally:
        assert rcv.stop() == 0
    point = _receiver_job_at_rest(target)["consistency_point"]
    assert isinstance(point, dict) and point["consistent"] is False  # status looks too
    out = replicator("failover", "--dir", str(target), "--job", "vm1", "--force")
    assert out.returncode == ExitCode.REFUSED, out.stdout + out.stderr[-2000:]
    error = one_line_error(out.stderr)
    assert f"{disk.name!r} was changed outside replication" in error, error
    assert "--allow-inconsistent" in out.stderr and "--resync" in out.stderr
    point = _receiver_job_at_rest(target)["consistency_point"]
    assert isinstance(point, dict) and point["consistent"] is False
    table = replicator("status", "--dir", str(target))
    assert "changed outside replication" in table.stdout, table.stdout
    assert _promoted_as_it_is(target)["consistent"] is False


def test_a_target_folder_with_a_newline_and_an_escape_is_printed_escaped(
    tmp_path: Path,
) -> None:
    """failover's result line printed the replica folder raw: a newline in its name split
    the line, an escape sequence reached the terminal."""
    disk, target = tmp_path / "disk.img", tmp_path / "target\x1b[7m\nx"
    qemu_img("create", "-q", "-f", "raw", str(disk), "1M")
    rcv = start_receiver(target)
    try:
        send_once(rcv, "vm", tmp_path / "state", disk)
    finally:
        assert rcv.stop() == 0
    out = replicator("failover", "--dir", str(target), "--job", "vm", "--force")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("job vm promoted (generation 2): replicas in "), lines
    assert "target\\x1b[7m\\x0ax/vm hold the consistency point" in lines[0]
    assert "\x1b" not in out.stdout
