"""``receiver_gap`` (and ``Journal.runs_after`` under it) against a model of the LSNs a
journal holds, and ``compare.state``: kept, damaged, cleared."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.engine import lost_records
from replicator.journal import Journal, Record

SEGMENT = 600  # a few records per segment: segments that skip LSNs, and ones that do not

steps = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 5)),
        st.tuples(st.just("skip"), st.integers(1, 6)),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    max_size=25,
)


def _gap_model(held: list[int], received: int) -> tuple[int, int] | None:
    above = [lsn for lsn in held if lsn > received]
    expected = received + 1
    for lsn in above:
        if lsn > expected:
            return expected, lsn - 1
        expected = lsn + 1
    return None


async def _run(tmp: Path, script: list[tuple[str, int]], receiveds: list[int]) -> None:
    journal = await Journal.open(tmp, segment_bytes=SEGMENT)
    held: list[int] = []
    try:
        for op, n in script:
            if op == "append":
                for _ in range(n):
                    held.append(await journal.append(Record.write("v", 0, b"x" * 100)))
            elif op == "skip":
                journal.skip_to(journal.next_lsn + n)
            else:
                await journal.aclose()
                journal = await Journal.open(tmp, segment_bytes=SEGMENT)
        top = held[-1] if held else 0
        for received in [*receiveds, 0, top, top + 1]:
            received = min(received, top + 1)
            assert await lost_records.receiver_gap(journal, received) == _gap_model(
                held, received
            ), (received, held)
    finally:
        await journal.aclose()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(script=steps, receiveds=st.lists(st.integers(0, 80), max_size=6))
def test_the_gap_is_the_first_lsns_missing_below_a_held_record(
    script: list[tuple[str, int]], receiveds: list[int]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_run(Path(tmp), script, receiveds))


def test_the_note_is_kept_until_cleared_and_damage_keeps_it(tmp_path: Path) -> None:
    assert lost_records.load(tmp_path) is None
    lost_records.save(tmp_path, lost_records.why((5, 9)))
    assert (
        lost_records.load(tmp_path) == "the receiver lacks lsn 5 to 9, which no journal here holds"
    )
    path = tmp_path / lost_records.FILE_NAME
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 1
    path.write_bytes(bytes(damaged))
    reason = lost_records.load(tmp_path)
    assert reason is not None and "damaged" in reason  # still compares
    lost_records.clear(tmp_path)
    assert lost_records.load(tmp_path) is None
    lost_records.clear(tmp_path)  # twice is fine
