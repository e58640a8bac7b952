"""``runs_kept`` (status at rest, read-only) says what a receiver's open would find.

A receiver opens its journal with ``discard_below`` (its applied LSN + 1) and
``on_damage="cut"``, then asks ``runs_after`` and ``first_lsn`` whether its
``applied.state`` is older than the journal (``replica_state.against_journal``). Status at
rest must answer the same from the files alone, or it would call consistent a replica the
receiver takes as unknown (or the other way round).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.journal import Journal, Record
from replicator.journal.inspect import runs_kept, scan_journal
from tests.journal.helpers import segment_files

SEGMENT = 600  # a few records per segment: segments that skip LSNs, and ones that do not

steps = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 5)),
        st.tuples(st.just("skip"), st.integers(1, 6)),
        st.tuples(st.just("trim"), st.integers(0, 40)),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    max_size=25,
)


async def _build(path: Path, script: list[tuple[str, int]]) -> int:
    """The journal ``script`` makes at ``path``, closed; its last LSN."""
    journal = await Journal.open(path, segment_bytes=SEGMENT)
    try:
        for op, n in script:
            if op == "append":
                for _ in range(n):
                    await journal.append(Record.write("v", 0, b"x" * 100))
            elif op == "skip":
                journal.skip_to(journal.next_lsn + n)
            elif op == "trim":
                await journal.trim(min(n, journal.last_record_lsn + 1))
            else:
                await journal.aclose()
                journal = await Journal.open(path, segment_bytes=SEGMENT)
        return journal.last_lsn
    finally:
        await journal.aclose()


async def _opened(path: Path, after: int) -> tuple[int | None, list[tuple[int, int]]]:
    """What the receiver's open finds: its first stored LSN (None: it holds no record)
    and the runs above ``after``."""
    journal = await Journal.open(
        path, segment_bytes=SEGMENT, on_damage="cut", discard_below=after + 1
    )
    try:
        held = journal.first_lsn < journal.next_lsn and journal.last_record_lsn > 0
        return (journal.first_lsn if held else None), await journal.runs_after(after)
    finally:
        await journal.aclose()


def _damage(path: Path, which: int, where: int) -> None:
    files = segment_files(path)
    if not files:
        return
    victim = files[which % len(files)]
    data = bytearray(victim.read_bytes())
    if data:
        data[where % len(data)] ^= 0x10
        victim.write_bytes(bytes(data))


async def _check(tmp: Path, script: list[tuple[str, int]], damage: tuple[int, int] | None,
                 afters: list[int]) -> None:  # fmt: skip
    built = tmp / "built"
    top = await _build(built, script)
    if damage is not None:
        _damage(built, *damage)
    for after in [*afters, 0, top, max(0, top - 3)]:
        after = min(after, top + 1)
        report = scan_journal(built, verify_sealed=False, verify_after=after)
        first, runs = runs_kept(report, after)
        copy = tmp / f"opened-{after}"
        shutil.copytree(built, copy)
        opened_first, opened_runs = await _opened(copy, after)
        assert runs == opened_runs, (after, script, damage)
        if opened_first is not None:
            assert first == opened_first, (after, script, damage)
        shutil.rmtree(copy)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    script=steps,
    damage=st.none() | st.tuples(st.integers(0, 20), st.integers(0, 4000)),
    afters=st.lists(st.integers(0, 80), max_size=4),
)
def test_status_at_rest_sees_the_runs_the_receivers_open_sees(
    script: list[tuple[str, int]], damage: tuple[int, int] | None, afters: list[int]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_check(Path(tmp), script, damage, afters))
