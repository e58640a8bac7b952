from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.crashdisk import CrashDisk, disk_pair
from tests.tools import ReceiverProc, receiver_fixture


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[ReceiverProc]:
    """A real `replicator receive` process on a free loopback port."""
    yield from receiver_fixture(tmp_path)


@pytest.fixture
def crash_disks(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[CrashDisk, CrashDisk]]:
    """Two loop-mounted file systems that can lose power (tests/crashdisk.py):
    parametrize with their kind ("ext4-lazytime", "xfs"), ``indirect=True``."""
    yield from disk_pair(tmp_path, request.param)


# The suite runs in parallel workers (make test): a worker that picks up one of these
# minute-long modules last keeps the others waiting, so they are handed out first.
LONGEST_FIRST = (
    "test_network_faults.py",
    "test_kill_cycles.py",
    "test_failback.py",
    "test_failover.py",
    "test_tls.py",
    "test_bench.py",
    "test_journal_damage.py",
    "test_state_damage.py",
    "test_fault_matrix.py",
    "test_nbd_capture.py",
    "test_status.py",
    "test_flood.py",
    "test_journal_crash.py",
    "test_interruption.py",
    "test_jobfile.py",
    "test_first_run.py",
    "test_target_rpo.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
