"""The applier's memory of durable records (engine/durable_tail.py): whatever the tails
drop, an applier that reads the journal where memory has nothing sees every record once,
in order; and the tails of one receiver stay within its limit together."""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.engine.durable_tail import DurableTail, KeptMemory, kept_size
from replicator.journal import Record, RecordType, decode_records, encode_record


@dataclass
class Job:
    """One job: its journal (every durable record), its tail, what its applier applied."""

    tail: DurableTail
    journal: list[Record] = field(default_factory=list)
    applied: list[int] = field(default_factory=list)

    @property
    def last(self) -> int:
        return self.applied[-1] if self.applied else 0

    def durable(self, count: int, size: int) -> None:
        first = len(self.journal) + 1
        records = [Record.write("d", 0, bytes(size)).with_lsn(first + i, 1) for i in range(count)]
        self.journal += records
        self.tail.extend(records)

    def apply(self, upto: int) -> None:
        """As ``JobReplica._records_upto``: memory first, the journal where it has nothing."""
        target = min(upto, len(self.journal))
        while self.last < target:
            record = self.tail.next_after(self.last)
            if record is not None:
                assert record.lsn == self.last + 1, "memory skipped or repeated a record"
                self.applied.append(self.tail.pop().lsn)
            else:
                self.applied.append(self.journal[self.last].lsn)

    def apply_from_journal(self, upto: int) -> None:
        """Records applied without asking memory (a redo, the direct path): memory may
        still hold them, stale."""
        target = min(upto, len(self.journal))
        self.applied += [r.lsn for r in self.journal[self.last : target]]


steps = st.lists(
    st.tuples(
        st.integers(0, 2),  # which job
        st.sampled_from(["durable", "apply", "journal", "reset"]),
        st.integers(1, 6),  # records, or how far to apply
        st.sampled_from([100, 1000, 5000]),  # record size
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps, cap=st.integers(0, 20_000), limit=st.integers(0, 30_000))
def test_every_record_is_applied_once_in_order_and_the_limit_holds(
    steps: list[tuple[int, str, int, int]], cap: int, limit: int
) -> None:
    shared = KeptMemory(limit)
    jobs = [Job(DurableTail(0, cap, shared)) for _ in range(3)]
    for which, action, n, size in steps:
        job = jobs[which]
        if action == "durable":
            job.durable(n, size)
            assert shared.bytes <= limit and job.tail.bytes <= cap
        elif action == "apply":
            job.apply(job.last + n)
        elif action == "journal":
            job.apply_from_journal(job.last + n)
        else:  # what a new session does when a dead one left records unhanded
            job.tail.reset(len(job.journal))
        assert shared.bytes == sum(j.tail.bytes for j in jobs)
    for job in jobs:
        job.apply(len(job.journal))
        assert job.applied == [r.lsn for r in job.journal]
        job.tail.reset(len(job.journal))
    assert shared.bytes == 0


def test_a_tail_keeps_what_fits_beside_the_others() -> None:
    record_size = kept_size(Record.write("d", 0, bytes(1000)))
    shared = KeptMemory(5 * record_size)
    first, second = Job(DurableTail(0, 10**9, shared)), Job(DurableTail(0, 10**9, shared))
    first.durable(4, 1000)
    assert len(first.tail) == 4
    second.durable(3, 1000)  # one fits beside the first job's four
    assert len(second.tail) == 1 and second.tail.base == 2
    first.apply(4)  # applied: its memory goes back to the receiver
    second.durable(3, 1000)
    assert len(second.tail) == 4 and shared.bytes == 4 * record_size
    second.apply(6)
    assert second.applied == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "record",
    [Record.zero("v", 0, 512), Record.write("vm.img", 0, bytes(4096))],
    ids=["tiny-zero", "4k-write"],
)
def test_what_a_tail_keeps_costs_no_more_memory_than_its_cap(record: Record) -> None:
    """Counted by encoded size alone, a sender of tiny records (59 bytes each, millions
    between barriers) made a tail of a 194 MiB cap hold ~650 MiB: each decoded record
    costs ~200-460 bytes beyond its encoding. Here records decoded as a receiver does (off
    one frame) go into a tail of 2 MiB; what it holds is measured. There are more records
    than the cap holds even counted by encoded size alone (35,544 ZEROs), so a tail that
    undercounts them reaches its cap too, and is caught by what it holds."""
    n = 40_000 if record.type is RecordType.ZERO else 4_000
    frame = b"".join(
        encode_record(record.with_lsn(10**12 + i, 1_700_000_000_000_000_000)) for i in range(n)
    )
    cap = 2 << 20
    tracemalloc.start()
    try:
        tail = DurableTail(0, cap)
        before = tracemalloc.get_traced_memory()[0]
        records = decode_records(frame)
        tail.extend(records)
        del records  # the frame's list: only the tail holds them now
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(tail) < n  # the cap was reached
    in_frame = len(tail) * record.encoded_size  # their bytes, in ``frame`` (made before)
    assert held + in_frame <= cap * 1.1, (held, len(tail))
