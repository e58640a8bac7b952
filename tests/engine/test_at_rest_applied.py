"""``status`` at rest counts only what the receiver had not applied when the sender last
heard from it (``peer_applied.state``), and falls back to every journaled record."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
import structlog

from replicator.engine import peer_applied
from replicator.engine.at_rest import sender_at_rest
from replicator.engine.link import Link
from replicator.engine.manifest import ManifestSet
from replicator.engine.peer_applied import (
    APPLIED_FILE,
    PeerApplied,
    load_peer_applied,
    save_peer_applied,
)
from replicator.engine.sender import Sender, SenderConfig
from replicator.journal import Journal, durable
from replicator.journal.records import EncodedRecord
from tests.journal.helpers import FirstWriteHeld, filled


async def _state(tmp_path: Path, count: int = 10) -> tuple[Path, list[tuple[int, int, int]]]:
    """A sender state folder whose journal holds ``count`` records over several segments;
    each record's (lsn, ts_ns, stored bytes)."""
    state = tmp_path / "state"
    journal = await filled(state / "journal", count, segment_bytes=600)
    seen = [(r.lsn, r.ts_ns, len(r.raw)) async for batch in _batches(journal) for r in batch]
    await journal.aclose()
    ManifestSet(0, 65536).save(state / "manifests.state")  # a sync had completed
    return state, seen


async def _batches(journal: Journal) -> AsyncIterator[list[EncodedRecord]]:
    async for batch in journal.follow_encoded(1):
        yield batch
        if batch[-1].lsn >= journal.last_lsn:
            return


def _at_most(state: Path) -> dict[str, float]:
    job = sender_at_rest(state)["jobs"][0]
    return dict(job["lag"]["at_most"])


async def test_only_records_past_the_applied_lsn_count(tmp_path: Path) -> None:
    state, seen = await _state(tmp_path)
    await save_peer_applied(state, PeerApplied(6, time.time_ns()))
    at_most = _at_most(state)
    rest = [r for r in seen if r[0] > 6]
    assert at_most["records"] == 4
    assert at_most["bytes"] == sum(size for _, _, size in rest)
    assert at_most["seconds"] >= 0
    job = sender_at_rest(state)["jobs"][0]
    assert job["applied_heard"]["lsn"] == 6 and job["applied_heard"]["at"]


async def test_everything_applied_is_no_lag(tmp_path: Path) -> None:
    state, _ = await _state(tmp_path)
    await save_peer_applied(state, PeerApplied(10, time.time_ns()))
    assert _at_most(state) == {"records": 0, "bytes": 0, "seconds": 0.0}


async def test_records_journaled_after_it_was_heard_count_whatever_their_lsn(
    tmp_path: Path,
) -> None:
    """A journal begun again under the same folder reuses low LSNs: a record newer than
    what was heard cannot have been covered by it."""
    heard_before = time.time_ns()
    await asyncio.sleep(0.01)
    state, seen = await _state(tmp_path)
    await save_peer_applied(state, PeerApplied(8, heard_before))
    at_most = _at_most(state)
    assert at_most["records"] == 10
    assert at_most["bytes"] == sum(size for _, _, size in seen)


async def test_without_the_file_or_with_a_damaged_one_every_record_counts(
    tmp_path: Path,
) -> None:
    state, seen = await _state(tmp_path)
    everything = {"records": 10, "bytes": sum(size for _, _, size in seen)}
    assert {k: _at_most(state)[k] for k in everything} == everything
    (state / APPLIED_FILE).write_bytes(b"\x00garbage")
    assert load_peer_applied(state) is None
    assert {k: _at_most(state)[k] for k in everything} == everything
    assert sender_at_rest(state)["jobs"][0]["applied_heard"] is None


async def test_a_failed_write_is_a_warning_and_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the at-rest view depends on the file: a full disk must not stop replication."""
    await save_peer_applied(tmp_path, PeerApplied(3, 111))

    async def full(path: object, state: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peer_applied, "write_state_async", full)
    with structlog.testing.capture_logs() as logs:
        assert await save_peer_applied(tmp_path, PeerApplied(9, 222)) is False
    assert [e["event"] for e in logs] == ["sender.applied_state_unwritten"]
    assert load_peer_applied(tmp_path) == PeerApplied(3, 111)


async def test_a_damaged_segment_holding_the_applied_lsn_counts_whole(tmp_path: Path) -> None:
    """Records that cannot be read are never taken for applied ones."""
    state, seen = await _state(tmp_path)
    segments = sorted((state / "journal").glob("*.seg"))
    holding = next(p for p in segments if int(p.name.split(".")[0]) <= 5 < _next_base(p, segments))
    data = bytearray(holding.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the records, past the first
    holding.write_bytes(bytes(data))
    await save_peer_applied(state, PeerApplied(5, time.time_ns()))
    base = int(holding.name.split(".")[0])
    in_or_after = [r for r in seen if r[0] >= base]
    assert _at_most(state)["records"] >= len(in_or_after)


def _next_base(path: Path, segments: list[Path]) -> int:
    later = [int(p.name.split(".")[0]) for p in segments if p.name > path.name]
    return min(later) if later else 1 << 62


async def test_before_any_sync_completed_no_bound_is_given(tmp_path: Path) -> None:
    """Killed in its first sync: what the replica lacks is not known, not "at most 0"."""
    state, _ = await _state(tmp_path)
    (state / "manifests.state").unlink()
    assert await save_peer_applied(state, PeerApplied(10, time.time_ns()))
    assert sender_at_rest(state)["jobs"][0]["lag"]["at_most"] is None


async def test_records_received_but_unapplied_and_trimmed_here_make_no_bound(
    tmp_path: Path,
) -> None:
    """The journal drops what the receiver has received; what it had not applied when last
    heard is then in neither count: "at most 6 records, 3.3 s" was said with 54 such
    records and a point 20 s old on the receiver. No bound is claimed then."""
    state, _ = await _state(tmp_path)
    journal = await Journal.open(state / "journal", segment_bytes=600)
    await journal.trim(9)  # received up to 8: the segments below it go
    first = journal.first_lsn
    await journal.aclose()
    assert first > 4
    await save_peer_applied(state, PeerApplied(3, time.time_ns()))
    job = sender_at_rest(state)["jobs"][0]
    assert job["lag"]["at_most"] is None
    assert f"LSN 4 to {first - 1} unapplied" in job["lag"]["not_known"]
    await save_peer_applied(state, PeerApplied(first - 1, time.time_ns()))
    job = sender_at_rest(state)["jobs"][0]
    assert job["lag"]["not_known"] is None and job["lag"]["at_most"] is not None


class _ClosedLink:
    """What ``Sender.close_link`` uses of a link: a close, and what it heard applied."""

    def __init__(self, applied_lsn: int) -> None:
        self.applied_lsn = applied_lsn

    async def aclose(self) -> None:
        return None


async def test_a_close_cancelled_in_its_write_is_not_undone_by_the_close_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_forever`` closes a failed session's link (``session_failed``) and closes it
    again in a ``finally``: cancelled (a second SIGTERM) during the first close's write of
    peer_applied.state, the second close writes it again. The first write must have ended
    by then, or it lands last, its older time with it."""
    sender = Sender(SenderConfig("127.0.0.1", 1, "job", [], tmp_path))
    link = cast(Link, _ClosedLink(7))
    held = FirstWriteHeld(durable.write_state)
    monkeypatch.setattr(durable, "write_state", held)
    first = asyncio.create_task(sender.close_link(link))
    await held.wait_started()
    older = load_peer_applied(tmp_path)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await sender.close_link(link)  # the finally's close: not noted yet, so written again
    newer = load_peer_applied(tmp_path)
    await asyncio.get_running_loop().shutdown_default_executor()
    assert older is None and newer is not None and newer.lsn == 7
    assert load_peer_applied(tmp_path) == newer
