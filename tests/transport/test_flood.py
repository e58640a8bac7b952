"""A real `replicator receive` under a flood of strangers: bounded memory, still serving.

Each stranger connects and sends one 36-byte frame prefix announcing a 64 MiB body, and
nothing else (no Hello). Before the frame limits, every such prefix made the receiver
allocate the 64 MiB (100 of them: 1.5-2.2 GB RSS within 1.5 s, and 190-230 MiB still
held after they closed). The figures are printed (pytest -s) so they can be quoted.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.transport import (
    PROTOCOL_VERSION,
    Goodbye,
    Hello,
    MessageType,
    Welcome,
    connect,
)
from tests.tools import ReceiverProc, answer_to_hello, send_once, start_receiver

MIB = 1024 * 1024
BOUND = 30 * MIB  # above the baseline, during the flood and after it


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def stranger_prefix(i: int) -> bytes:
    """A prefix announcing a 64 MiB body: a Hello, or a Records out of turn."""
    mtype = MessageType.HELLO if i % 2 == 0 else MessageType.RECORDS
    return struct.pack("<4sBBBBIII16s", b"RPLW", 1, mtype, 0, 0, 0, 64 * MIB, 64 * MIB, bytes(16))


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[ReceiverProc]:
    rcv = start_receiver(tmp_path / "target")  # every stranger is logged: to a file
    try:
        yield rcv
    finally:
        rcv.stop()


async def say_hello(port: int, job: str) -> float:
    """A legitimate sender's handshake; seconds until the receiver's Welcome."""
    start = time.monotonic()
    conn = await connect("127.0.0.1", port)
    try:
        await conn.send(Hello(PROTOCOL_VERSION, job, (), ("lz4",), 0, uuid.uuid4().hex))
        reply = await answer_to_hello(conn, timeout=20)
        assert isinstance(reply, Welcome), reply
        elapsed = time.monotonic() - start
        await conn.send(Goodbye("done"))
    finally:
        await conn.aclose()
    return elapsed


def flood(receiver: ReceiverProc, tmp_path: Path, connections: int, rounds: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < connections + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, connections + 256), hard))
    pid = receiver.proc.pid
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x5a" * 65536)
    # the baseline includes what a session loads and allocates once (job, journal, code)
    send_once(receiver, "warmup", tmp_path / "warmup-state", disk)
    asyncio.run(say_hello(receiver.port, "warmup"))
    time.sleep(1.5)
    baseline = rss(pid)
    print(f"\nreceiver RSS baseline {baseline / MIB:.1f} MiB")
    for n in range(1, rounds + 1):
        strangers: list[socket.socket] = []
        peak = rss(pid)
        try:
            for i in range(connections):
                sock = socket.create_connection(("127.0.0.1", receiver.port), timeout=30)
                strangers.append(sock)
                sock.sendall(stranger_prefix(i))
                if i % 50 == 0:
                    peak = max(peak, rss(pid))
            for _ in range(10):
                time.sleep(0.05)
                peak = max(peak, rss(pid))
            # a legitimate sender gets its answer during the flood
            welcome_s = asyncio.run(say_hello(receiver.port, f"legit{n}"))
            if n == 1:
                send_once(receiver, "legit", tmp_path / "state", disk)
            peak = max(peak, rss(pid))
        finally:
            for sock in strangers:
                sock.close()
        time.sleep(1.5)  # the receiver sees them go (and trims memory 1 s after)
        after = rss(pid)
        print(
            f"round {n}: {connections} strangers, peak RSS {peak / MIB:.1f} MiB "
            f"(+{(peak - baseline) / MIB:.1f}), after {after / MIB:.1f} MiB "
            f"(+{(after - baseline) / MIB:.1f}); Welcome after {welcome_s * 1000:.0f} ms"
        )
        assert peak < baseline + BOUND, f"round {n}: peak {peak / MIB:.1f} MiB"
        assert after < baseline + BOUND, f"round {n}: after {after / MIB:.1f} MiB"
    assert receiver.proc.poll() is None


def test_a_flood_of_strangers_costs_the_receiver_little(
    receiver: ReceiverProc, tmp_path: Path
) -> None:
    flood(receiver, tmp_path, connections=100, rounds=4)


@pytest.mark.long
def test_a_flood_of_a_thousand_strangers(receiver: ReceiverProc, tmp_path: Path) -> None:
    flood(receiver, tmp_path, connections=1000, rounds=4)
