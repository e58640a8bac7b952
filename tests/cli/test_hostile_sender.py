"""A sender that completes a real handshake and then means harm (tests/hostile_sender.py):
whatever it sends, the receiver keeps its other jobs, its own state and itself intact."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from replicator.engine.descriptors import jobs_within
from replicator.journal import Record
from tests import hostile_sender
from tests.tools import distinct_random_disk, qemu_compare, send_once, start_receiver


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_new_job_per_connection_cannot_run_the_receiver_out_of_files(tmp_path: Path) -> None:
    """A sender naming a new job per connection, each with a few dozen volumes, made the
    receiver keep every job open with its descriptors until it stopped: past its open-file
    limit it could accept no connection, and an honest job's next send failed. Now the
    receiver keeps as many jobs open as its limit covers and refuses more ("busy", saying
    why and what to do) while none is idle, and the honest job goes on."""
    nofile = 4096
    most = jobs_within(nofile)
    disk = tmp_path / "honest.img"
    distinct_random_disk(disk, 4 << 20)
    rcv = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log", nofile=nofile)
    try:
        send_once(rcv, "honest", tmp_path / "honest-state", disk)

        async def flood() -> list[hostile_sender.Outcome]:
            outcomes = []
            for i in range(80):
                records = [Record.write(f"v{n}.img", 0, b"\x07" * 512) for n in range(30)]
                outcome = await hostile_sender.send_records(
                    rcv.port, f"hostile{i}", [[*records, Record.flush()]], timeout=0.3
                )
                outcomes.append(outcome)
            return outcomes

        outcomes = asyncio.run(flood())
        served = [o for o in outcomes if o.welcome is not None]
        refused = [o for o in outcomes if o.welcome is None]
        assert len(served) == most - 1, [(o.code, o.message) for o in outcomes]  # honest: 1
        assert {o.code for o in refused} == {"busy"}, refused[0]
        assert f"{most} jobs are open, the most this receiver keeps open at once" in (
            refused[0].message
        ), refused[0].message
        assert "LimitNOFILE=" in refused[0].message and "--allow" in refused[0].message
        assert _open_files(rcv.proc.pid) < nofile // 2

        with disk.open("r+b") as f:  # the honest job changes and replicates on
            f.seek(1 << 20)
            f.write(os.urandom(65536))
        send_once(rcv, "honest", tmp_path / "honest-state", disk)
        assert qemu_compare("raw", disk, rcv.dir / "honest" / disk.name).returncode == 0
        assert rcv.proc.poll() is None
    finally:
        assert rcv.stop() == 0
