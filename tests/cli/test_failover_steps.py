"""`replicator failover` failing or killed at each of its durable steps, as an operator
meets it: real processes, the receiver's folder on faultfs (real ENOSPC and EIO from the
kernel), SIGKILL delivered by strace at the syscall that starts a step.

The steps, in order: ``promoted.state`` written (temp file, rename, the folder synced: the
one that decides), the new generation in ``applied.state``, the libvirt domain XML pointed
at the replicas. Before the decision nothing is promoted; after it the job IS promoted,
and the error says so (an operator told only "failed" may start the VM on the source as
well, or reach for options he does not need). Either way `status` tells the same, a
second `failover` converges on one promotion (and says whether it found it done), and the
replica holds exactly the point it claims: `qemu-img compare` with a copy of the source
taken at that point."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from replicator.engine.errors import ExitCode
from tests.cli.test_failover import DOMAIN
from tests.faultfs import FaultFS
from tests.tools import (
    ENV,
    REPLICATOR,
    one_line_error,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    require_tool,
    send_once,
    start_receiver,
)

JOB = "vm1"


@dataclass
class Site:
    target: Path  # the receiver's --dir (on the faultfs mount)
    at_point: Path  # a copy of the source disk as the last send left it
    replica: Path
    xml: Path  # the job's domain XML on the target

    @property
    def state(self) -> Path:
        return self.target / ".replicator" / JOB


def _replicated(tmp_path: Path, mount: Path) -> Site:
    """A qcow2 disk and its domain XML sent once to a receiver on ``mount``, which is
    then stopped; the source copied as it was sent."""
    src = tmp_path / "src"
    src.mkdir()
    disk = src / "vm1.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    qemu_io("qcow2", disk, "write -P 0x11 0 2M", "write -P 0x22 8M 1M")
    (src / "vm1.xml").write_text(DOMAIN.format(disk=disk))
    target = mount / "target"
    rcv = start_receiver(target)
    try:
        send_once(rcv, JOB, tmp_path / "sender-state", disk, src / "vm1.xml")
    finally:
        assert rcv.stop() == 0
    at_point = tmp_path / "at-point.qcow2"
    shutil.copyfile(disk, at_point)
    qemu_io("qcow2", disk, "write -P 0x33 4M 1M")  # the source goes on: never replicated
    return Site(target, at_point, target / JOB / disk.name, target / JOB / "vm1.xml")


def _failover(
    site: Site, *, kill_at: tuple[str, Path] | None = None
) -> subprocess.CompletedProcess[str]:
    """`failover --force --json` at rest; ``kill_at`` (syscall, path): SIGKILL as the
    command enters that syscall on that path (strace; the syscall does not happen)."""
    argv = [*REPLICATOR, "failover", "--dir", str(site.target), "--job", JOB, "--force", "--json"]
    if kill_at is not None:
        call, path = kill_at
        argv = [require_tool("strace"), "-f", "-qq", "-o", "/dev/null", "-e", f"trace={call}",
                "-P", str(path), "-e", f"inject={call}:signal=SIGKILL", *argv]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV, check=False)


def _status(site: Site) -> dict[str, Any]:
    out = replicator("status", "--dir", str(site.target), "--json")
    assert out.returncode == 0, out.stderr
    [job] = json.loads(out.stdout)["jobs"]
    assert isinstance(job, dict)
    return job


def _holds_the_point(site: Site) -> None:
    compared = qemu_compare("qcow2", site.at_point, site.replica)
    assert compared.returncode == 0, compared.stdout + compared.stderr


def _points_at_replica(site: Site) -> bool:
    text = site.xml.read_text()
    return f"file='{site.replica}'" in text or f'file="{site.replica}"' in text


# what fails (faultfs: op, errno, path glob, how often), and whether the job is promoted
FAULTS = {
    "promoted.state not written": (("write", errno.ENOSPC, "*/.promoted.state.tmp", None), False),
    "promoted.state renamed, its folder's sync failed": (
        ("fsyncdir", errno.EIO, f"*/.replicator/{JOB}", 1),
        False,
    ),
    "generation not recorded": (("write", errno.ENOSPC, "*/.applied.state.tmp", None), True),
    "domain XML not rewritten": (("create", errno.ENOSPC, f"*/{JOB}/.rtmp-*", None), True),
}


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_a_failover_failing_at_a_step_says_whether_the_job_is_promoted(
    tmp_path: Path, case: str
) -> None:
    (op, err, glob, times), promoted = FAULTS[case]
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        site = _replicated(tmp_path, fs.mountpoint)
        rule = fs.add(op, err, path=glob, times=times)
        out = _failover(site)
        assert fs.hits()[str(rule)] >= 1, fs.count()
        assert out.returncode == ExitCode.STORAGE, out.stderr[-3000:]
        line = one_line_error(out.stderr)
        assert os.strerror(err) in line, line
        job = _status(site)
        assert job["promoted"] is promoted, job
        if promoted:  # exactly what happened, and what to do and not to do
            assert f"job '{JOB}' IS promoted (generation 2, consistency point lsn" in line, line
            assert "do not start the VM on the source" in line, line
            assert "run the same `replicator failover` again" in line, line
            assert job["promotion"]["generation"] == 2, job
            claimed = job["promotion"]["point_lsn"]
            again = _failover(site)  # the disk still fails: the same answer, nothing new
            assert again.returncode == ExitCode.STORAGE, again.stderr[-3000:]
            assert f"IS promoted (generation 2, consistency point lsn {claimed})" in (
                one_line_error(again.stderr)
            )
        else:
            assert "promoted" not in line.replace("promoted.state", ""), line
            assert not (site.state / "promoted.state").exists()
        fs.clear()
        done = _failover(site)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout)
        assert result["generation"] == 2 and result["already_promoted"] is promoted, result
        if promoted:
            assert result["point_lsn"] == claimed
        assert _status(site)["promotion"]["generation"] == 2
        assert _points_at_replica(site)
        _holds_the_point(site)


# where the command is killed: SIGKILL as it enters (syscall, on the file), promoted after
KILLS = {
    "before promoted.state is renamed": ("rename", ".promoted.state.tmp", False),
    "after promoted.state, before the generation": ("openat", ".applied.state.tmp", True),
    "before the domain XML is read": ("openat", "../../vm1/vm1.xml", True),
}


@pytest.mark.parametrize("case", sorted(KILLS))
def test_a_failover_killed_between_steps_converges_on_one_promotion(
    tmp_path: Path, case: str
) -> None:
    call, name, promoted = KILLS[case]
    site = _replicated(tmp_path, tmp_path)
    path = Path(os.path.normpath(site.state / name))
    out = _failover(site, kill_at=(call, path))
    assert out.returncode == -9, (out.returncode, out.stderr[-3000:])
    job = _status(site)
    assert job["promoted"] is promoted, job
    assert (site.state / "promoted.state").exists() is promoted
    done = _failover(site)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["generation"] == 2 and result["already_promoted"] is promoted, result
    if promoted:
        assert result["point_lsn"] == job["promotion"]["point_lsn"]
    after = _status(site)
    assert after["promoted"] is True and after["promotion"]["generation"] == 2, after
    assert _points_at_replica(site)
    _holds_the_point(site)


def test_through_the_receiver_a_promotion_whose_generation_failed_is_said_and_kept(
    tmp_path: Path,
) -> None:
    """The same failure through a running receiver (its control socket): the answer says
    the job IS promoted, and a demote done afterwards records the promoted generation
    first. It used to demote at the old one: the old source's plain `send` was then
    taken into what the promoted side wrote (its generation matched again) instead of
    being refused until `--resync`, as the demote's own message promises."""
    with FaultFS(tmp_path / "real", tmp_path / "mnt") as fs:
        site = _replicated(tmp_path, fs.mountpoint)
        disk = tmp_path / "src" / "vm1.qcow2"
        rcv = start_receiver(site.target)
        try:
            rule = fs.add("write", errno.ENOSPC, path="*/.applied.state.tmp")
            for _ in range(2):  # and again while the disk is still full: the same answer
                out = replicator("failover", "--dir", str(site.target), "--job", JOB, "--force")
                assert out.returncode == ExitCode.STORAGE, out.stderr[-3000:]
                line = one_line_error(out.stderr)
                assert f"job '{JOB}' IS promoted (generation 2" in line, line
                assert "do not start the VM on the source" in line, line
            assert fs.hits()[str(rule)] >= 2
            assert _status(site)["promoted"] is True
            fs.clear()
            out = replicator("demote", "--dir", str(site.target), "--job", JOB, "--discard-changes")
            assert out.returncode == 0, out.stderr[-3000:]
            assert "generation 2" in out.stdout, out.stdout
            plain = replicator(
                "send", "--to", rcv.address, "--job", JOB, "--state-dir",
                str(tmp_path / "sender-state"), "--once", "--insecure", str(disk),
            )  # fmt: skip
            assert plain.returncode == ExitCode.SPLIT_BRAIN, plain.stderr[-3000:]
            assert "generation" in one_line_error(plain.stderr)
        finally:
            assert rcv.stop() == 0
        _holds_the_point(site)  # nothing of the source's later write reached it
