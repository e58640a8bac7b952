"""A replica holds the blocks its source holds: thick stays thick, sparse stays sparse.

Bytes alone are not the whole disk: a thick-provisioned (preallocated) disk promises its
guest that a write never meets a full file system, and a replica that is sparse where the
source is allocated breaks that promise after a failover. So zeros the source keeps
allocated travel as ZERO (zeroed in place on the replica) and holes as TRIM (punched):
journal/records.py. Allocation is compared with ``filefrag`` (FIEMAP): SEEK_DATA and
``qemu-img map`` call fallocated (unwritten) ranges holes on ext4.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.tools import (
    allocated,
    forced_failover,
    qemu_compare,
    qemu_io,
    replicator,
    start_receiver,
)

MiB = 1 << 20


def test_failback_zeroes_in_place_keeping_the_old_sources_blocks(tmp_path: Path) -> None:
    """Extents the promoted VM zeroed (written zeros, a discard) are zeroed on the old
    source without being carried, and keep the blocks they had there: the target's
    manifest does not say what it holds allocated, and a hole punched here would make
    the old source thinner than it was (engine/failback.py)."""
    disk, state, target, replica = forced_failover(tmp_path)  # 8 MiB of data, then holes
    assert allocated(disk) == [(0, 8 * MiB)]
    qemu_io("raw", replica, "write -P 0 1M 1M", "discard 3M 1M")
    rcv = start_receiver(target)
    try:
        out = replicator(
            "failback", "--from", rcv.address, "--job", "vm", "--state-dir", str(state),
            "--json", "--insecure", str(disk),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["bytes_zeroed"] == 2 * MiB
    finally:
        assert rcv.stop() == 0
    assert qemu_compare("raw", disk, replica).returncode == 0
    assert allocated(disk) == [(0, 8 * MiB)]
