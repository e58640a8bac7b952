"""Goodput of `replicator send --once` through the WAN emulator, with the receiver's credit
window fixed or adaptive, against plain TCP through the same path.

An incompressible image (wire bytes = payload bytes: the figure is the window's and the
link's, not lz4's) is sent once through ``WanEmulator`` at the given one-way delay and
rate cap, to a receiver whose window is either **fixed** (``window_cap`` = the Welcome's
66 MiB: credit is exactly what was synced, the rule before engine/window.py) or
**adaptive** (the default: two bandwidth-delay products, up to 256 MiB). Goodput is
measured at the proxy: bytes forwarded upstream between the moments 10% and 90% of the
total had passed (the steady state, without handshake, manifests and the final apply);
"whole" is the payload over the sender's whole run. Plain TCP is bench/bench_wan.py's
bulk transfer through the same profile.

Usage: python bench/bench_window.py [--mib 200] [--delay 0.05] [--rate 100Mbit]
           [--window fixed|adaptive|both] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPLICATOR
from bench_wan import SINK, SOURCE

from replicator.transport.wan import LinkProfile, WanEmulator, parse_rate

MIB = 1024 * 1024
WINDOW = 66 * MIB
RECEIVER = """
import asyncio, sys
from pathlib import Path
from replicator.engine.receiver import Receiver, ReceiverConfig
from replicator.transport import serve

async def main() -> None:
    root, cap = Path(sys.argv[1]), int(sys.argv[2])
    receiver = Receiver(ReceiverConfig(root / "replicas", root / "state", window_cap=cap))
    server = await serve("127.0.0.1", 0, receiver.handle)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def bulk(profile: LinkProfile, mib: int) -> float:
    """Plain TCP through the proxy (bench_wan's sink and source); unlike bench_wan.bulk, the
    proxy stays up until the sink has everything (at long delays the tail is in flight)."""
    sink = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SINK, stdout=asyncio.subprocess.PIPE
    )
    assert sink.stdout is not None
    port = int(await sink.stdout.readline())
    async with WanEmulator(("127.0.0.1", port), profile=profile) as wan:
        source = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SOURCE, str(wan.address[1]), str(mib)
        )
        rate = float(await sink.stdout.readline())
        await source.wait()
    await sink.wait()
    return rate


async def send_through(
    profile: LinkProfile, image: Path, work: Path, window_cap: int
) -> dict[str, Any]:
    receiver = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RECEIVER, str(work), str(window_cap),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert receiver.stdout is not None
    port = int(await receiver.stdout.readline())
    samples: list[tuple[float, int]] = []
    try:
        async with WanEmulator(("127.0.0.1", port), profile=profile) as wan:

            async def sample() -> None:
                while True:
                    samples.append((time.monotonic(), wan.stats.bytes_up))
                    await asyncio.sleep(0.02)

            sampler = asyncio.create_task(sample())
            proc = await asyncio.create_subprocess_exec(
                *REPLICATOR, "send", "--to", f"127.0.0.1:{wan.address[1]}", "--job", "b",
                "--state-dir", str(work / "sstate"), "--insecure", "--once", "--json",
                str(image),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            out, _ = await proc.communicate()
            sampler.cancel()
    finally:
        receiver.kill()
        await receiver.wait()
    summary = json.loads(out)
    total = samples[-1][1]
    t10 = next(t for t, b in samples if b >= 0.1 * total)
    t90, b90 = next((t, b) for t, b in samples if b >= 0.9 * total)
    b10 = next(b for t, b in samples if b >= 0.1 * total)
    return {
        "window": "fixed" if window_cap == WINDOW else "adaptive",
        "payload_bytes": summary["payload_bytes"],
        "send_seconds": summary["seconds"],
        "steady_goodput_bytes_per_second": (b90 - b10) / (t90 - t10),
        "whole_goodput_bytes_per_second": summary["payload_bytes"] / summary["seconds"],
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.05, help="one-way delay, seconds")
    parser.add_argument("--rate", default="100Mbit")
    parser.add_argument("--window", choices=("fixed", "adaptive", "both"), default="both")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    profile = LinkProfile(delay=args.delay, rate=parse_rate(args.rate))
    caps = {"fixed": [WINDOW], "adaptive": [256 * MIB], "both": [WINDOW, 256 * MIB]}
    runs: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-window-"))
    try:
        image = work / "disk.img"
        with image.open("wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(MIB))
        for cap in caps[args.window]:
            run = work / f"run-{cap}"
            run.mkdir()
            runs.append(await send_through(profile, image, run, cap))
            shutil.rmtree(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tcp = await bulk(profile, min(args.mib, 100))
    for result in runs:
        steady = result["steady_goodput_bytes_per_second"]
        result["steady_vs_tcp"] = round(steady / tcp, 3) if tcp else None
    summary = {"rtt_seconds": 2 * args.delay, "rate": args.rate, "tcp_goodput": tcp, "runs": runs}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{2 * args.delay * 1000:.0f} ms RTT, {args.rate}: plain TCP {tcp * 8 / 1e6:.1f} Mbit/s")
    for result in runs:
        steady = result["steady_goodput_bytes_per_second"]
        print(
            f"  {result['window']:>8} window: steady {steady * 8 / 1e6:.1f}"
            f" Mbit/s ({result['steady_vs_tcp']}x TCP), whole run "
            f"{result['whole_goodput_bytes_per_second'] * 8 / 1e6:.1f} Mbit/s "
            f"({result['payload_bytes'] / MIB:.0f} MiB in {result['send_seconds']} s)"
        )


if __name__ == "__main__":
    asyncio.run(main())
