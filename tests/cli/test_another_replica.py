"""A sender aimed at another receiver's replica of a job of the same name."""

from __future__ import annotations

import os
from pathlib import Path

from replicator.engine.errors import ExitCode
from tests.tools import b3, one_line_error, replicator, send_once, start_receiver

MiB = 1024 * 1024


def _disk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(8 * MiB))
    return path


def test_a_sender_aimed_at_another_replica_of_its_job_is_refused(tmp_path: Path) -> None:
    """Two hosts, each with a job `web01` and its own receiver, reach the same LSNs and
    generation. Host 1 aimed at host 2's receiver by mistake used to scan against its own
    manifests, send its one changed MiB, say "durable" (exit 0), and leave a replica that
    was neither disk while it said "consistent"."""
    first, second = _disk(tmp_path / "h1" / "web01.raw"), _disk(tmp_path / "h2" / "web01.raw")
    rcv_a, rcv_b = start_receiver(tmp_path / "a"), start_receiver(tmp_path / "b")
    try:
        send_once(rcv_a, "web01", tmp_path / "h1" / "state", first)
        send_once(rcv_b, "web01", tmp_path / "h2" / "state", second)
        replica_b = rcv_b.dir / "web01" / "web01.raw"
        before = b3(replica_b)
        with first.open("r+b") as f:
            f.seek(MiB)
            f.write(os.urandom(MiB))
        wrong = replicator(
            "send", "--to", rcv_b.address, "--job", "web01",
            "--state-dir", str(tmp_path / "h1" / "state"), "--once", "--insecure", str(first),
        )  # fmt: skip
        assert wrong.returncode == ExitCode.SPLIT_BRAIN, wrong.stderr
        error = one_line_error(wrong.stderr)
        assert "holds another replica of job 'web01'" in error, error
        assert "--resync" in error, error
        assert b3(replica_b) == before  # nothing was written
        # host 2 goes on as before; host 1 goes on with its own receiver
        send_once(rcv_b, "web01", tmp_path / "h2" / "state", second)
        send_once(rcv_a, "web01", tmp_path / "h1" / "state", first)
        assert b3(rcv_a.dir / "web01" / "web01.raw") == b3(first)
        # taken over on purpose: compared, and the replica is host 1's disk from then on
        send_once(rcv_b, "web01", tmp_path / "h1" / "state", first, extra=("--resync",))
        assert b3(replica_b) == b3(first)
        send_once(rcv_b, "web01", tmp_path / "h1" / "state", first)
        refused = replicator(
            "send", "--to", rcv_a.address, "--job", "web01",
            "--state-dir", str(tmp_path / "h1" / "state"), "--once", "--insecure", str(first),
        )  # fmt: skip
        assert refused.returncode == ExitCode.SPLIT_BRAIN, refused.stderr
    finally:
        assert rcv_a.stop() == 0 and rcv_b.stop() == 0


def test_a_new_job_folder_on_the_receiver_is_simply_taken(tmp_path: Path) -> None:
    """The receiver's job folder deleted (the job started over there): it holds nothing, so
    the sender takes the new replica and sends it everything, as before."""
    disk = _disk(tmp_path / "src" / "vm.raw")
    target = tmp_path / "target"
    rcv = start_receiver(target)
    try:
        send_once(rcv, "vm", tmp_path / "state", disk)
    finally:
        assert rcv.stop() == 0
    for folder in (target / "vm", target / ".replicator" / "vm"):
        for path in sorted(folder.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        folder.rmdir()
    rcv = start_receiver(target)
    try:
        send_once(rcv, "vm", tmp_path / "state", disk)
        assert b3(target / "vm" / "vm.raw") == b3(disk)
    finally:
        assert rcv.stop() == 0
