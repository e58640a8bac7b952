"""Failover on the target, and split-brain protection, as an admin would run them: real
processes, a qcow2 disk made by qemu-img, a libvirt domain XML sent with it."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from replicator.engine.generations import (
    PROMOTED_FILE,
    Promotion,
    load_promotion,
    session_refusal,
)
from tests.tools import (
    ENV,
    REPLICATOR,
    b3,
    one_line_error,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    send_once,
    start_receiver,
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
    sender = subprocess.Popen(
        [*REPLICATOR, "send", "--to", rcv.address, "--job", "vm1", "--state-dir", str(state),
         "--insecure", "--interval", "0.2", str(disk), str(xml)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
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
            stale = replicator(
                "send", "--to", rcv.address, "--job", "vm1", "--state-dir", str(state),
                "--once", "--insecure", *extra, str(disk), str(xml),
            )  # fmt: skip
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
        plain = replicator(
            "send", "--to", rcv.address, "--job", "vm1", "--state-dir", str(state),
            "--once", "--insecure", str(disk), str(xml),
        )  # fmt: skip
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
        stale = replicator(
            "send", "--to", rcv.address, "--job", "vm1", "--state-dir", str(state), "--once",
            "--insecure", str(disk),
        )  # fmt: skip
        assert stale.returncode == ExitCode.SPLIT_BRAIN, stale.stderr
        opened = json.loads(status("--json").stdout)["jobs"][0]
        assert "source" not in opened  # the process's own view of the job
        assert {k: opened[k] for k in PROMOTION_KEYS} == {k: job[k] for k in PROMOTION_KEYS}
    finally:
        assert rcv.stop() == 0
