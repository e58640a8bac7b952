"""The child processes a benchmark starts (receivers, senders, rsync daemons): a free
loopback port for them, and a stop that always reaps."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

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


async def wait_listening(
    proc: asyncio.subprocess.Process, host: str, port: int, timeout: float
) -> str | None:
    """Wait until ``proc`` accepts connections on ``host:port``. None when it does;
    else why not ("exited" or "timeout"), for the caller's own error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if proc.returncode is not None:
                return "exited"
            if time.monotonic() > deadline:
                return "timeout"
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None
