"""lz4 per connection (transport/compression.py): kept while the wire time it saves is more
than the CPU it costs, dropped when the link (as the shaper holds it) is faster than that,
probed now and then; then over a real connection pair with a token bucket."""

from __future__ import annotations

import asyncio
import random

from replicator.transport import Credit, Records, connection_pair
from replicator.transport.compression import PROBE_EVERY, CompressionChoice
from replicator.transport.shaper import TokenBucket

from .helpers import HELLO, pack_records, welcome

MiB = 1024 * 1024


def _measured(ratio: float, lz4_speed: float, raw_speed: float = 3e9) -> CompressionChoice:
    """A choice that saw frames compressed to ``ratio`` at ``lz4_speed`` bytes/s."""
    choice = CompressionChoice()
    choice.observe(MiB, MiB, MiB / raw_speed, compressed=False)
    choice.observe(MiB, int(MiB * ratio), MiB / lz4_speed, compressed=True)
    return choice


def test_lz4_pays_on_a_slow_link_and_not_on_a_fast_one() -> None:
    mixed = _measured(0.5, 670e6)  # mixed data, as measured on this machine
    assert mixed.pays(12.5e6)  # 100 Mbit/s
    assert mixed.pays(125e6)  # 1 Gbit/s
    assert not mixed.pays(1.25e9)  # 10 Gbit/s: lz4 would be the bottleneck
    binaries = _measured(0.62, 350e6)
    assert binaries.pays(12.5e6) and not binaries.pays(250e6)  # stops near 1 Gbit/s
    incompressible = _measured(1.0, 3e9)
    assert not incompressible.pays(12.5e6)  # saves nothing: costs something
    assert CompressionChoice().pays(1e12)  # nothing measured yet: try
    assert mixed.pays(None) and mixed.pays(0)  # no known rate: the link may be slow


def test_while_off_one_frame_in_probe_every_is_compressed() -> None:
    choice = _measured(0.5, 670e6)
    uses = [choice.use(1.25e9) for _ in range(3 * PROBE_EVERY)]
    assert uses.count(True) == 3 and choice.skipping
    assert uses[PROBE_EVERY - 1] and not any(uses[: PROBE_EVERY - 1])
    assert choice.use(12.5e6) and not choice.skipping  # the rate dropped: on again


def _compressible(n: int) -> bytes:
    rng = random.Random(n)
    words = [b"replica", b"journal", b"extent", b"epoch", b"barrier", b"volume"]
    return b" ".join(rng.choices(words, k=n // 4))[:n]


async def _wire_per_frame(bucket: TokenBucket, frames: int) -> list[float]:
    """Send ``frames`` compressible Records through a pair whose sender is shaped by
    ``bucket``; the wire/payload ratio of each frame as the receiver got it."""
    sender, receiver = await connection_pair(shaper=bucket)
    ratios: list[float] = []
    try:
        await sender.send(HELLO)
        assert await receiver.recv(5) == HELLO
        await receiver.send(welcome(64 * MiB))
        await sender.recv(5)
        data = _compressible(256 * 1024)
        for lsn in range(1, frames + 1):
            before = receiver.stats.payload_received_wire
            await sender.send(pack_records(lsn, [data]))
            msg = await receiver.recv(5)
            assert isinstance(msg, Records)
            ratios.append((receiver.stats.payload_received_wire - before) / len(msg.payload))
            await receiver.send(Credit(len(msg.payload)))
            await sender.recv(5)
    finally:  # both at once: each lingers until the other closes
        await asyncio.gather(sender.aclose(), receiver.aclose())
    return ratios


async def test_a_connection_drops_lz4_when_the_link_outruns_it() -> None:
    slow = await _wire_per_frame(TokenBucket(12.5e6, 64 * MiB), 8)
    assert all(r < 0.6 for r in slow), slow  # 100 Mbit/s: compressed throughout
    fast = await _wire_per_frame(TokenBucket(1e12, 64 * MiB), PROBE_EVERY + 4)
    assert fast[0] < 0.6  # the first frame measures lz4 ...
    assert sum(r > 0.99 for r in fast[2:]) >= PROBE_EVERY - 2, fast  # ... then raw
    assert any(r < 0.6 for r in fast[2:]), fast  # a probe now and then
