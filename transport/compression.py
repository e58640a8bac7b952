"""Whether lz4 pays on this connection: a per-connection choice on top of the per-frame one.

Per frame, ``encode_frame`` already sends a payload raw when samples say it will not shrink
by 5% or the result does not save 10%. That says nothing about time: lz4 costs CPU (on a
2-core machine, shared: 350-700 MB/s of mixed or binary data, measured), and encoding runs
in the sender's event loop, so every second it compresses is a second it does not send.
Compression pays only while the wire time it saves is more than the CPU time it costs:

    (1 - ratio) / rate  >  extra encode seconds per raw byte

``rate`` is the rate the link is held to (the shaper's, bytes per second); ``ratio`` (wire
over raw bytes of the compressed frames) is a moving average over this connection's frames,
the extra encode time is the compressed frames' encode seconds per byte minus the raw
frames', each the least of the last few frames (a frame's time only ever grows when the
process is preempted, so the least is the cost itself).
At 100 Mbit/s it always pays (lz4 is 20-50x faster than the link); it stops paying near
1 Gbit/s for binaries (ratio 0.62 at 350 MB/s) and near 2.7 Gbit/s for mixed data (0.5 at
670 MB/s). Without a known rate (no cap) the link might be slow, so lz4 stays on.

While lz4 is off, one bulk frame in ``PROBE_EVERY`` is still compressed, so a change in the
data (or the rate) is noticed. Sans-IO: the connection times the encoding and reports it.
"""

from __future__ import annotations

import collections
from typing import Final

__all__ = ["PROBE_EVERY", "CompressionChoice"]

PROBE_EVERY: Final = 32
_WEIGHT: Final = 0.25  # of the newest frame in the ratio's moving average
_KEEP: Final = 8  # encode times kept per kind


class CompressionChoice:
    """See the module docstring."""

    def __init__(self) -> None:
        self.ratio: float | None = None  # wire / raw of compressed frames
        # encode seconds per raw byte of the last frames, compressed and raw
        self._lz4: collections.deque[float] = collections.deque(maxlen=_KEEP)
        self._raw: collections.deque[float] = collections.deque(maxlen=_KEEP)
        self._skipped = 0
        self.skipping = False  # the last ``use`` said no

    @property
    def lz4_cost(self) -> float | None:
        """Encode seconds per raw byte of a compressed frame (None: none seen yet)."""
        return min(self._lz4) if self._lz4 else None

    @property
    def raw_cost(self) -> float:
        return min(self._raw) if self._raw else 0.0

    def observe(self, raw: int, wire: int, seconds: float, compressed: bool) -> None:
        """A bulk frame of ``raw`` payload bytes was encoded in ``seconds``; ``compressed``:
        lz4 was tried (whether or not its result was kept: ``wire`` is what went)."""
        if raw <= 0 or seconds < 0:
            return
        if compressed:
            ratio = min(1.0, wire / raw)
            self.ratio = (
                ratio if self.ratio is None else self.ratio + _WEIGHT * (ratio - self.ratio)
            )
            self._lz4.append(seconds / raw)
        else:
            self._raw.append(seconds / raw)

    def pays(self, rate: float | None) -> bool:
        """Whether lz4 saves more wire time than it costs at ``rate`` (bytes/s; None:
        unknown, 0: paused)."""
        lz4_cost = self.lz4_cost
        if not rate or self.ratio is None or lz4_cost is None:
            return True
        extra = max(0.0, lz4_cost - self.raw_cost)
        return (1.0 - self.ratio) / rate > extra

    def use(self, rate: float | None) -> bool:
        """Compress the next bulk frame? (``pays``, with a probe now and then.)"""
        if self.pays(rate):
            self.skipping = False
            self._skipped = 0
            return True
        self.skipping = True
        self._skipped += 1
        if self._skipped >= PROBE_EVERY:
            self._skipped = 0
            return True
        return False
