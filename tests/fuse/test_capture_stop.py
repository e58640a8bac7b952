"""A capture stopped while writers keep pyfuse3's workers busy ends every worker before
``pyfuse3.close()``: a worker resumed after it calls libfuse with a NULL session, which
killed a FUSE-capturing sender with SIGSEGV at a planned failover under load. However it
stops, a request cut short (its worker cancelled) leaves no record whose change the source
did not get, nor a change without its record: the journal replays to the source."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from replicator.journal import RecordType
from tests.fuse.helpers import (
    assert_same_tree,
    make_dirs,
    read_journal,
    replay,
    unmount_if_mounted,
)
from tests.fuse.stop_probe import SPAN

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("how", "ended"),
    [("stop", "returned"), ("cancel", "cancelled"), ("terminate-fails", "returned")],
)
def test_a_busy_capture_ends_its_workers_before_closing_the_session(
    tmp_path: Path, how: str, ended: str
) -> None:
    src, mnt, jr = make_dirs(tmp_path)
    (src / "disk.img").write_bytes(bytes(SPAN))
    initial = tmp_path / "initial"
    shutil.copytree(src, initial)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tests.fuse.stop_probe", how, str(src), str(mnt), str(jr)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    finally:
        unmount_if_mounted(mnt)
    assert out.returncode == 0, f"probe exited {out.returncode}:\n{out.stderr[-4000:]}"
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["alive_at_close"] == [], (seen, out.stderr[-4000:])
    assert seen["ended"] == ended, seen
    assert seen["writers_stuck"] == 0, seen
    assert seen["mounted"] is False, seen
    records = read_journal(jr)
    assert any(r.type is RecordType.WRITE for r in records), "nothing was written meanwhile"
    assert_same_tree(replay(initial, records, tmp_path / "replayed"), src)
    if how == "terminate-fails":
        assert "fuse.terminate_failed" in out.stdout  # structlog's default: stdout
