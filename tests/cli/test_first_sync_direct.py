"""A first sync bypasses both journals; it is never a consistency point before it is whole.

The bulk of a first sync goes from the source to the wire (``Link.ship_direct``) and from
the wire into the replica (``JobReplica.receive``): each byte is written durably once, on
the receiver. What keeps it safe: the sender journals the EPOCH only after the receiver holds
every record before it, so a link lost half way leaves a replica that is not consistent
(never promoted), and the next run compares with the replica and sends only what it lacks.
Later syncs journal on both sides, as before.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from replicator.engine import replica_state
from replicator.engine.errors import ExitCode
from tests.cli.test_network_faults import ProxyThread
from tests.tools import ReceiverProc, b3, distinct_random_disk, replicator, send_once

MiB = 1024 * 1024
SIZE = 64 * MiB


def _journal_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.seg"))


def test_a_first_sync_is_journaled_nowhere_and_later_syncs_are(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk = tmp_path / "disk.img"
    distinct_random_disk(disk, SIZE)
    state = tmp_path / "state"
    summary = send_once(receiver, "bulk", state, disk)
    assert summary["payload_bytes"] >= SIZE
    replica = receiver.dir / "bulk" / "disk.img"
    assert b3(replica) == b3(disk)
    sender_journal = state / "journal"
    receiver_journal = receiver.dir / ".replicator" / "bulk" / "journal"
    assert _journal_bytes(sender_journal) < 64 * 1024  # the EPOCH record, no data
    assert _journal_bytes(receiver_journal) < 64 * 1024
    with disk.open("r+b") as f:
        f.seek(7 * MiB)
        f.write(os.urandom(2 * MiB))
    before = _journal_bytes(receiver_journal)
    summary = send_once(receiver, "bulk", state, disk)
    assert b3(replica) == b3(disk)
    assert _journal_bytes(receiver_journal) > before + 2 * MiB  # a later sync is journaled
    # on the sender too, and retired once the receiver applied it (nothing left to ship)
    assert summary["records"] > 2 and _journal_bytes(sender_journal) < 64 * 1024
    saved = replica_state.load(receiver.dir / ".replicator" / "bulk", "bulk")
    assert saved is not None and saved.consistent


def test_a_first_sync_cut_half_way_is_no_consistency_point_and_resumes(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk = tmp_path / "disk.img"
    distinct_random_disk(disk, SIZE)
    state = tmp_path / "state"
    host, port = receiver.address.rsplit(":", 1)
    proxy = ProxyThread((host, int(port)))
    via = "{}:{}".format(*proxy.address)
    try:
        proxy.call(lambda: proxy.wan.cut(after=SIZE * 3 // 4, current=False, upcoming=1))
        out = replicator(
            "send", "--to", via, "--job", "cut", "--state-dir", str(state),
            "--once", "--json", "--insecure", str(disk),
        )  # fmt: skip
    finally:
        proxy.close()
    assert out.returncode == ExitCode.CONNECT, out.stderr[-2000:]
    assert out.stdout == ""  # no summary: nothing was reported durable
    saved = replica_state.load(receiver.dir / ".replicator" / "cut", "cut")
    assert saved is not None
    # part of it landed (written, not necessarily committed: the receiver commits every
    # 32 MiB, and what a reset drops from its socket buffers decides whether it got there)
    with disk.open("rb") as source, (receiver.dir / "cut" / "disk.img").open("rb") as replica:
        assert replica.read(MiB) == source.read(MiB)
    assert saved.point_lsn == 0 and not saved.consistent  # ... and is no consistency point
    failover = replicator("failover", "--dir", str(receiver.dir), "--job", "cut", "--force")
    assert failover.returncode != 0  # never promoted half a disk
    summary = send_once(receiver, "cut", state, disk)
    assert b3(receiver.dir / "cut" / "disk.img") == b3(disk)
    assert summary["payload_bytes"] < SIZE * 0.75, summary  # only what it lacked
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(disk),
         str(receiver.dir / "cut" / "disk.img")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert compare.returncode == 0, compare.stdout + compare.stderr
