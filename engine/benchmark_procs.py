"""The child processes a benchmark starts (receivers, senders, rsync daemons): a free
loopback port for them, and a stop that always reaps."""

from __future__ import annotations

import asyncio
import contextlib
import socket

STOP_TIMEOUT = 10.0  # SIGTERM, then SIGKILL after this long


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; reaped either way."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
