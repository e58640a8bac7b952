"""Whether lz4 pays on this connection: a per-connection choice on top of the per-frame one.

Per frame, ``encode_frame`` already sends a payload raw when samples say it will not shrink
by 5% or the result does not save 10%. Data between the two (fio's buffers through its NBD
engine: samples 0.93-0.94) was compressed in full and thrown away on every frame; once the
ratio shows that (``_NO_GAIN``), lz4 stops until a probe frame saves again.

None of that says anything about time: lz4 costs CPU (on a 2-core machine, shared:
350-700 MB/s of mixed or binary data, measured), and encoding runs in the sender's event
loop, so every second it compresses is a second it does not send.
Compression pays only while the wire time it saves is more than the CPU time it costs:

    (1 - ratio) / rate  >  extra encode seconds per raw byte

``rate`` is the rate the link is held to (the shaper's, bytes per second); ``ratio`` (wire
over raw bytes of the compressed frames) is a moving average over this connection's frames,
the extra encode time is the compressed frames' encode seconds per byte minus the raw
frames', each the least of the last few frames (a frame's time only ever grows when the
process is preempted, so the least is the cost itself).
At 100 Mbit/s it always pays (lz4 is 20-50x faster than the link); it stops paying near
1 Gbit/s for binaries (ratio 0.62 at 350 MB/s) and near 2.7 Gbit/s for mixed data (0.5 at
670 MB/s).

Without a cap the rate is measured (``observe_send``): over each ``WINDOW_FRAMES`` bulk
frames the connection reports the seconds spent encoding, waiting for the transport to
drain (the link, or the receiver reading, is slower than us) and between frames (making
the next one: the journal, the scan, credit, or nothing to send). Mostly waiting to drain
means the link is the bottleneck, and the wire bytes per second of that window are its
rate, used as a cap's would be. Never waiting while encoding is a real share of the time
means the CPU is the bottleneck and the link took all we made: until a window shows the
link's limit, lz4 only costs, and is skipped (the probe frames still measure it). Windows
that are mostly between frames say nothing about either and change nothing. The link's
rate is the best of the last ``RATE_WINDOWS`` windows, not the last one: a receiver that
stalls for a second in an fsync makes one window look like a slow link, and a sender that
took it for one chose the high mode below, became CPU-bound in it (~60 MB/s) and measured
only its own output from then on (a loopback first sync took 7-8 s instead of 5).

While lz4 is off, one bulk frame in ``PROBE_EVERY`` is still compressed, so a change in the
data (or the rate) is noticed. Sans-IO: the connection times the encoding and reports it.

On a slow link lz4's high-compression mode (``HC_LEVEL``: the same block format, so the
receiver decodes it as any lz4 frame) packs tighter at a tenth of the speed: on the
benchmark's mixed data 1.75x against 1.52x, at 60 MB/s against 560 (lz4's best, level 12,
reaches 1.82x at 15 MB/s). ``level`` picks the mode that moves more file bytes per second,
min(encode speed, link rate / ratio), from both modes' measured speed and ratio; the
high mode is tried on one compressed frame in ``PROBE_EVERY`` while a rate is known and
it could win, and only one in ``PROBE_EVERY * HOPELESS_PROBES`` while its own encode
speed is below what the fast mode moves: at loopback rates a 2 MiB frame in the high
mode takes ~35 ms against ~3 ms, so probing it every 32 frames cost a first sync ~10%.
Without a cap, while windows show the CPU as the bottleneck, the high mode is neither used
nor probed: a slower encoder can only move less (a cap is a known rate: it decides).
"""

from __future__ import annotations

import collections
from typing import Final

__all__ = ["HC_LEVEL", "HOPELESS_PROBES", "PROBE_EVERY", "RATE_WINDOWS", "CompressionChoice"]

PROBE_EVERY: Final = 32
HC_LEVEL: Final = 3  # lz4 high compression: most of level 12's gain at 4x its speed
HOPELESS_PROBES: Final = 16  # probes of a high mode slower than the fast one moves: rarer
_WEIGHT: Final = 0.25  # of the newest frame in the ratio's moving average
_KEEP: Final = 8  # encode times kept per kind
WINDOW_FRAMES: Final = 16  # bulk frames per observation of the link
RATE_WINDOWS: Final = 4  # the link's rate: the best of this many recent windows
_LINK_BOUND: Final = 0.5  # share of a window's time spent waiting to drain: link-bound
_NEVER_WAITED: Final = 0.05  # at most this share waiting ...
_CPU_SHARE: Final = 0.25  # ... and at least this share encoding: CPU-bound
_MIN_EXTRA_SHARE: Final = 0.5  # of lz4's encode time: its least cost beyond a raw frame's
# the ratio once every recent compressed frame was sent raw (about 25 in a row)
_NO_GAIN: Final = 0.999


class CompressionChoice:
    """See the module docstring."""

    def __init__(self) -> None:
        self.ratio: float | None = None  # wire / raw of compressed frames
        # encode seconds per raw byte of the last frames, compressed and raw
        self._lz4: collections.deque[float] = collections.deque(maxlen=_KEEP)
        self._raw: collections.deque[float] = collections.deque(maxlen=_KEEP)
        self._skipped = 0
        self.skipping = False  # the last ``use`` said no
        self.hc_ratio: float | None = None  # as ``ratio``, of frames in the high mode
        self._hc: collections.deque[float] = collections.deque(maxlen=_KEEP)
        self._since_hc = 0  # compressed frames since the high mode was last tried
        # the link as measured (see the module docstring): its rate in bytes/s once a
        # window was link-bound; cpu_bound while windows show the link waiting for us
        self._link_rates: collections.deque[float] = collections.deque(maxlen=RATE_WINDOWS)
        self.cpu_bound = False
        self._frames = 0  # in the window being observed, and their ...
        self._seconds = [0.0, 0.0, 0.0]  # ... encode, drain wait, between; and wire bytes
        self._wire = 0

    @property
    def link_rate(self) -> float | None:
        """The link's rate in bytes/s as measured (None: not yet), see the module docstring."""
        return max(self._link_rates) if self._link_rates else None

    @property
    def lz4_cost(self) -> float | None:
        """Encode seconds per raw byte of a compressed frame (None: none seen yet)."""
        return min(self._lz4) if self._lz4 else None

    @property
    def raw_cost(self) -> float:
        return min(self._raw) if self._raw else 0.0

    def observe(
        self, raw: int, wire: int, seconds: float, compressed: bool, level: int = 0
    ) -> None:
        """A bulk frame of ``raw`` payload bytes was encoded in ``seconds``; ``compressed``:
        lz4 ran over the payload (whether or not its result was kept: ``wire`` is what
        went), at ``level`` (0: the fast mode). A frame whose samples said lz4 would not
        pay is a raw frame here: its few microseconds taken for lz4's cost made either
        mode look free (the least of the last costs is the one used)."""
        if raw <= 0 or seconds < 0:
            return
        if compressed and level > 0:
            ratio = min(1.0, wire / raw)
            self.hc_ratio = (
                ratio
                if self.hc_ratio is None
                else self.hc_ratio + _WEIGHT * (ratio - self.hc_ratio)
            )
            self._hc.append(seconds / raw)
        elif compressed:
            ratio = min(1.0, wire / raw)
            self.ratio = (
                ratio if self.ratio is None else self.ratio + _WEIGHT * (ratio - self.ratio)
            )
            self._lz4.append(seconds / raw)
        else:
            self._raw.append(seconds / raw)

    def observe_send(self, wire: int, encode: float, waited: float, between: float) -> None:
        """A bulk frame of ``wire`` bytes went: ``encode`` seconds encoding it, ``waited``
        seconds for the transport to drain after it, ``between`` seconds since the
        previous frame's send ended."""
        seconds = self._seconds
        for i, value in enumerate((encode, waited, between)):
            seconds[i] += max(0.0, value)
        self._frames += 1
        self._wire += wire
        if self._frames < WINDOW_FRAMES:
            return
        (encoding, waiting, gaps), nbytes = seconds, self._wire
        self._frames, self._seconds, self._wire = 0, [0.0, 0.0, 0.0], 0
        total = encoding + waiting + gaps
        if total <= 0:
            return
        if waiting / total >= _LINK_BOUND:
            self._link_rates.append(nbytes / total)
            self.cpu_bound = False
        elif waiting / total <= _NEVER_WAITED and encoding / total >= _CPU_SHARE:
            self.cpu_bound = True
            if self._link_rates:  # it carries at least this: a lower bound, kept as a window
                self._link_rates.append(nbytes / total)

    def _rate(self, cap: float | None) -> float | None:
        """The rate to judge lz4 by: the cap, else the link's measured rate."""
        return cap if cap is not None else self.link_rate

    def pays(self, rate: float | None) -> bool:
        """Whether lz4 saves more wire time than it costs at ``rate`` (bytes/s; None:
        unknown, 0: paused)."""
        lz4_cost = self.lz4_cost
        if rate is None and self.link_rate is None and self.cpu_bound:
            return False  # the link takes all we make: lz4 would only slow us down
        if self.ratio is not None and self.ratio >= _NO_GAIN:
            # every recent frame went raw after lz4 ran (it saved under the 10% a frame
            # needs): it costs the CPU whatever the rate, and saves no wire time at all
            return False
        rate = self._rate(rate)
        if not rate or self.ratio is None or lz4_cost is None:
            return True
        # lz4 does all a raw frame's work and more, so it never costs less than half its
        # own encode time extra; a raw frame measured while the process was descheduled
        # would otherwise make lz4 look free for good (raw is not measured while on)
        extra = max(lz4_cost - self.raw_cost, lz4_cost * _MIN_EXTRA_SHARE)
        return (1.0 - self.ratio) / rate > extra

    def level(self, rate: float | None) -> int:
        """The lz4 level for a frame ``use`` said to compress: 0 (fast) or ``HC_LEVEL``.

        Only with a known rate (a cap, or the link measured): the faster mode in file
        bytes per second; the mode not in use is tried once every ``PROBE_EVERY`` frames
        (and the high one until it has been measured)."""
        if rate is None and self.cpu_bound:
            return 0  # no cap, and the link takes all we make: a slower encoder moves less
        rate = self._rate(rate)
        fast_cost = self.lz4_cost
        if not rate or self.ratio is None or fast_cost is None:
            return 0
        hc_cost = min(self._hc) if self._hc else None
        if self.hc_ratio is None or hc_cost is None:
            return HC_LEVEL  # not measured yet
        fast = min(1.0 / max(fast_cost, 1e-12), rate / max(self.ratio, 1e-3))
        high = min(1.0 / max(hc_cost, 1e-12), rate / max(self.hc_ratio, 1e-3))
        best = HC_LEVEL if high > fast else 0
        self._since_hc += 1
        # the high mode cannot win while its own speed is below what the fast one moves
        # (only a change in the data could speed it up): measured again only rarely
        hopeless = not best and 1.0 / max(hc_cost, 1e-12) < fast
        if self._since_hc >= PROBE_EVERY * (HOPELESS_PROBES if hopeless else 1):
            self._since_hc = 0
            return 0 if best else HC_LEVEL  # measure the other one again
        return best

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
