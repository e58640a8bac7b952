"""Builders and hypothesis strategies shared by the transport tests."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence

import blake3
from hypothesis import strategies as st

from replicator.journal.records import Record, encode_record
from replicator.transport import (
    PROTOCOL_VERSION,
    Ack,
    Credit,
    Error,
    Goodbye,
    Hello,
    Manifest,
    ManifestRequest,
    Message,
    Ping,
    Pong,
    Records,
    Refuse,
    VolumeInfo,
    Welcome,
)
from replicator.transport.frames import FRAME_MAGIC, FrameDecoder
from replicator.transport.messages import DIGEST_SIZE, REFUSE_CODES


def pack_records(first_lsn: int, datas: Sequence[bytes], volume: str = "disk.img") -> Records:
    """A Records message holding one WRITE record per data blob, LSNs from first_lsn."""
    encoded = [
        encode_record(Record.write(volume, i * 4096, data).with_lsn(first_lsn + i, 1000 + i))
        for i, data in enumerate(datas)
    ]
    return Records(first_lsn, first_lsn + len(datas) - 1, len(datas), 1000, b"".join(encoded))


def random_records(first_lsn: int, n: int = 4, size: int = 4096) -> Records:
    return pack_records(first_lsn, [os.urandom(size) for _ in range(n)])


def zero_records(first_lsn: int, n: int = 4, size: int = 4096) -> Records:
    return pack_records(first_lsn, [bytes(size) for _ in range(n)])


def raw_frame(
    mtype: int,
    header: bytes,
    payload: bytes = b"",
    *,
    codec: int = 0,
    wire: bytes | None = None,
    raw_len: int | None = None,
    version: int = 1,
    flags: int = 0,
    magic: bytes = FRAME_MAGIC,
) -> bytes:
    """A frame built by hand, with a correct checksum over whatever it says."""
    wire = payload if wire is None else wire
    raw_len = len(payload) if raw_len is None else raw_len
    fields = struct.pack(
        "<4sBBBBIII", magic, version, mtype, codec, flags, len(header), len(wire), raw_len
    )
    digest = blake3.blake3(fields + header + payload).digest(16)
    return fields + digest + header + wire


def flipped_frames(data: bytes) -> Iterator[tuple[int, int, FrameDecoder]]:
    """For each byte of the encoded frame ``data`` and each of 0x01, 0x80, 0xFF: the
    position, the flip, and a decoder fed the frame with that byte flipped."""
    for pos in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[pos] ^= flip
            decoder = FrameDecoder()
            decoder.feed(bad)
            yield pos, flip, decoder


def payload_start(data: bytes) -> int:
    """Where the payload of the encoded frame ``data`` begins (wire_len is at byte 12)."""
    (wire_len,) = struct.unpack_from("<I", data, 12)
    return len(data) - int(wire_len)


HELLO = Hello(PROTOCOL_VERSION, "job", (VolumeInfo("disk.img", 1 << 20, "disk"),), (), 7, "s1")


def welcome(window: int = 1 << 20, received: int = 0, applied: int = 0) -> Welcome:
    return Welcome(PROTOCOL_VERSION, received, applied, window, (), 7)


# --- hypothesis strategies --------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
names = st.text(
    st.characters(
        codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp", "Zs", "Cf", "Co", "Cn")
    ),
    min_size=1,
    max_size=24,
)
tokens = st.from_regex(r"[a-z0-9][a-z0-9_.\-]{0,15}", fullmatch=True)
texts = st.text(max_size=64)
capabilities = st.lists(tokens, max_size=4, unique=True).map(tuple)

volume_infos = st.builds(VolumeInfo, names, u64, st.sampled_from(["disk", "file"]))
hellos = st.builds(
    Hello,
    st.just(PROTOCOL_VERSION),
    names,
    st.lists(volume_infos, max_size=4, unique_by=lambda v: v.name).map(tuple),
    capabilities,
    u64,
    names,
)


@st.composite
def lsn_pairs(draw: st.DrawFn) -> tuple[int, int]:
    received = draw(u64)
    return received, draw(st.integers(0, received))


welcomes = st.builds(
    lambda lsns, window, caps, gen: Welcome(PROTOCOL_VERSION, lsns[0], lsns[1], window, caps, gen),
    lsn_pairs(),
    st.integers(0, 2**63 - 1),
    capabilities,
    u64,
)
acks = lsn_pairs().map(lambda p: Ack(*p))

payload_blobs = st.one_of(
    st.binary(max_size=2048),  # small: raw, incompressible-ish
    st.integers(0, 8192).map(bytes),  # zeros: compressible
    st.tuples(st.binary(min_size=1, max_size=16), st.integers(1, 400)).map(lambda t: t[0] * t[1]),
)


@st.composite
def records_messages(draw: st.DrawFn, first_lsn: int | None = None) -> Records:
    first = draw(st.integers(1, 2**40)) if first_lsn is None else first_lsn
    datas = draw(st.lists(payload_blobs, min_size=1, max_size=4))
    return pack_records(first, datas)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    request_id = draw(u64)
    volume = draw(names)
    extent_size = draw(st.sampled_from([512, 4096, 65536]))
    if not draw(st.booleans()):
        return Manifest(request_id, volume, False, 0, extent_size, 0, b"", True)
    size = draw(st.integers(0, 64 * extent_size))
    count = -(-size // extent_size)
    first = draw(st.integers(0, count))
    n = draw(st.integers(0, count - first))
    done = first + n == count and draw(st.booleans())
    return Manifest(
        request_id, volume, True, size, extent_size, first, os.urandom(n * DIGEST_SIZE), done
    )


messages: st.SearchStrategy[Message] = st.one_of(
    hellos,
    welcomes,
    st.builds(Refuse, st.sampled_from(sorted(REFUSE_CODES)), texts),
    records_messages(),
    acks,
    st.integers(1, 2**63 - 1).map(Credit),
    st.builds(ManifestRequest, u64, names, st.sampled_from([512, 4096, 1 << 20]), st.booleans()),
    manifests(),
    st.builds(Ping, u64, i64),
    st.builds(Pong, u64, i64),
    st.builds(Goodbye, texts),
    st.builds(Error, tokens, texts),
)
