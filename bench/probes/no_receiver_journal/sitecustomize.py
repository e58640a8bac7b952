"""A probe, never a way to run: a `replicator receive` that journals nothing.

The speed issue names skipping the receiver's journal (for records that are applied and
fsynced before the acknowledgement anyway) as a direction for the replicating write path.
Before building that design, this measures the most it could gain: with this folder on
``PYTHONPATH``, every `replicator receive` started from that environment stages no record
bytes in its journal (LSNs, syncs and trims go on as usual, on an empty file) and keeps
every durable record in memory for its applier, so nothing is read back. Durability after a
crash is gone: a probe for benchmarks only, e.g.

    PYTHONPATH=bench/probes/no_receiver_journal .venv/bin/python bench/bench_fuse.py \\
        --job '1M seqwrite' --column replicating --column 'bindfs -M bw' --repeat 1

Other commands (the sender, fio, bindfs) are not touched.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

if "receive" in sys.argv:
    import replicator.engine.job_replica as job_replica
    import replicator.journal.journal as journal_module
    from replicator.journal import Record

    journal_module.FLUSH_BYTES = 1 << 40  # staged bytes are never written on the way
    job_replica.MEM_APPLY_BYTES = 8 << 30  # the applier never reads the (empty) journal
    _append_many = journal_module.Journal.append_many

    async def _append_without_bytes(
        self: journal_module.Journal,
        records: Sequence[Record],
        *,
        encoded: bytes | memoryview | None = None,
    ) -> int:
        lsn = await _append_many(self, records, encoded=encoded)
        dropped = sum(len(part) for part in self._staged)
        self._staged.clear()
        self._staged_bytes = max(0, self._staged_bytes - dropped)
        return lsn

    journal_module.Journal.append_many = _append_without_bytes  # type: ignore[method-assign]
