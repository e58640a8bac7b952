"""An ``applied.state`` put back from an older copy, seen at rest.

A comparison of a replica that never held a point is written straight into it, past the
receive journal. A receiver whose ``applied.state`` is older than that (the journal holds
records before those LSNs and after them) takes the replica as unknown when it opens the
job (``replica_state.against_journal``): redoing the journal's older records would write
them over the comparison's newer bytes. ``status --dir`` and ``failover`` at rest, with no
receiver running, must say the same, or an operator would promote a replica the receiver
itself refuses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from replicator.engine.errors import ExitCode
from tests.tools import b3, replicator, send_once, start_receiver

MiB = 1024 * 1024
JOB = "older"


def _write(disk: Path, offset: int, data: bytes) -> None:
    with disk.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def _older_state_put_back(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A replica whose receive journal holds records from before and after a comparison
    written past it, and an ``applied.state`` put back from before that comparison (no
    receiver running). Returns (disk, sender state, receiver --dir)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    target, state = tmp_path / "target", tmp_path / "state"
    applied = target / ".replicator" / JOB / "applied.state"
    receiver = start_receiver(target)
    try:
        send_once(receiver, JOB, state, disk)  # a first sync: past the journal
        older = applied.read_bytes()
        _write(disk, 0, b"\x22" * 65536)
        send_once(receiver, JOB, state, disk)  # through the receive journal
    finally:
        assert receiver.stop() == 0
    with applied.open("r+b") as f:  # damaged: the replica is unknown until compared
        f.seek(40)
        byte = f.read(1)[0] ^ 0x01
        f.seek(40)
        f.write(bytes([byte]))
    _write(disk, 0, b"\x33" * 65536)  # over the journaled record's bytes
    receiver = start_receiver(target)
    try:
        assert send_once(receiver, JOB, state, disk, extra=("--resync",))["basis"] == "remote"
        _write(disk, MiB, os.urandom(65536))
        assert send_once(receiver, JOB, state, disk)["basis"] == "local"  # the journal again
    finally:
        assert receiver.stop() == 0
    assert b3(target / JOB / disk.name) == b3(disk)
    applied.write_bytes(older)  # "restored from a backup"
    return disk, state, target


def _job_at_rest(target: Path) -> dict[str, Any]:
    out = replicator("status", "--dir", str(target), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    (job,) = json.loads(out.stdout)["jobs"]
    assert isinstance(job, dict)
    return job


def test_status_at_rest_calls_a_replica_with_an_older_applied_state_unknown(
    tmp_path: Path,
) -> None:
    """Used to show the older file's consistency point as consistent (with the journal's
    last barrier pending): a failover decision made from it promotes what the receiver
    refuses."""
    _, _, target = _older_state_put_back(tmp_path)
    applied = target / ".replicator" / JOB / "applied.state"
    older = applied.read_bytes()
    job = _job_at_rest(target)
    point = job["consistency_point"]
    assert point["consistent"] is False, point
    assert "applied.state) is older than its journal" in point["unknown"], point
    assert job["recovery_pending"] is True and job["state_file"] == "damaged"
    table = replicator("status", "--dir", str(target))
    assert table.returncode == 0, table.stderr[-2000:]
    text = " ".join(table.stdout.split())  # the table may wrap its cells
    assert "none known" in text and "older than its journal" in text, table.stdout
    assert "replicator send --resync" in text, table.stdout
    assert applied.read_bytes() == older  # status only reads


def test_failover_at_rest_refuses_a_replica_with_an_older_applied_state(
    tmp_path: Path,
) -> None:
    """As the receiver refuses it: the replica is unknown until `send --resync` compares
    it, or the operator takes it as it is (--allow-inconsistent)."""
    disk, state, target = _older_state_put_back(tmp_path)
    replica = target / JOB / disk.name
    refused = replicator("failover", "--dir", str(target), "--job", JOB, "--force")
    assert refused.returncode == ExitCode.REFUSED, refused.stderr[-2000:]
    # its opening of the job redid no journaled record older than the comparison's bytes
    # (it used to redo them all: the 0x22 record went over the 0x33 the replica held)
    assert b3(replica) == b3(disk)
    assert "applied.state) is older than its journal" in refused.stderr, refused.stderr[-2000:]
    assert "--resync" in refused.stderr and "--allow-inconsistent" in refused.stderr
    assert not (target / ".replicator" / JOB / "promoted.state").exists()
    job = _job_at_rest(target)  # what the refusal left: still unknown, still not promoted
    assert job["state"] == "not_running" and job["consistency_point"]["consistent"] is False
    assert "older than its journal" in job["consistency_point"]["unknown"]
    receiver = start_receiver(target)  # and a comparison makes it a point again
    try:
        assert send_once(receiver, JOB, state, disk, extra=("--resync",))["basis"] == "remote"
    finally:
        assert receiver.stop() == 0
    assert b3(replica) == b3(disk)
    assert _job_at_rest(target)["consistency_point"]["consistent"] is True
