"""``python -m replicator.engine.fuse SOURCE MOUNTPOINT JOURNAL_DIR``: the filter alone.

For tests and manual runs; ``replicator send --capture fuse`` is the production entry.
Logs JSON lines on stderr; SIGTERM/SIGINT unmount cleanly and exit 0. Exit codes are
those of ``replicator.engine.errors.ExitCode``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import structlog
import uvloop

from replicator.engine.errors import ReplicatorError
from replicator.engine.fuse.capture import FuseCapture
from replicator.journal.journal import Journal


def _configure_logging() -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


async def _main(source: Path, mountpoint: Path, journal_dir: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with await Journal.open(journal_dir) as journal:
        await FuseCapture(source, mountpoint, journal).run(stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replicator.engine.fuse")
    parser.add_argument("source", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("journal_dir", type=Path)
    args = parser.parse_args(argv)
    _configure_logging()
    try:
        uvloop.run(_main(args.source, args.mountpoint, args.journal_dir))
    except ReplicatorError as exc:
        structlog.get_logger("replicator.fuse").error("fuse.failed", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
