"""lz4 per connection (transport/compression.py): kept while the wire time it saves is more
than the CPU it costs, dropped when the link (as the shaper holds it) is faster than that,
probed now and then; then over a real connection pair with a token bucket."""

from __future__ import annotations

import asyncio
import random

from replicator.transport import Credit, Records, connection_pair
from replicator.transport.compression import (
    HC_LEVEL,
    HOPELESS_PROBES,
    PROBE_EVERY,
    RATE_WINDOWS,
    WINDOW_FRAMES,
    CompressionChoice,
)
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


def test_lz4_whose_output_always_goes_raw_stops_at_any_rate_until_a_probe_saves() -> None:
    """Data that samples say may shrink by 5% but that lz4 shrinks by less than the 10% a
    frame needs: every frame was compressed, then sent raw. With no rate known (a shipper
    mostly waiting for its journal measures none), it used to go on for good."""
    choice = _measured(0.5, 700e6)  # compressible at first
    for _ in range(30):
        choice.observe(MiB, MiB, MiB / 700e6, compressed=True)  # lz4 ran, the frame went raw
    assert not choice.pays(None) and not choice.pays(12.5e6) and not choice.pays(0)
    used = [choice.use(None) for _ in range(PROBE_EVERY)]
    assert used.count(True) == 1  # probed now and then
    choice.observe(MiB, MiB // 2, MiB / 700e6, compressed=True)  # the data changed
    assert choice.pays(None)


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


def _window(
    choice: CompressionChoice, wire: int, encode: float, waited: float, between: float
) -> None:
    """One observation window of identical frames."""
    for _ in range(WINDOW_FRAMES):
        choice.observe_send(wire, encode, waited, between)


def test_without_a_cap_lz4_is_dropped_when_the_cpu_not_the_link_is_the_bottleneck() -> None:
    mixed = _measured(0.5, 670e6)
    _window(mixed, MiB, 0.0015, 0.0, 0.002)  # never waits for the link, a third encoding
    assert mixed.cpu_bound and mixed.link_rate is None
    assert not mixed.pays(None)  # the link took all we made: lz4 only costs
    assert mixed.pays(12.5e6)  # a cap still decides by its rate


def _cpu_bound(choice: CompressionChoice) -> bool:
    return choice.cpu_bound  # read again after a call (mypy keeps the earlier narrowing)


def test_without_a_cap_a_link_that_makes_us_wait_is_measured_and_lz4_kept() -> None:
    mixed = _measured(0.5, 670e6)
    _window(mixed, MiB, 0.0015, 0.08, 0.001)  # 100 Mbit/s: mostly waiting to drain
    assert mixed.link_rate is not None and 10e6 < mixed.link_rate < 13e6
    assert not mixed.cpu_bound and mixed.pays(None)
    # later the CPU limits us (lz4 on): the measured link still says lz4 pays
    _window(mixed, MiB // 2, 0.0015, 0.0, 0.002)
    assert _cpu_bound(mixed) and mixed.pays(None)


def test_idle_windows_change_nothing() -> None:
    mixed = _measured(0.5, 670e6)
    _window(mixed, MiB, 0.0015, 0.0, 1.0)  # mostly nothing to send: says nothing
    assert not mixed.cpu_bound and mixed.link_rate is None and mixed.pays(None)


def _with_high_mode(ratio: float = 0.57, speed: float = 60e6) -> CompressionChoice:
    """The benchmark's mixed data in both modes: fast 0.66 at 560 MB/s, high as given."""
    choice = _measured(0.66, 560e6)
    choice.observe(MiB, int(MiB * ratio), MiB / speed, compressed=True, level=HC_LEVEL)
    return choice


def test_on_a_slow_link_the_high_mode_is_measured_then_kept_when_it_moves_more() -> None:
    choice = _measured(0.66, 560e6)  # the benchmark's mixed data, fast mode
    assert choice.level(None) == 0  # no rate known: fast
    assert choice.level(12.5e6) == HC_LEVEL  # a slow link: the high mode is tried first
    choice.observe(MiB, int(MiB * 0.57), MiB / 60e6, compressed=True, level=HC_LEVEL)
    levels = [choice.level(12.5e6) for _ in range(2 * PROBE_EVERY)]
    assert levels.count(HC_LEVEL) == len(levels) - 2  # kept, the fast mode re-measured twice
    assert choice.level(1.25e9) == 0  # 10 Gbit/s: the high mode could not keep up


def test_a_high_mode_slower_than_the_fast_one_moves_is_rarely_tried_again() -> None:
    choice = _with_high_mode()
    # 300 MB/s (a receiver on loopback): fast moves min(560, 300 / 0.66) = 454 MB/s of
    # file data; the high mode encodes 60 MB/s, so it cannot win and costs ~10x per frame
    frames = PROBE_EVERY * HOPELESS_PROBES
    levels = [choice.level(300e6) for _ in range(frames)]
    assert levels.count(HC_LEVEL) == 1
    # 20 MB/s: fast moves 30.3 MB/s and the high mode could reach 60: tried every PROBE_EVERY
    choice = _with_high_mode(ratio=0.7)
    levels = [choice.level(20e6) for _ in range(2 * PROBE_EVERY)]
    assert levels.count(HC_LEVEL) == 2  # high (28.6 MB/s) loses now, may win: measured


def test_a_high_mode_frame_is_an_ordinary_lz4_frame() -> None:
    from replicator.transport.frames import FrameDecoder, encode_frame

    data = _compressible(256 * 1024)
    msg = pack_records(1, [data])
    fast = encode_frame(msg, compress=True)
    high = encode_frame(msg, compress=True, level=HC_LEVEL)
    assert high.payload_wire < fast.payload_wire < len(data)
    decoder = FrameDecoder()
    decoder.feed(b"".join(high.buffers))
    frame = decoder.next_frame()
    assert frame is not None and frame.message == msg


def test_a_raw_frame_measured_slow_does_not_make_lz4_look_free() -> None:
    """The process descheduled while a raw frame was encoded: lz4 still costs something."""
    choice = CompressionChoice()
    choice.observe(1_000_000, 340_000, 0.001, True)  # lz4: 1 ns a byte
    choice.observe(1_000_000, 1_000_000, 0.005, False)  # raw, but slowed down 5 ms
    assert not choice.pays(1e12)  # a link far faster than lz4: raw
    assert choice.pays(12.5e6)  # 100 Mbit/s: compressed


def test_one_stalled_window_is_not_taken_for_a_slow_link() -> None:
    """A receiver stalled in an fsync makes one window wait long: the link's rate stays the
    best of the recent windows, so the fast mode stays (a loopback first sync took the high
    mode at ~60 MB/s for good)."""
    choice = _with_high_mode()
    _window(choice, MiB, 0.0015, 0.0025, 0.0)  # a receiver on loopback: ~262 MB/s
    _window(choice, MiB, 0.0015, 0.05, 0.0)  # then one second-long fsync: ~20 MB/s
    assert choice.link_rate is not None and choice.link_rate > 250e6
    assert [choice.level(None) for _ in range(PROBE_EVERY)] == [0] * PROBE_EVERY
    for _ in range(RATE_WINDOWS):  # a link that stays slow is taken for one
        _window(choice, MiB, 0.0015, 0.05, 0.0)
    assert choice.link_rate is not None and choice.link_rate < 25e6
    levels = [choice.level(None) for _ in range(PROBE_EVERY)]
    assert levels.count(HC_LEVEL) == PROBE_EVERY - 1  # and the fast one probed once


def test_without_a_cap_a_cpu_bound_sender_leaves_the_high_mode() -> None:
    choice = _with_high_mode()
    _window(choice, MiB, 0.0015, 0.05, 0.0)  # a link measured at ~20 MB/s
    assert choice.level(None) == HC_LEVEL
    _window(choice, int(MiB * 0.57), 0.035, 0.0, 0.001)  # the high mode: never waits
    assert _cpu_bound(choice)
    frames = PROBE_EVERY * HOPELESS_PROBES + 1
    assert [choice.level(None) for _ in range(frames)] == [0] * frames  # not even probed
    assert choice.level(12.5e6) == HC_LEVEL  # a cap is a known rate: it decides
    _window(choice, MiB, 0.0015, 0.05, 0.0)  # the link limits us again
    assert not _cpu_bound(choice) and choice.level(None) == HC_LEVEL


async def test_frames_the_samples_skip_do_not_measure_lz4() -> None:
    """A payload the samples say lz4 cannot shrink is sent raw in microseconds: taken for
    an lz4 frame, its cost made lz4 (and the high mode) look free."""
    sender, receiver = await connection_pair()
    try:
        await sender.send(HELLO)
        assert await receiver.recv(5) == HELLO
        await receiver.send(welcome(64 * MiB))
        await sender.recv(5)
        noise = random.Random(1).randbytes(MiB)
        for lsn, data in enumerate((noise, noise, _compressible(MiB)), start=1):
            await sender.send(pack_records(lsn, [data]))
            assert isinstance(await receiver.recv(5), Records)
            if lsn == 2:
                assert sender.compression.lz4_cost is None and sender.compression.ratio is None
        assert sender.compression.ratio is not None and sender.compression.ratio < 0.6
        cost = sender.compression.lz4_cost
        assert cost is not None and cost > 1 / 20e9  # lz4 at most 20 GB/s, never "free"
    finally:
        await asyncio.gather(sender.aclose(), receiver.aclose())
