"""SIGKILL a writer at random moments; every record it was told is synced must survive.

The child (``crash_child.py``) appends and syncs in a loop on one journal directory and
prints each synced LSN. After each kill the parent opens the journal (recovery), checks
every record from the trim point to the end, closes it and starts the next child on the
same directory, so recoveries pile up on each other's results.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
from pathlib import Path

import pytest

from replicator.journal import Journal
from replicator.journal.inspect import scan_journal
from tests.journal.crash_child import KEEP, SEGMENT_BYTES
from tests.journal.helpers import check_record

ROOT = Path(__file__).resolve().parents[2]


async def _run_child(path: Path, seed: int, rng: random.Random) -> tuple[int, int]:
    """Start a child, kill it at a random moment; returns the highest LSN it reported
    synced, and the highest below which it said it would retire every record (0: none)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.journal.crash_child",
        str(path),
        str(seed),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        # let it sync a few times (a while alone let 20 children on a loaded CI reach no
        # segment reuse: each sync writes about a segment, a trim comes every ~20), then
        # run for a random while
        for _ in range(rng.randint(1, 40)):
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line or lines, "crash child exited before syncing anything"
            if not line:
                break
            lines.append(line.decode())
        await asyncio.sleep(rng.uniform(0.0, 0.25))
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        rest = await proc.stdout.read()
        await proc.wait()
    lines += rest.decode().splitlines()
    assert proc.returncode == -signal.SIGKILL
    reported = max(int(line) for line in lines if not line.startswith("R"))
    retired = max((int(line.split()[1]) for line in lines if line.startswith("R")), default=0)
    return reported, retired


async def _check(path: Path, reported: int, retired: int) -> int:
    async with await Journal.open(path, segment_bytes=SEGMENT_BYTES) as journal:
        assert journal.last_lsn >= reported
        assert journal.durable_lsn == journal.last_lsn
        # everything above the child's last possible trim point must still be there
        assert journal.first_lsn <= max(1, reported - KEEP, retired)
        expected = journal.first_lsn
        async for record in journal.read_from(journal.first_lsn):
            assert record.lsn == expected  # contiguous: nothing lost, nothing skipped
            check_record(record)
            expected += 1
        assert expected == journal.last_lsn + 1
        last = journal.last_lsn
    report = scan_journal(path)
    assert report.problem is None, report.problem
    return last


async def _crash_loop(path: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    last = 0
    killed_in_reused = retires = retired_below = 0
    for _ in range(kills):
        reported, retired = await _run_child(path, rng.randrange(2**32), rng)
        assert reported >= last  # a new child never reports less than what survived
        killed_in_reused += any(s.reused for s in scan_journal(path).segments)
        retires += retired > 0
        retired_below = max(retired_below, retired)  # an earlier child's retire holds
        last = await _check(path, reported, retired_below)
    assert last > kills  # the children made progress
    assert killed_in_reused  # trimmed files were written over before some of the kills
    assert retires  # some children retired their whole journal before they were killed


async def test_sigkill_never_loses_a_synced_record(tmp_path: Path) -> None:
    await _crash_loop(tmp_path / "journal", kills=20, seed=20240601)


@pytest.mark.long
async def test_sigkill_soak(tmp_path: Path) -> None:
    await _crash_loop(tmp_path / "journal", kills=400, seed=random.randrange(2**32))
