"""The monitor of a process: a receiver's jobs not opened yet come from their files, and a
control socket that cannot be made does not stop replication."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path

import pytest

from replicator.engine import replica_state
from replicator.engine.control import request
from replicator.engine.errors import ExitCode
from replicator.engine.monitor import Monitor, receiver_monitor
from replicator.engine.receiver import Receiver, ReceiverConfig
from replicator.engine.replica_state import ReplicaState
from replicator.engine.status import StatusBoard


async def test_a_receiver_lists_jobs_it_has_not_opened_yet(tmp_path: Path) -> None:
    state_root = tmp_path / "replicas" / ".replicator"
    (state_root / "old").mkdir(parents=True)
    point = ReplicaState(applied_lsn=5, point_lsn=5, point_ts_ns=time.time_ns(), generation=3)
    replica_state.save(state_root / "old", "old", point)
    receiver = Receiver(ReceiverConfig(tmp_path / "replicas", state_root))
    try:
        async with receiver_monitor(receiver) as monitor:
            assert monitor.metrics is None  # nothing listens unless asked
            answer = await asyncio.to_thread(request, state_root / "control.sock", "status")
    finally:
        await receiver.aclose()
    assert answer["role"] == "receiver" and answer["state_dir"] == str(state_root)
    (job,) = answer["jobs"]
    assert job["job"] == "old" and job["state"] == "idle" and job["source"] == "files"
    assert job["lsn"]["applied"] == 5 and job["generation"] == 3
    assert job["consistency_point"]["consistent"] and job["lag"]["seconds"] >= 0
    assert not (state_root / "control.sock").exists()


async def test_a_control_socket_that_cannot_be_made_is_left_out(tmp_path: Path) -> None:
    (tmp_path / "control.sock").write_text("not a socket")
    async with Monitor(StatusBoard("sender"), tmp_path, owner="a test") as monitor:
        assert monitor.control is None
    assert (tmp_path / "control.sock").read_text() == "not a socket"  # left alone


async def test_a_failover_that_meets_a_full_disk_says_so_with_its_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a running receiver, ENOSPC while promoting came back as "failover failed:
    OSError ... (check the request; `ping` lists the operations it knows)", exit 3, with a
    traceback in the receiver's log; at rest the same failure said "local storage error",
    exit 9. Both say the latter now."""
    state_root = tmp_path / "replicas" / ".replicator"
    state_root.mkdir(parents=True)
    receiver = Receiver(ReceiverConfig(tmp_path / "replicas", state_root))

    async def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Receiver, "failover", full)
    monkeypatch.setattr(Receiver, "demote", full)
    try:
        async with receiver_monitor(receiver):
            sock = state_root / "control.sock"
            promoted = await asyncio.to_thread(request, sock, "failover", job="vm")
            demoted = await asyncio.to_thread(request, sock, "demote", job="vm")
    finally:
        await receiver.aclose()
    for answer in (promoted, demoted):
        assert answer["exit_code"] == ExitCode.STORAGE, answer
        assert answer["error"].startswith("local storage error: [Errno 28]"), answer
