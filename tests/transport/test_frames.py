"""Frame codec: round trips, corruption, limits, foreign peers, compression choice."""

from __future__ import annotations

import os
import struct
from typing import Any

import lz4.block
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.transport import (
    Ack,
    Hello,
    Manifest,
    Message,
    MessageType,
    Ping,
    RemoteProtocolError,
    VersionMismatchError,
)
from replicator.transport.frames import (
    FRAME_MAGIC,
    PREFIX_SIZE,
    Codec,
    FrameDecoder,
    LocalProtocolError,
    encode_frame,
)

from .helpers import (
    HELLO,
    flipped_frames,
    messages,
    pack_records,
    payload_start,
    random_records,
    raw_frame,
    zero_records,
)

MIB = 1 << 20


def frame_bytes(msg: Message, **kw: bool) -> bytes:
    return b"".join(encode_frame(msg, **kw).buffers)


def decode_all(data: bytes, max_frame: int = 64 * MIB) -> list[Message]:
    decoder = FrameDecoder(max_frame)
    decoder.feed(data)
    out: list[Message] = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame.message)
    assert decoder.buffered == 0, "trailing bytes"
    return out


@settings(max_examples=300, deadline=None)
@given(messages, st.booleans())
def test_round_trip(msg: Message, compress: bool) -> None:
    assert decode_all(frame_bytes(msg, compress=compress)) == [msg]


@settings(max_examples=50, deadline=None)
@given(st.lists(messages, min_size=1, max_size=8), st.data())
def test_stream_of_frames_in_random_chunks(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(frame_bytes(m) for m in msgs)
    decoder = FrameDecoder()
    out: list[Message] = []
    pos = 0
    while pos < len(stream):
        n = data.draw(st.integers(1, max(1, len(stream) - pos)))
        if data.draw(st.booleans()):
            decoder.feed(stream[pos : pos + n])
        else:  # the BufferedProtocol path: write into the decoder's own buffer
            room = decoder.get_buffer(n)
            n = min(n, len(room))
            room[:n] = stream[pos : pos + n]
            room.release()
            decoder.buffer_updated(n)
        pos += n
        while (frame := decoder.next_frame()) is not None:
            out.append(frame.message)
    assert out == msgs
    assert decoder.buffered == 0


CORRUPTIBLE: dict[str, Message] = {
    "records raw": random_records(1, n=2, size=700),
    "records lz4": zero_records(1, n=2, size=2000),
    "hello": HELLO,
    "manifest": Manifest(3, "disk.img", True, 4 * 4096, 4096, 0, os.urandom(64), True),
    "ack": Ack(10, 4),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIBLE))
def test_every_single_byte_corruption_is_detected(name: str) -> None:
    msg = CORRUPTIBLE[name]
    data = frame_bytes(msg)
    if name == "records lz4":
        assert data[6] == Codec.LZ4
    payload = payload_start(data)
    for pos, flip, decoder in flipped_frames(data):
        try:
            frame = decoder.next_frame()
        except RemoteProtocolError:
            continue
        if frame is None:  # looks incomplete: an error at EOF
            assert decoder.buffered > 0
            continue
        # lz4 has redundant encodings (in a run of zeros any match offset yields
        # zeros): a flip there may still decompress to the very same bytes, which the
        # checksum of the uncompressed payload then proves. Anything else is a bug.
        assert name == "records lz4" and pos >= payload, f"byte {pos} ^ {flip:#x}"
        assert frame.message == msg, f"byte {pos} ^ {flip:#x} decoded to a wrong message"


def test_oversized_frame_is_rejected_from_its_prefix() -> None:
    header = msgpack.packb([1, 2])
    prefix = raw_frame(MessageType.ACK, header)[:PREFIX_SIZE]
    huge = bytearray(prefix)
    struct.pack_into("<II", huge, 12, 2 * MIB, 2 * MIB)  # wire_len, raw_len
    decoder = FrameDecoder(max_frame=1 * MIB)
    decoder.feed(bytes(huge))
    assert decoder.ready()  # the caller is told to come and collect the error
    assert len(decoder.get_buffer()) < 1 * MIB  # and nothing large was allocated
    with pytest.raises(RemoteProtocolError, match="limit is 1048576"):
        decoder.next_frame()
    with pytest.raises(RemoteProtocolError):  # the stream stays failed
        decoder.next_frame()


def test_decompression_is_bounded_by_the_frame_limit() -> None:
    # a small lz4 frame that claims to expand beyond the limit
    bomb = raw_frame(
        MessageType.RECORDS, msgpack.packb([1, 1, 1, 0]), codec=1, wire=b"\x00" * 16, raw_len=MIB
    )
    with pytest.raises(RemoteProtocolError, match="limit"):
        decode_all(bomb, max_frame=256 * 1024)


def test_oversized_header_is_rejected() -> None:
    data = bytearray(raw_frame(MessageType.ACK, msgpack.packb([1, 0])))
    struct.pack_into("<I", data, 8, 3 * MIB)
    with pytest.raises(RemoteProtocolError, match="header"):
        decode_all(bytes(data))


def test_encoder_refuses_frames_above_the_limit() -> None:
    msg = random_records(1, n=1, size=200_000)
    with pytest.raises(LocalProtocolError, match="exceeds the frame limit"):
        encode_frame(msg, max_frame=128 * 1024)


@pytest.mark.parametrize(
    ("start", "hint"),
    [
        (b"G", ""),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "TLS"),
        (b"RPLX" + bytes(40), ""),
    ],
)
def test_foreign_stream_is_not_a_replicator_peer(start: bytes, hint: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(start)
    with pytest.raises(RemoteProtocolError, match=f"not a replicator peer.*{hint}"):
        decoder.next_frame()


def test_other_frame_version_is_a_version_mismatch_from_five_bytes() -> None:
    decoder = FrameDecoder()
    decoder.feed(FRAME_MAGIC + b"\x02")
    with pytest.raises(VersionMismatchError) as info:
        decoder.next_frame()
    assert info.value.peer_version == 2 and info.value.our_version == 1
    assert "protocol version mismatch" in str(info.value)
    whole = raw_frame(MessageType.PING, msgpack.packb([1, 2]), version=7)
    with pytest.raises(VersionMismatchError, match="version 7"):
        decode_all(whole)


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (raw_frame(99, msgpack.packb([])), "unknown message type 99"),
        (raw_frame(MessageType.PING, msgpack.packb([1, 2]), codec=7), "unknown frame codec"),
        (raw_frame(MessageType.PING, msgpack.packb([1, 2]), flags=1), "flags"),
        (raw_frame(MessageType.PING, b"\xc1"), "not msgpack"),
        (raw_frame(MessageType.PING, msgpack.packb([1, 2]) + b"\x00"), "not msgpack"),
        (raw_frame(MessageType.PING, msgpack.packb([1])), "2-field array"),
        (raw_frame(MessageType.PING, msgpack.packb({"nonce": 1})), "2-field array"),
        (raw_frame(MessageType.PING, msgpack.packb([1, 2]), b"x"), "carries a payload"),
        (raw_frame(MessageType.PING, msgpack.packb([1.5, 2])), "invalid Ping"),
        (raw_frame(MessageType.ACK, msgpack.packb([1, 2])), "invalid Ack"),
        (raw_frame(MessageType.ACK, msgpack.packb([-1, 0])), "invalid Ack"),
        (raw_frame(MessageType.HELLO, msgpack.packb([1, "j", [[1]], [], 0, "s"])), "Hello"),
        (raw_frame(MessageType.HELLO, msgpack.packb([1, "j", [], [], 0, b"s"])), "Hello"),
        (raw_frame(MessageType.HELLO, msgpack.packb([1, "j", [], [], 0, "\n"])), "Hello"),
        (raw_frame(MessageType.GOODBYE, msgpack.packb([b"\xff"])), "Goodbye"),
        (
            raw_frame(MessageType.RECORDS, msgpack.packb([1, 1, 1, 0]), b"junk" * 20),
            "invalid Records",
        ),
        (
            raw_frame(
                MessageType.RECORDS,
                msgpack.packb([1, 1, 1, 0]),
                codec=1,
                wire=b"\xff" * 9,
                raw_len=100,
            ),
            "does not decompress",
        ),
        (
            raw_frame(
                MessageType.RECORDS,
                msgpack.packb([1, 1, 1, 0]),
                codec=1,
                wire=lz4.block.compress(b"ab" * 100, store_size=False),
                raw_len=400,
            ),
            "decompress",
        ),
        (raw_frame(MessageType.ACK, msgpack.packb([1, 0]), codec=1, raw_len=0), "empty"),
        (raw_frame(MessageType.ACK, msgpack.packb([1, 0]), wire=b"x", raw_len=0), "raw payload"),
    ],
)
def test_malformed_frames_with_valid_checksums(frame: bytes, error: str) -> None:
    with pytest.raises(RemoteProtocolError, match=error):
        decode_all(frame)


def test_incompressible_payload_is_sent_raw_without_a_copy() -> None:
    msg = random_records(1, n=16, size=64 * 1024)
    frame = encode_frame(msg)
    assert frame.codec is Codec.RAW
    assert frame.buffers[1] is msg.payload
    assert frame.payload_wire == frame.payload_raw == len(msg.payload)


def test_compressible_payload_is_sent_lz4() -> None:
    msg = zero_records(1, n=16, size=64 * 1024)
    frame = encode_frame(msg)
    assert frame.codec is Codec.LZ4
    assert frame.payload_wire * 50 < frame.payload_raw
    assert decode_all(b"".join(frame.buffers)) == [msg]


def test_mixed_payload_is_compressed_when_it_pays() -> None:
    # half random, half zeros: the samples must not talk us out of compressing it
    msg = pack_records(1, [os.urandom(64 * 1024) if i % 2 else bytes(64 * 1024) for i in range(8)])
    frame = encode_frame(msg)
    assert frame.codec is Codec.LZ4
    assert frame.payload_wire < 0.6 * frame.payload_raw


def test_small_or_barely_compressible_payload_goes_raw() -> None:
    small = pack_records(1, [bytes(300)])
    assert len(small.payload) < 512
    assert encode_frame(small).codec is Codec.RAW
    barely = pack_records(1, [os.urandom(3000) + bytes(150)])  # lz4 saves < 10%
    assert encode_frame(barely).codec is Codec.RAW
    assert encode_frame(zero_records(1), compress=False).codec is Codec.RAW


def test_large_payload_lz4_cannot_pay_for_is_never_compressed_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ~5% zeros per 4 KiB: lz4 saves ~4%, short of the 10% it must save (like fio's data)
    def blob() -> bytes:
        return b"".join(os.urandom(3896) + bytes(200) for _ in range(64))

    msg = pack_records(1, [blob() for _ in range(4)])
    sizes: list[int] = []
    real = lz4.block.compress

    def spy(data: Any, **kwargs: Any) -> bytes:
        sizes.append(len(data))
        packed: bytes = real(data, **kwargs)
        return packed

    monkeypatch.setattr(lz4.block, "compress", spy)
    frame = encode_frame(msg)
    assert frame.codec is Codec.RAW
    assert sizes and max(sizes) <= 8 * 1024, sizes  # only the samples were tried


def test_large_frame_is_read_into_its_own_buffer() -> None:
    msg = random_records(1, n=8, size=64 * 1024)
    data = frame_bytes(msg) + frame_bytes(Ping(1, 2))
    decoder = FrameDecoder()
    decoder.feed(data[:1000])
    room = decoder.get_buffer()
    assert len(room) == len(data) - len(frame_bytes(Ping(1, 2))) - 1000  # exactly the rest
    room.release()
    decoder.feed(data[1000:])  # the frame's rest, then a small frame behind it
    first, second = decoder.next_frame(), decoder.next_frame()
    assert first is not None and first.message == msg
    assert second is not None and second.message == Ping(1, 2)
    assert decoder.next_frame() is None


def test_partial_frame_is_reported_as_partial() -> None:
    data = frame_bytes(HELLO)
    decoder = FrameDecoder()
    decoder.feed(data[:-1])
    assert decoder.next_frame() is None
    assert decoder.has_partial() and not decoder.ready()
    decoder.feed(data[-1:])
    frame = decoder.next_frame()
    assert frame is not None and isinstance(frame.message, Hello)
    assert not decoder.has_partial()


def test_a_version_byte_damaged_mid_stream_is_damage_not_another_peer() -> None:
    """Seen in the 1,000-fault soak: one flipped byte in a frame's version field made a
    continuous sender give up with "protocol version mismatch". A stream that already
    spoke our version does not change it: that is a damaged frame (retried), while the
    same byte in the first frame is still reported as another version."""
    first = b"".join(encode_frame(Ping(1, 2)).buffers)
    damaged = bytearray(b"".join(encode_frame(Ping(3, 4)).buffers))
    damaged[4] = 254
    dec = FrameDecoder()
    dec.feed(first + bytes(damaged))
    assert dec.next_frame() is not None
    with pytest.raises(RemoteProtocolError) as caught:
        dec.next_frame()
    assert not isinstance(caught.value, VersionMismatchError)
    assert "damaged frame" in str(caught.value)
    fresh = FrameDecoder()
    fresh.feed(bytes(damaged))
    with pytest.raises(VersionMismatchError):
        fresh.next_frame()


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("compress", [False, True])
def test_a_large_frame_costs_what_arrived_of_it_not_what_was_announced(compress: bool) -> None:
    """An authenticated peer announcing a Records frame of its whole credit and sending a
    few bytes of it used to make the receiver zero the whole buffer at once: 12 such
    sessions took a receiver from 35 to 827 MiB. Now the pages are committed as bytes
    arrive, and a frame that does arrive whole decodes as before."""
    msg = random_records(1, n=40, size=MIB)
    data = frame_bytes(msg, compress=compress)
    assert len(data) > 40 * MIB
    decoders = [FrameDecoder() for _ in range(8)]
    before = _rss()
    for decoder in decoders:
        decoder.feed(data[: 64 * 1024])
        assert decoder.next_frame() is None
    grown = _rss() - before
    assert grown < 16 * MIB, f"8 announced 40 MiB frames cost {grown / MIB:.0f} MiB"
    decoders[0].feed(data[64 * 1024 :])
    frame = decoders[0].next_frame()
    assert frame is not None and frame.message == msg
