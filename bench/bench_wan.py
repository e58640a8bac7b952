"""The WAN emulator (replicator.transport.wan) against plain loopback TCP, same run.

A 1 MiB-chunk bulk transfer between two other processes, once direct and once through the
proxy: with no delay and no cap (what the proxy costs), and at 100 ms RTT with a 100 Mbit/s
cap (how close the link model gets to its set rate, the peer for `replicator bench`).

Usage: python bench/bench_wan.py [--mib 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from replicator.transport.wan import LinkProfile, WanEmulator

SINK = """
import socket, time
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
buf = bytearray(1 << 20)
total, first = 0, 0.0
while n := conn.recv_into(buf):
    first = first or time.monotonic()
    total += n
print(total / (time.monotonic() - first), flush=True)
"""
SOURCE = """
import os, socket, sys
chunk = os.urandom(1 << 20)
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s:
    for _ in range(int(sys.argv[2])):
        s.sendall(chunk)
"""


async def bulk(profile: LinkProfile | None, mib: int) -> float:
    """Bytes per second of a plain TCP transfer, direct (``profile`` None) or proxied."""
    sink = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SINK, stdout=asyncio.subprocess.PIPE
    )
    assert sink.stdout is not None
    port = int(await sink.stdout.readline())
    if profile is None:
        source = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SOURCE, str(port), str(mib)
        )
        await source.wait()
    else:
        async with WanEmulator(("127.0.0.1", port), profile=profile) as wan:
            source = await asyncio.create_subprocess_exec(
                sys.executable, "-c", SOURCE, str(wan.address[1]), str(mib)
            )
            await source.wait()
    rate = float(await sink.stdout.readline())
    await sink.wait()
    return rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=2000)
    args = parser.parse_args()
    direct = await bulk(None, args.mib)
    proxied = await bulk(LinkProfile(), args.mib)
    print(
        f"no delay, no cap: proxy {proxied / 1e6:.0f} MB/s, direct {direct / 1e6:.0f} MB/s "
        f"({proxied / direct:.2f}x)"
    )
    capped = await bulk(LinkProfile(delay=0.05, rate=12.5e6), 100)
    print(f"100 ms RTT, 100 Mbit/s cap: {capped * 8 / 1e6:.1f} Mbit/s ({capped / 12.5e6:.3f}x)")


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
