"""``python -m tests.fuse.stop_probe HOW SOURCE MOUNTPOINT JOURNAL_DIR``: stop a busy capture.

Writers keep several pyfuse3 workers busy through the mount while the capture is stopped
``HOW``: ``stop`` (the stop event, as a sender's handover does), ``cancel`` (the task
running the capture is cancelled) or ``terminate-fails`` (``pyfuse3.terminate()`` raises,
as it did when a woken future was already done). ``pyfuse3.close()`` is watched: it must
find no worker task alive, since one that resumes after it calls libfuse with a NULL
session. Prints one JSON line: the workers alive at ``close()`` and how the run ended.
The caller puts ``disk.img`` (``SPAN`` bytes) in SOURCE first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pyfuse3
import uvloop

from replicator.engine.fuse import capture
from replicator.engine.fuse.capture import FuseCapture
from replicator.journal.journal import Journal

WRITERS = 8
PIECE = 128 * 1024
SPAN = 16 * 1024 * 1024


def _live_workers() -> list[str]:
    """pyfuse3's worker tasks (named ``pyfuse-NN`` by its nursery) that have not ended."""
    names = (str(getattr(task, "name", "")) for task in asyncio.all_tasks() if not task.done())
    return [name for name in names if name.startswith("pyfuse-")]


def _write_until(path: Path, halt: threading.Event, errors: list[str]) -> None:
    piece = bytearray(os.urandom(PIECE))
    stamp = os.urandom(8)  # this writer's, then a count: no write repeats what is there
    count = 0
    offset = 0
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        errors.append(repr(exc))
        return
    try:
        while not halt.is_set():
            count += 1
            piece[:16] = stamp + count.to_bytes(8, "little")
            os.pwrite(fd, piece, offset)
            offset = (offset + PIECE) % SPAN
    except OSError as exc:  # the mount went away under the write: expected at the end
        errors.append(repr(exc))
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN once the session is gone
            os.close(fd)


async def _probe(how: str, source: Path, mountpoint: Path, journal_dir: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {"alive_at_close": None}
    real_close = pyfuse3.close

    def watched_close(unmount: bool = True) -> None:
        seen["alive_at_close"] = _live_workers()
        real_close(unmount=unmount)

    pyfuse3.close = watched_close
    stop_timeout = capture.STOP_TIMEOUT
    if how == "terminate-fails":
        stop_timeout = 1.0

        def failing_terminate() -> None:
            raise RuntimeError("terminate failed (simulated)")

        pyfuse3.terminate = failing_terminate
    stop = asyncio.Event()
    halt = threading.Event()
    errors: list[str] = []
    async with await Journal.open(journal_dir) as journal:
        cap = FuseCapture(source, mountpoint, journal, stop_timeout=stop_timeout)
        run = asyncio.ensure_future(cap.run(stop))
        await asyncio.wait_for(cap.mounted.wait(), 20)
        writers = [
            threading.Thread(target=_write_until, args=(mountpoint / "disk.img", halt, errors))
            for _ in range(WRITERS)
        ]
        for w in writers:
            w.start()
        await asyncio.sleep(0.5)
        if how == "cancel":
            run.cancel()
        else:
            stop.set()
        try:
            await run
            seen["ended"] = "returned"
        except asyncio.CancelledError:
            seen["ended"] = "cancelled"
        except Exception as exc:
            seen["ended"] = repr(exc)
        halt.set()
        for w in writers:
            await asyncio.to_thread(w.join, 30)
        seen["writers_stuck"] = sum(w.is_alive() for w in writers)
    seen["writer_errors"] = sorted(set(errors))
    return seen


def main() -> int:
    how, source, mountpoint, journal_dir = sys.argv[1:5]
    seen = uvloop.run(_probe(how, Path(source), Path(mountpoint), Path(journal_dir)))
    seen["mounted"] = os.path.ismount(mountpoint)
    print(json.dumps(seen), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
