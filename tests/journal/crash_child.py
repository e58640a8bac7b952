"""Child process for the crash test: append and sync forever, reporting each synced LSN.

Usage: ``python crash_child.py DIR SEED``. Every line on stdout is an LSN that ``sync()``
has returned for (so it must survive a SIGKILL), or ``R`` and an LSN before the child
retires every record below it, active segment included (as a `send --once` does at its
end: ``trim(..., retire_active=True)``). The parent kills this process at random moments.
Records are ``write_for(lsn)`` so the parent can check their content.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

from replicator.journal import Journal
from tests.journal.helpers import write_for

SEGMENT_BYTES = 64 * 1024
KEEP = 200  # the child trims everything more than KEEP LSNs below what it synced
RETIRE_SHARE = 0.03  # of the syncs, those after which it retires every record


async def main(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    journal = await Journal.open(path, segment_bytes=SEGMENT_BYTES)
    out = sys.stdout
    while True:
        nxt = journal.next_lsn
        batch = [
            write_for(lsn, rng.choice((10, 500, 4000, 20000)))
            for lsn in range(nxt, nxt + rng.randint(1, 8))
        ]
        if len(batch) == 1:
            assert await journal.append(batch[0]) == nxt
        else:
            assert await journal.append_many(batch) == nxt + len(batch) - 1
        if rng.random() < 0.5:
            synced = await journal.sync()
            out.write(f"{synced}\n")
            out.flush()
            if rng.random() < 0.05 and synced > KEEP:
                await journal.trim(synced - KEEP)
            elif rng.random() < RETIRE_SHARE:
                out.write(f"R {synced + 1}\n")
                out.flush()
                await journal.trim(synced + 1, retire_active=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
