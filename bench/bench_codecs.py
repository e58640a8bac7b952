"""How far compression can carry the WAN targets that depend on it, on `replicator bench`'s data.

Two targets of the WAN issue are bound by how small the data can be made on a 100 Mbit
link: the first sync's file data / wire of the mixed image (target 2x), and a 1% change
synced in at most 0.3x of rsync's time (rsync sends the changed bytes uncompressed; ours
must cross the same link). This measures every setting the sender has (lz4 fast, lz4's
high-compression levels: the same block format, as the wire protocol carries it) and, for
comparison, zstd's levels (when the ``zstandard`` package is installed: not a dependency of
the product), on the bytes `replicator bench` sends: the image's non-zero 1 MiB blocks
(zeros are never sent as data) and the 64 KiB extents its change rewrites, each compressed
as the sender frames them (2 MiB, independently, one thread).

Per setting: the ratio, the encode speed, and what it delivers on the link:

* file data / wire = min(ratio, encode speed / link rate): a setting slower than the link
  times its ratio can only deliver its own speed;
* the change's shortest sync: its compressed bytes at the link's rate, plus one round trip
  (the last byte's way there and the acknowledgement's way back), with nothing else (no
  start-up, scan or handshake), so a real sync can only take longer.

Run: ``.venv/bin/python bench/bench_codecs.py [--size-mib 1024] [--rate 100Mbit]
[--rtt 50ms] [--sample-mib 256]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lz4.block

from replicator.engine.benchmark_workload import (
    BLOCK,
    CHANGE_EXTENT,
    Mix,
    change_image,
    write_image,
)
from replicator.engine.session_core import FRAME_TARGET
from replicator.transport.compression import HC_LEVEL
from replicator.transport.wan import parse_duration, parse_rate

Codec = Callable[[bytes], bytes]


def lz4_high(level: int) -> Codec:
    def compress(block: bytes) -> bytes:
        packed: bytes = lz4.block.compress(
            block, mode="high_compression", compression=level, store_size=False
        )
        return packed

    return compress


def codecs() -> list[tuple[str, Codec]]:
    """Every lz4 setting the sender has, and zstd's levels when installed."""
    found: list[tuple[str, Codec]] = [
        ("lz4 fast (sender)", lambda b: lz4.block.compress(b, store_size=False)),
        (f"lz4 HC{HC_LEVEL} (sender's high mode)", lz4_high(HC_LEVEL)),
        ("lz4 HC9", lz4_high(9)),
        ("lz4 HC12 (lz4's most)", lz4_high(12)),
    ]
    try:
        import zstandard  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print("zstandard is not installed: lz4 only (pip install zstandard to compare)")
        return found
    for level in (1, 3, 9, 15, 19):
        found.append((f"zstd {level}", zstandard.ZstdCompressor(level=level).compress))
    return found


def frames(data: bytes) -> list[bytes]:
    return [data[i : i + FRAME_TARGET] for i in range(0, len(data), FRAME_TARGET)]


def measure(codec: Codec, parts: list[bytes]) -> tuple[float, float]:
    """(ratio, encode MB/s) over ``parts``; a frame that does not shrink is sent raw."""
    raw = sum(map(len, parts))
    start = time.perf_counter()
    wire = sum(min(len(codec(part)), len(part)) for part in parts)
    seconds = time.perf_counter() - start
    return raw / wire, raw / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (bench: 1G)")
    parser.add_argument("--rate", default="100Mbit", help="link rate (bench's default)")
    parser.add_argument("--rtt", default="50ms", help="round-trip time of the link")
    parser.add_argument(
        "--sample-mib",
        type=int,
        default=256,
        help="MiB of the image's data blocks compressed (spread over the image)",
    )
    opts = parser.parse_args()
    link = parse_rate(opts.rate)  # bytes per second
    rtt = parse_duration(opts.rtt)
    with tempfile.TemporaryDirectory(prefix="bench-codecs-") as work:
        image = Path(work) / "image"
        write_image(image, opts.size_mib * BLOCK, Mix.mixed)
        before = image.read_bytes()
        change_image(image, 0.01, Mix.mixed)
        after = image.read_bytes()
    blocks = [before[i : i + BLOCK] for i in range(0, len(before), BLOCK)]
    data = [b for b in blocks if b.count(0) != len(b)]
    step = max(1, len(data) // max(1, opts.sample_mib))
    sample = frames(b"".join(data[::step][: opts.sample_mib]))
    changed = b"".join(
        after[i : i + CHANGE_EXTENT]
        for i in range(0, len(after), CHANGE_EXTENT)
        if after[i : i + CHANGE_EXTENT] != before[i : i + CHANGE_EXTENT]
    )
    change = frames(changed)
    plain = len(changed) / link + rtt
    print(
        f"mixed image {opts.size_mib} MiB: {len(data)} MiB of data blocks, "
        f"{sum(map(len, sample)) / 2**20:.0f} MiB sampled; 1% change {len(changed) / 1e6:.2f} MB; "
        f"link {link * 8 / 1e6:.0f} Mbit/s, RTT {rtt * 1000:.0f} ms; frames of "
        f"{FRAME_TARGET // 2**20} MiB, one thread"
    )
    print(f"the change uncompressed (as rsync sends it): {plain:.3f} s on the link + RTT")
    print(
        f"{'setting':<28} {'data ratio':>10} {'MB/s':>7} {'file data / wire':>17}"
        f" {'change ratio':>12} {'change: link + RTT':>19}"
    )
    for name, codec in codecs():
        ratio, speed = measure(codec, sample)
        delivered = min(ratio, speed * 1e6 / link)
        change_ratio, change_speed = measure(codec, change)
        # the change leaves at the slower of the link and the encoder
        wire_time = max(len(changed) / change_ratio / link, len(changed) / (change_speed * 1e6))
        print(
            f"{name:<28} {ratio:>9.3f}x {speed:>7.0f} {delivered:>16.3f}x"
            f" {change_ratio:>11.3f}x {wire_time + rtt:>17.3f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
