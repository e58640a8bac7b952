"""A probe, never a way to run: a `replicator send` that ships journal records unchecked.

The sender reads back every record it ships from its own journal and checks its blake3
checksum, which the receiver checks again on arrival. Shipping without the sender's check
(checking the journal only when the receiver refuses a record) is a design the speed issue's
notes name for the FUSE job; before building it, this measures the most it could gain:
with this folder on ``PYTHONPATH``, every `replicator send` started from that environment
reads its journal's records with lengths and order checked but no checksum computed. A
flipped journal byte then reaches the receiver, which refuses it: a probe for benchmarks
only, e.g. (with the receiver's probe too, both directions at once)

    PYTHONPATH=bench/probes/no_sender_recheck:bench/probes/no_receiver_journal \\
        .venv/bin/python bench/bench_fuse.py --job '1M seqwrite' --column replicating \\
        --column 'bindfs -M bw' --repeat 1

Other commands (the receiver, fio, bindfs) are not touched.
"""

from __future__ import annotations

import sys

if "send" in sys.argv:
    import replicator.journal.segment as segment
    from replicator.journal.records import RECORD_HEADER, EncodedRecord, peek_length

    def _unchecked(buf: bytes | memoryview, pos: int = 0) -> tuple[EncodedRecord, int]:
        total = peek_length(buf, pos)
        fields = RECORD_HEADER.unpack_from(buf, pos)
        return EncodedRecord(fields[5], fields[6], bytes(memoryview(buf)[pos : pos + total])), (
            pos + total
        )

    segment.check_record = _unchecked  # type: ignore[attr-defined]  # SegmentReader looks it up
