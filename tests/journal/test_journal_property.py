"""Random append / sync / trim / reopen / crash sequences against a model of synced records.

The model is the list of records the journal must return. A plain reopen (aclose + open)
keeps everything; a crash keeps every synced record and, of the rest, whatever prefix made
it to the file: the test copies the directory as a power cut could leave it (staged bytes
lost, the unsynced part of the active segment cut at a random point and maybe garbled)
and opens the copy.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.journal import Journal, JournalFull, Record
from tests.journal.helpers import dir_bytes, read_all, segment_files

SEGMENT = 600
CAP = 4 * SEGMENT

ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 4), st.integers(0, 250)),
        st.tuples(st.just("explicit"), st.integers(1, 3), st.integers(0, 250)),
        st.tuples(st.just("sync"), st.just(0), st.just(0)),
        st.tuples(st.just("trim"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0)),
        st.tuples(st.just("crash"), st.integers(0, 2**16), st.booleans().map(int)),
    ),
    max_size=40,
)


@dataclass
class Model:
    records: list[Record] = field(default_factory=list)  # appended, in LSN order
    trimmed_upto: int = 0

    def durable(self, durable_lsn: int) -> list[Record]:
        return [r for r in self.records if r.lsn <= durable_lsn]


def _record(lsn: int, size: int) -> Record:
    """A record whose stored form is fully known (the timestamp is given, not assigned)."""
    return Record.write("v", lsn * 4096, bytes([lsn % 251]) * size).with_lsn(0, lsn * 1000)


def _copy_as_after_power_cut(
    src: Path, dst: Path, durable_end: int, seed: int, garble: bool
) -> None:
    """Copy the segments; the last keeps its synced part plus a random, maybe garbled, bit."""
    rng = random.Random(seed)
    dst.mkdir()
    files = segment_files(src)
    for path in files:
        data = bytearray(path.read_bytes())
        if path == files[-1]:
            keep = rng.randint(durable_end, len(data))
            del data[keep:]
            if garble and keep > durable_end:
                data[rng.randrange(durable_end, keep)] ^= 0xFF
        (dst / path.name).write_bytes(bytes(data))


async def _crash_copy(journal: Journal, src: Path, dst: Path, seed: int, garble: bool) -> None:
    """The directory as a power cut could leave it (staged bytes lost); closes the original."""
    durable_end = journal._segments[-1].durable_end  # test-only peek at the synced size
    _copy_as_after_power_cut(src, dst, durable_end, seed, garble)
    await journal.aclose()


async def _scenario(root: Path, steps: list[tuple[str, int, int]]) -> None:
    path = root / "j0"
    model = Model()
    journal = await Journal.open(path, segment_bytes=SEGMENT, max_bytes=CAP)
    generation = 0
    try:
        for op, a, b in steps:
            if op in ("append", "explicit"):
                nxt = journal.next_lsn
                if op == "append":
                    lsns = [nxt + i for i in range(a)]
                    batch = [_record(lsn, b) for lsn in lsns]
                else:  # explicit LSNs with gaps, as a receive journal gets them
                    lsns = [nxt + 2 + 3 * i for i in range(a)]
                    batch = [_record(lsn, b).with_lsn(lsn) for lsn in lsns]
                try:
                    last = await journal.append_many(batch)
                except JournalFull:
                    continue
                assert last == lsns[-1]
                model.records.extend(r.with_lsn(lsn) for r, lsn in zip(batch, lsns, strict=True))
            elif op == "sync":
                assert await journal.sync() == journal.last_lsn
                assert journal.disk_bytes == dir_bytes(path)
                assert journal.bytes_used <= journal.disk_bytes
            elif op == "trim":
                upto = min(journal.first_lsn + a, journal.durable_lsn + 1)
                await journal.trim(upto)
                model.trimmed_upto = max(model.trimmed_upto, upto)
            elif op == "reopen":
                await journal.aclose()
                journal = await Journal.open(path, segment_bytes=SEGMENT, max_bytes=CAP)
            else:  # crash
                generation += 1
                new = root / f"j{generation}"
                durable_before = model.durable(journal.durable_lsn)
                await _crash_copy(journal, path, new, a, bool(b))
                path = new
                journal = await Journal.open(path, segment_bytes=SEGMENT, max_bytes=CAP)
                recovered = await read_all(journal, journal.first_lsn)
                kept = [r for r in durable_before if r.lsn >= journal.first_lsn]
                assert recovered[: len(kept)] == kept  # every synced record survived
                extra = recovered[len(kept) :]
                unsynced = model.records[len(durable_before) :]
                assert extra == unsynced[: len(extra)]  # plus a prefix of the rest
                model.records = durable_before + extra
            await _check(journal, model)
    finally:
        await journal.aclose()


async def _check(journal: Journal, model: Model) -> None:
    expected_last = model.records[-1].lsn if model.records else 0
    assert journal.last_lsn >= expected_last
    if model.records:
        assert journal.last_lsn == expected_last
    stored = await read_all(journal, journal.first_lsn)
    durable = model.durable(journal.durable_lsn)
    # every durable record at or above the trim point is still there, in order, intact
    assert stored == [r for r in durable if r.lsn >= journal.first_lsn]
    needed = [r.lsn for r in durable if r.lsn >= model.trimmed_upto]
    if needed:
        assert journal.first_lsn <= needed[0]
    assert journal.bytes_used <= journal.disk_bytes <= CAP


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(steps=ops)
def test_random_operations_match_the_model(steps: list[tuple[str, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_scenario(Path(tmp), steps))


def test_crash_copy_keeps_synced_records() -> None:
    """One fixed sequence through the crash path, so a failure there is easy to read."""
    steps = [("append", 3, 100), ("sync", 0, 0), ("append", 2, 50), ("crash", 7, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_scenario(Path(tmp), steps))
