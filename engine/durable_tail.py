"""The receiver's memory of durable records it has not applied yet: a bounded tail.

A session hands the applier each batch of records once its receive journal holds them
durably (``JobReplica.note_durable``), so the applier need not read them back from the
journal, decode them and check their checksums again. The journal keeps every durable
record until it is applied; this memory is only a shortcut, and it must never make the
applier skip a record or apply one twice.

What it promises: every durable record *after* ``base`` that was handed over is here, in
LSN order (records at or below ``base`` may be here too, stale; they are passed over).
So when the applier has applied up to an LSN at or above ``base``, the next record here is
the next durable record, and otherwise it reads the journal until it is.

When the applier falls behind, the oldest records are dropped and ``base`` moves past
them: the applier reads those from the journal and comes back to memory for the rest.
(Before, memory was dropped whole and came back only once the applier caught up with
the journal's durable end, which under a steady stream of writes never happened: a
receiver that fell behind once read every record back for the rest of its session.)
When the records here may not be all of them (records a dead session made durable and
never handed over, a failed apply that consumed part of them), ``reset`` empties it and
moves ``base`` to the journal's durable end.

Every job of a receiver keeps its own tail, up to its own cap (a backlog and a window:
194 MiB by default), so a receiver with many jobs behind at once held that much per
job. ``KeptMemory`` bounds them together: a tail that grows past the receiver's limit
drops its own oldest records, as past its own cap (the applier reads them back).
"""

from __future__ import annotations

import collections

from replicator.journal import Record

# What keeping a decoded record costs beyond its encoded bytes: the Record, its ints and
# name, the view of its payload, the deque's slot (measured with tracemalloc: a 4 KiB
# WRITE 464 bytes over, a ZERO of 59 encoded bytes 196 in all). Counted with each record:
# by encoded size alone, a sender of tiny records (millions of 59-byte ZEROs between
# barriers) made the tails hold 3.3 times the limit (a 194 MiB cap: ~650 MiB of memory).
RECORD_OVERHEAD = 464


def kept_size(record: Record) -> int:
    """The bytes a kept ``record`` counts for: its encoded size and RECORD_OVERHEAD."""
    return record.encoded_size + RECORD_OVERHEAD


class KeptMemory:
    """The bytes every ``DurableTail`` of one receiver keeps, together, and their limit."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must not be negative")
        self.limit = limit
        self.bytes = 0


class DurableTail:
    """Durable, unapplied records kept for the applier (see the module docstring)."""

    def __init__(self, base: int, cap: int, shared: KeptMemory | None = None) -> None:
        """``base``: every durable record after it will be handed over (the journal's
        durable end when the tail starts); ``cap``: bytes kept at most (encoded size);
        ``shared``: the receiver-wide limit this tail counts against, if any."""
        self.base = base
        self.cap = cap
        self.bytes = 0
        self._shared = shared
        self._records: collections.deque[Record] = collections.deque()

    def __len__(self) -> int:
        return len(self._records)

    def extend(self, records: list[Record]) -> None:
        """Records just made durable, in LSN order, following the ones handed over before.
        Over the cap (or the receiver's limit), the oldest are dropped and ``base`` moves
        past them."""
        kept = self._records
        size = 0
        for record in records:
            kept.append(record)
            size += kept_size(record)
        self._count(size)
        while kept and self._over():
            dropped = kept.popleft()
            self._count(-kept_size(dropped))
            self.base = max(self.base, dropped.lsn)

    def next_after(self, lsn: int) -> Record | None:
        """The durable record that follows ``lsn`` (applied up to it) if it is here; None
        when the journal must be read for it (or nothing durable follows yet)."""
        if lsn < self.base:
            return None
        kept = self._records
        while kept and kept[0].lsn <= lsn:  # applied from the journal meanwhile
            self._count(-kept_size(kept.popleft()))
        return kept[0] if kept else None

    def pop(self) -> Record:
        """Take the record ``next_after`` returned."""
        record = self._records.popleft()
        self._count(-kept_size(record))
        return record

    def reset(self, base: int) -> None:
        """Forget every record: from now on only those after ``base`` are kept."""
        self._records.clear()
        self._count(-self.bytes)
        self.base = base

    def _count(self, delta: int) -> None:
        self.bytes += delta
        if self._shared is not None:
            self._shared.bytes += delta

    def _over(self) -> bool:
        shared = self._shared
        return self.bytes > self.cap or (shared is not None and shared.bytes > shared.limit)
