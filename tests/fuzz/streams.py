"""Byte streams for the frame and protocol fuzzers: valid sessions, frames with a correct
checksum over arbitrary content, and plain garbage (hypothesis strategies)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import lz4.block
import msgpack
from hypothesis import strategies as st

from replicator.transport import (
    Ack,
    Credit,
    Goodbye,
    Manifest,
    ManifestRequest,
    Message,
    MessageType,
    Ping,
    Pong,
)
from replicator.transport.frames import FRAME_MAGIC, FRAME_VERSION, PREFIX_SIZE, encode_frame
from replicator.transport.messages import DIGEST_SIZE
from tests.transport.helpers import HELLO, messages, pack_records, raw_frame, welcome


def frame_bytes(msg: Message, compress: bool = True) -> bytes:
    return b"".join(encode_frame(msg, compress=compress).buffers)


class Session:
    """Frames a peer sends in one legal session, and what our side must do for them.

    ``receiver``: the connection that receives the frames is a receiver. It answers the
    Hello (the first frame) with ``Welcome(window)``; a sender sends Hello before
    anything arrives and ``requests`` (ManifestRequests) as soon as the Welcome arrived,
    so the Manifest parts in the stream are for outstanding requests.
    """

    __slots__ = ("frames", "msgs", "receiver", "requests", "window")

    def __init__(
        self,
        receiver: bool,
        msgs: tuple[Message, ...],
        window: int,
        requests: tuple[ManifestRequest, ...] = (),
    ) -> None:
        self.receiver = receiver
        self.msgs = msgs
        self.window = window
        self.requests = requests
        self.frames = [frame_bytes(m) for m in msgs]

    def __repr__(self) -> str:  # short: hypothesis prints it for a failing example
        role = "receiver" if self.receiver else "sender"
        return f"Session({role}, window={self.window}, msgs={list(self.msgs)!r})"


def announced(frame: bytes) -> int:
    """The frame size its prefix announces (what max_frame is checked against)."""
    header_len, wire_len, raw_len = struct.unpack_from("<III", frame, 8)
    return int(PREFIX_SIZE + header_len + max(wire_len, raw_len))


_small_blobs = st.one_of(
    st.binary(max_size=300),
    st.integers(0, 3000).map(bytes),
    st.tuples(st.binary(min_size=1, max_size=8), st.integers(1, 200)).map(lambda t: t[0] * t[1]),
)


@st.composite
def receiver_sessions(draw: st.DrawFn, big: bool = False) -> Session:
    """Hello, then Records (LSNs increasing), ManifestRequests, Pings, Pongs, maybe Goodbye."""
    window = 4 << 20
    msgs: list[Message] = [HELLO]
    lsn = 0
    rid = 0
    for kind in draw(st.lists(st.sampled_from("rrmpqx"), max_size=6)):
        if kind == "r":
            datas = draw(st.lists(_small_blobs, min_size=1, max_size=3))
            if big and draw(st.booleans()):
                datas.append(bytes(70_000) + b"\1" * draw(st.integers(0, 5000)))
            first = lsn + draw(st.integers(1, 3))
            rec = pack_records(first, datas)
            lsn = rec.last_lsn
            msgs.append(rec)
        elif kind == "m":
            rid += 1
            msgs.append(ManifestRequest(rid, "disk.img", 4096, draw(st.booleans())))
        elif kind == "p":
            msgs.append(Ping(draw(st.integers(0, 2**64 - 1)), 5))
        elif kind == "q":
            msgs.append(Pong(draw(st.integers(0, 2**64 - 1)), 6))
    if draw(st.booleans()):
        msgs.append(Goodbye("done"))
    return Session(True, tuple(msgs), window)


@st.composite
def sender_sessions(draw: st.DrawFn) -> Session:
    """Welcome, then Credits, Acks, Manifest parts for our requests, Pings, maybe Goodbye."""
    window = draw(st.integers(0, 1 << 20))
    resume = draw(st.integers(0, 1000))
    msgs: list[Message] = [welcome(window, resume, resume // 2)]
    requests = (ManifestRequest(1, "disk.img", 4096, False), ManifestRequest(2, "b", 512, True))
    acked = resume // 2
    next_extent: int | None = 0  # of request 1 (8 extents); None once it is done
    missing_sent = False  # request 2 is answered by one "missing volume" part
    for kind in draw(st.lists(st.sampled_from("cakmp"), max_size=6)):
        if kind == "c":
            msgs.append(Credit(draw(st.integers(1, 1 << 30))))
        elif kind == "a":
            acked = draw(st.integers(acked, resume))
            msgs.append(Ack(resume, acked))
        elif kind == "k" and not missing_sent:
            missing_sent = True
            msgs.append(Manifest(2, "b", False, 0, 512, 0, b"", True))
        elif kind == "m" and next_extent is not None:
            first = next_extent
            n = draw(st.integers(0, 8 - first))
            done = first + n == 8 and draw(st.booleans())
            digests = bytes(DIGEST_SIZE * n)
            msgs.append(Manifest(1, "disk.img", True, 8 * 4096, 4096, first, digests, done))
            next_extent = None if done else first + n
        elif kind == "p":
            msgs.append(Ping(draw(st.integers(0, 2**64 - 1)), 5))
    if draw(st.booleans()):
        msgs.append(Goodbye("done"))
    return Session(False, tuple(msgs), window, requests)


# --- frames with a correct checksum over arbitrary content -----------------------------------

_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=16),
    st.binary(max_size=16),
)
msgpack_values: st.SearchStrategy[Any] = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=7),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-5, 5)), inner, max_size=3),
    ),
    max_leaves=16,
)


def _header_of(frame: bytes) -> list[Any]:
    (header_len,) = struct.unpack_from("<I", frame, 8)
    values = msgpack.unpackb(frame[PREFIX_SIZE : PREFIX_SIZE + header_len], raw=False)
    assert isinstance(values, list)
    return values


@st.composite
def near_valid_headers(draw: st.DrawFn) -> tuple[int, bytes, bytes]:
    """(type, header, payload) of a real message with some header fields replaced."""
    msg = draw(messages)
    frame = frame_bytes(msg, compress=False)
    values = _header_of(frame)
    payload = frame[PREFIX_SIZE + len(msgpack.packb(values, use_bin_type=True)) :]
    for _ in range(draw(st.integers(1, 2))):
        how = draw(st.sampled_from(["replace", "drop", "add", "nest"]))
        i = draw(st.integers(0, max(0, len(values) - 1)))
        if how == "replace" and values:
            values[i] = draw(msgpack_values)
        elif how == "drop" and values:
            del values[i]
        elif how == "add":
            values.insert(i, draw(msgpack_values))
        elif values and isinstance(values[i], list) and values[i]:
            inner = list(values[i])
            inner[draw(st.integers(0, len(inner) - 1))] = draw(msgpack_values)
            values[i] = inner
    mtype = int(encode_frame(msg).buffers[0][5])
    if draw(st.integers(0, 4)) == 0:
        mtype = draw(st.sampled_from(list(MessageType)))
    if draw(st.integers(0, 3)) == 0:
        payload = draw(st.binary(max_size=200))
    return mtype, msgpack.packb(values, use_bin_type=True), payload


@st.composite
def checked_frames(draw: st.DrawFn) -> bytes:
    """A frame whose checksum matches whatever it says (so the body is really parsed)."""
    mtype, header, payload = draw(
        st.one_of(
            near_valid_headers(),
            st.tuples(
                st.integers(0, 14),
                st.one_of(
                    st.binary(max_size=64),
                    msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
                ),
                st.one_of(st.binary(max_size=200), _small_blobs),
            ),
        )
    )
    kind = draw(st.sampled_from(["raw", "raw", "lz4", "lz4-garbage", "lz4-short", "lengths"]))
    if kind == "lz4" and payload:
        return raw_frame(mtype, header, payload, codec=1, wire=lz4_of(payload))
    if kind == "lz4-garbage":
        wire = draw(st.binary(min_size=1, max_size=64))
        return raw_frame(mtype, header, payload, codec=1, wire=wire, raw_len=max(1, len(payload)))
    if kind == "lz4-short" and payload:  # a real block that decompresses to fewer bytes
        wire = lz4_of(payload)
        return raw_frame(mtype, header, payload, codec=1, wire=wire, raw_len=len(payload) + 1)
    if kind == "lengths":
        raw_len = draw(st.integers(0, 2 * len(payload) + 2))
        codec = draw(st.integers(0, 3))
        return raw_frame(mtype, header, payload, codec=codec, raw_len=raw_len)
    return raw_frame(mtype, header, payload)


def lz4_of(payload: bytes) -> bytes:
    return bytes(lz4.block.compress(payload, store_size=False))


@st.composite
def prefixes(draw: st.DrawFn) -> bytes:
    """A plausible prefix (sometimes with odd fields) and a random checksum and body."""
    magic = draw(
        st.sampled_from([FRAME_MAGIC, FRAME_MAGIC, FRAME_MAGIC, b"RPLX", b"\x16\x03\x01\x00"])
    )
    version = draw(st.sampled_from([FRAME_VERSION, FRAME_VERSION, FRAME_VERSION, 0, 2, 255]))
    mtype = draw(st.integers(0, 14))
    codec = draw(st.sampled_from([0, 0, 1, 2]))
    flags = draw(st.sampled_from([0, 0, 0, 1, 128]))
    lengths = st.one_of(
        st.integers(0, 64), st.sampled_from([65_535, 65_536, 65_537, 2**20, 2**31, 2**32 - 1])
    )
    header_len, wire_len = draw(lengths), draw(lengths)
    raw_len = wire_len if draw(st.booleans()) else draw(lengths)
    fields = struct.pack(
        "<4sBBBBIII", magic, version, mtype, codec, flags, header_len, wire_len, raw_len
    )
    return fields + draw(st.binary(min_size=16, max_size=16)) + draw(st.binary(max_size=80))


def valid_frames(big: bool = False) -> st.SearchStrategy[bytes]:
    frames = st.builds(frame_bytes, messages, st.booleans())
    if not big:
        return frames
    sizes = st.integers(60_000, 200_000)
    bulky = st.builds(
        lambda n, c: frame_bytes(pack_records(1, [bytes(n)]), c), sizes, st.booleans()
    )
    return st.one_of(frames, bulky)


def pieces(big: bool = False) -> st.SearchStrategy[bytes]:
    """One piece of a hostile stream."""
    return st.one_of(
        st.binary(max_size=64),
        st.binary(max_size=5).map(lambda b: FRAME_MAGIC + b),
        prefixes(),
        checked_frames(),
        valid_frames(big),
    )


def hostile_streams(big: bool = False) -> st.SearchStrategy[bytes]:
    return st.lists(pieces(big), min_size=1, max_size=4).map(b"".join)


def ends(frames: Sequence[bytes]) -> list[int]:
    """Offsets where each frame of a concatenated stream ends."""
    out: list[int] = []
    pos = 0
    for f in frames:
        pos += len(f)
        out.append(pos)
    return out
