"""Memory bounds: what a peer may announce, judged on the prefix before any allocation.

See docs/PROTOCOL.md, "Memory bounds". A peer that has not said Hello may make us hold a
few KiB; after the handshake a frame is bounded by the credit we granted (Records), the
Manifest part limit or the control-frame limit; buffers go when the stream ends.
"""

from __future__ import annotations

import gc
import struct
import tracemalloc
import weakref
from collections.abc import Iterator

import msgpack
import pytest

from replicator.transport import (
    PROTOCOL_VERSION,
    Ack,
    ConnectionClosed,
    Credit,
    Error,
    Goodbye,
    Hello,
    LocalProtocolError,
    Manifest,
    ManifestRequest,
    Message,
    MessageError,
    MessageType,
    Ping,
    ProtocolConnection,
    Records,
    Refuse,
    RemoteProtocolError,
    Role,
    State,
    VersionMismatchError,
    VolumeInfo,
    Welcome,
    frames,
    protocol,
)
from replicator.transport.frames import (
    MAX_BULK_HEADER,
    MAX_CONTROL_FRAME,
    MAX_HELLO_FRAME,
    PREFIX_SIZE,
    FrameDecoder,
    detached,
    encode_frame,
)
from replicator.transport.messages import (
    MAX_CAPABILITIES,
    MAX_JOB_NAME,
    MAX_SESSION,
    MAX_TEXT,
    MAX_TOKEN,
    MAX_VOLUME_NAME,
    MAX_VOLUMES,
    REFUSE_CODES,
)
from replicator.transport.protocol import MAX_MANIFEST_PART

from .helpers import HELLO, pack_records, random_records, raw_frame, welcome, zero_records

KIB = 1024
MIB = 1024 * KIB
SESSION_STAGING = 132 * KIB  # the most an established session's staging buffer keeps
U64 = 2**64 - 1
WIDE = "\U0001f600"  # printable, 4 bytes of UTF-8: the widest text per character


def prefix(mtype: int, header_len: int = 0, payload: int = 0) -> bytes:
    """A frame prefix announcing a body it never sends (the checksum is never reached)."""
    return struct.pack(
        "<4sBBBBIII16s", b"RPLW", 1, mtype, 0, 0, header_len, payload, payload, bytes(16)
    )


def established(window: int = 1 * MIB) -> tuple[ProtocolConnection, ProtocolConnection]:
    sender, receiver = ProtocolConnection(Role.SENDER), ProtocolConnection(Role.RECEIVER)
    receiver.receive_data(b"".join(sender.send(HELLO)))
    assert receiver.next_event() == HELLO
    sender.receive_data(b"".join(receiver.send(welcome(window))))
    assert isinstance(sender.next_event(), Welcome)
    return sender, receiver


def frame_bytes(conn: ProtocolConnection, msg: Records | Manifest | Ping) -> bytes:
    return b"".join(conn.encode(msg).buffers)


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Objects must go by reference counting alone (no cycle left for the GC)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# --- the bounds fit the largest messages we can build ---------------------------------------


def worst_hello(volumes: int, version: int = 0xFFFF) -> Hello:
    return Hello(
        version,
        "j" * MAX_JOB_NAME,
        tuple(
            VolumeInfo(f"{i:03d}" + "v" * (MAX_VOLUME_NAME - 3), U64, "disk")
            for i in range(volumes)
        ),
        tuple(f"{i:02d}" + "c" * (MAX_TOKEN - 2) for i in range(MAX_CAPABILITIES)),
        U64,
        "s" * MAX_SESSION,
    )


def test_the_largest_hello_fits_the_hello_limit() -> None:
    size = encode_frame(worst_hello(MAX_VOLUMES)).wire_size
    print(f"largest Hello: {size} bytes ({MAX_VOLUMES} volumes); limit {MAX_HELLO_FRAME}")
    assert size <= MAX_HELLO_FRAME
    with pytest.raises(MessageError, match="volumes; max"):
        worst_hello(MAX_VOLUMES + 1)


def test_the_largest_control_frames_fit_the_control_limit() -> None:
    caps = tuple(f"{i:02d}" + "c" * (MAX_TOKEN - 2) for i in range(MAX_CAPABILITIES))
    text = WIDE * (MAX_TEXT + 10)  # cut to MAX_TEXT characters by the constructors
    largest: list[Message] = [
        Error("e" * MAX_TOKEN, text),
        Refuse(max(REFUSE_CODES, key=len), text),
        Goodbye(text),
        Welcome(0xFFFF, U64, U64, 2**63 - 1, caps, U64),
        ManifestRequest(U64, "v" * MAX_VOLUME_NAME, 1 << 30, True),
        Ack(U64, U64),
        Credit(2**63 - 1),
        Ping(U64, -(2**63)),
    ]
    sizes = {type(m).__name__: encode_frame(m).wire_size for m in largest}
    print(f"largest control frames: {sizes}; limit {MAX_CONTROL_FRAME}")
    assert max(sizes.values()) <= MAX_CONTROL_FRAME


def test_the_largest_bulk_headers_fit_the_bulk_header_limit() -> None:
    manifest: Manifest = Manifest(U64, "v" * MAX_VOLUME_NAME, True, U64, 512, 2**55, b"", False)
    records: Records = pack_records(2**63, [b"x"])
    object.__setattr__(records, "last_lsn", U64)  # the widest integers msgpack can carry
    object.__setattr__(records, "count", U64)
    object.__setattr__(records, "source_ts_ns", -(2**63))
    bulk: list[Message] = [manifest, records]
    sizes = {
        type(msg).__name__: len(encode_frame(msg, compress=False).buffers[0]) - PREFIX_SIZE
        for msg in bulk
    }
    print(f"largest bulk headers: {sizes}; limit {MAX_BULK_HEADER}")
    assert max(sizes.values()) <= MAX_BULK_HEADER


# --- before the handshake -------------------------------------------------------------------


@pytest.mark.parametrize("mtype", [MessageType.HELLO, MessageType.RECORDS, MessageType.PING])
def test_a_64_mib_announcement_before_hello_allocates_nothing(mtype: MessageType) -> None:
    tracemalloc.start()
    try:
        receiver = ProtocolConnection(Role.RECEIVER)
        tracemalloc.reset_peak()
        receiver.receive_data(prefix(mtype, payload=64 * MIB))
        assert receiver.ready
        with pytest.raises(RemoteProtocolError) as info:
            receiver.next_event()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * KIB, f"{peak} bytes allocated for a refused announcement"
    assert receiver.state is State.ERROR
    assert receiver.buffer_bytes == 0  # and the staging buffer went with the error
    if mtype is MessageType.HELLO:
        assert "Hello frame with a 0-byte header and a 67108864-byte payload" in str(info.value)
        assert f"the {MAX_HELLO_FRAME}-byte Hello limit allows at most" in str(info.value)
    else:
        assert "out of turn (our state: START)" in str(info.value)


def test_an_oversize_hello_is_a_clean_protocol_error() -> None:
    volumes = [(f"{i:04d}" + "v" * 96, 1, "disk") for i in range(1000)]
    header = msgpack.packb([PROTOCOL_VERSION, "job", volumes, [], 0, "s"])
    assert len(header) > MAX_HELLO_FRAME
    receiver = ProtocolConnection(Role.RECEIVER)
    receiver.receive_data(raw_frame(MessageType.HELLO, header))
    with pytest.raises(RemoteProtocolError, match=f"a {len(header)}-byte header"):
        receiver.next_event()
    # and the receiver may still answer it, as it answers any bad Hello
    assert receiver.send(Error("protocol", "Hello too big"))


def test_a_stranger_makes_the_staging_buffer_grow_only_with_what_it_sends() -> None:
    hello = worst_hello(MAX_VOLUMES, PROTOCOL_VERSION)
    data = b"".join(encode_frame(hello).buffers)
    receiver = ProtocolConnection(Role.RECEIVER)
    assert receiver.buffer_bytes == 4 * KIB
    received = 0
    while received < len(data):
        room = receiver.get_buffer(1 << 20)  # the socket would read as much as offered
        n = min(len(room), len(data) - received, 1000)
        room[:n] = data[received : received + n]
        room.release()
        receiver.buffer_updated(n)
        received += n
        assert receiver.buffer_bytes <= max(4 * KIB, 2 * received + 4 * KIB), received
    assert receiver.next_event() == hello
    assert receiver.buffer_bytes == 4 * KIB  # shrunk back once the Hello was taken


def test_the_sender_accepts_only_control_frames_before_welcome() -> None:
    sender = ProtocolConnection(Role.SENDER)
    sender.send(HELLO)
    sender.receive_data(prefix(MessageType.WELCOME, header_len=MAX_CONTROL_FRAME))
    with pytest.raises(RemoteProtocolError, match="control-frame limit allows"):
        sender.next_event()


def test_our_sender_never_sends_a_hello_beyond_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # the constructors cannot build one (see above); if a field grew, send() would refuse
    monkeypatch.setattr(protocol, "MAX_HELLO_FRAME", 1000)
    sender = ProtocolConnection(Role.SENDER)
    with pytest.raises(LocalProtocolError, match=r"Hello header of \d+ bytes exceeds"):
        sender.send(worst_hello(1, PROTOCOL_VERSION))
    assert sender.state is State.ERROR


# --- after the handshake --------------------------------------------------------------------


def test_records_beyond_the_credit_are_refused_before_allocation() -> None:
    _, receiver = established(window=8 * MIB)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        receiver.receive_data(prefix(MessageType.RECORDS, header_len=37, payload=8 * MIB + 1))
        with pytest.raises(RemoteProtocolError) as info:
            receiver.next_event()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < SESSION_STAGING + 16 * KIB  # none of the 8 MiB announced
    assert "Records frame with a 37-byte header and a 8388609-byte payload" in str(info.value)
    assert "the credit window allows at most a 8192-byte header and a 8388608-byte" in str(
        info.value
    )


def test_records_within_the_credit_get_an_exact_buffer() -> None:
    sender, receiver = established(window=1 * MIB)
    msg = random_records(1, n=4, size=200 * KIB)  # 800 KiB + record headers
    data = frame_bytes(sender, msg)
    receiver.receive_data(data[: PREFIX_SIZE + 100])
    body = len(data) - PREFIX_SIZE
    assert body <= receiver.buffer_bytes <= body + SESSION_STAGING
    receiver.receive_data(data[PREFIX_SIZE + 100 :])
    assert receiver.next_event() == msg


def test_credit_is_judged_after_the_frames_before_it() -> None:
    sender, receiver = established(window=300 * KIB)
    first, second = random_records(1, n=1, size=200 * KIB), random_records(2, n=1, size=100 * KIB)
    # the second frame alone fits the window but not what the first one leaves
    receiver.receive_data(frame_bytes(sender, first) + frame_bytes(sender, second))
    assert receiver.next_event() == first
    with pytest.raises(RemoteProtocolError, match="credit window"):
        receiver.next_event()


def test_frames_behind_the_one_that_allows_them_are_accepted() -> None:
    # Welcome, Credit and Records in one read: each prefix is judged after the frame before
    sender = ProtocolConnection(Role.SENDER)
    receiver = ProtocolConnection(Role.RECEIVER)
    receiver.receive_data(b"".join(sender.send(HELLO)))
    receiver.next_event()
    burst = b"".join(receiver.send(welcome(0)) + receiver.send(Credit(300 * KIB)))
    sender.receive_data(burst)
    assert isinstance(sender.next_event(), Welcome)
    assert sender.next_event() == Credit(300 * KIB)
    msg = random_records(1, n=1, size=200 * KIB)
    receiver.receive_data(b"".join(sender.send(msg)))
    assert receiver.next_event() == msg


def test_a_control_frame_beyond_its_limit_is_refused() -> None:
    _, receiver = established()
    receiver.receive_data(prefix(MessageType.PING, header_len=1 * MIB))
    with pytest.raises(RemoteProtocolError, match="a 1048576-byte header"):
        receiver.next_event()


def test_manifests_are_bounded_and_expected() -> None:
    sender, receiver = established()
    # no request outstanding: refused on the prefix
    sender.receive_data(prefix(MessageType.MANIFEST, header_len=20, payload=16))
    with pytest.raises(RemoteProtocolError, match="not outstanding"):
        sender.next_event()

    sender, receiver = established()
    receiver.receive_data(b"".join(sender.send(ManifestRequest(1, "d", 512, True))))
    receiver.next_event()
    sender.receive_data(prefix(MessageType.MANIFEST, header_len=20, payload=MAX_MANIFEST_PART + 16))
    with pytest.raises(RemoteProtocolError, match="the Manifest part limit allows"):
        sender.next_event()
    # and our receiver never builds such a part
    too_many = (MAX_MANIFEST_PART + 16) // 16
    part = Manifest(1, "d", True, too_many * 512, 512, 0, bytes(too_many * 16), True)
    with pytest.raises(LocalProtocolError, match="Manifest part of"):
        receiver.send(part)


# --- buffers go when the stream ends --------------------------------------------------------


def test_a_frame_cut_short_by_eof_releases_its_buffer_at_once() -> None:
    sender, receiver = established(window=4 * MIB)
    data = frame_bytes(sender, random_records(1, n=1, size=2 * MIB))
    receiver.receive_data(data[: 1 * MIB])
    assert receiver.buffer_bytes > 2 * MIB
    receiver.receive_data(b"")  # EOF
    assert receiver.buffer_bytes == 0
    with pytest.raises(RemoteProtocolError, match="closed in the middle of a frame"):
        receiver.next_event()


def test_the_spare_buffer_goes_at_eof_and_complete_frames_stay_readable() -> None:
    sender, receiver = established(window=8 * MIB)
    big = zero_records(1, n=1, size=2 * MIB)  # lz4: decompressed into bytes of its own
    wire = frame_bytes(sender, big)
    assert len(wire) < MIB
    receiver.receive_data(wire)
    assert receiver.next_event() == big
    assert receiver.buffer_bytes > len(wire) - MIB // 2  # the spare, for the next frame
    receiver.receive_data(b"".join(sender.send(Goodbye("done"))))
    receiver.receive_data(b"")
    assert receiver.buffer_bytes <= SESSION_STAGING  # the spare went; the Goodbye is there
    assert receiver.next_event() == Goodbye("done")
    assert receiver.next_event() == ConnectionClosed(clean=True)
    assert receiver.buffer_bytes == 0


def test_a_large_raw_records_payload_is_handed_over_not_copied() -> None:
    """Its frame's own buffer, exactly sized, becomes the payload (read-only); the decoder
    keeps no reference, so the next large frame never writes into it."""
    sender, receiver = established(window=8 * MIB)
    first, second = random_records(1, n=1, size=2 * MIB), random_records(2, n=1, size=2 * MIB)
    receiver.receive_data(frame_bytes(sender, first))
    got = receiver.next_event()
    assert got == first and isinstance(got, Records)
    payload = got.payload
    assert isinstance(payload, memoryview) and payload.readonly
    assert isinstance(payload.obj, bytearray) and len(payload.obj) - len(payload) < 64
    assert receiver.buffer_bytes <= SESSION_STAGING  # no spare: the payload has it
    receiver.receive_data(frame_bytes(sender, second))
    assert receiver.next_event() == second
    assert bytes(payload) == first.payload and got == first  # untouched by the second


def test_the_staging_buffer_shrinks_after_a_burst() -> None:
    decoder = FrameDecoder(readahead=64 * KIB)
    pings = b"".join(b"".join(encode_frame(Ping(i, i)).buffers) for i in range(20000))
    room = decoder.get_buffer()
    decoder.feed(pings[: len(room)])  # a full read of small frames
    decoder.feed(pings[len(room) :])  # the rest of the burst: the buffer grows to hold it
    assert decoder.allocated > 256 * KIB
    while decoder.next_frame() is not None:
        pass
    assert decoder.allocated == 4 * KIB


def test_connections_go_without_the_cyclic_gc(no_gc: None) -> None:
    # an error raised to the caller keeps its traceback, but the connection does not keep it
    receiver = ProtocolConnection(Role.RECEIVER)
    receiver.receive_data(prefix(MessageType.HELLO, payload=64 * MIB))
    with pytest.raises(RemoteProtocolError):
        receiver.next_event()
    with pytest.raises(RemoteProtocolError):  # raised again, from ERROR
        receiver.next_event()
    ref = weakref.ref(receiver)
    del receiver
    assert ref() is None

    _, receiver = established()
    receiver.receive_data(raw_frame(MessageType.PING, b"\x92\x01\x02"))
    receiver.receive_data(b"")
    assert isinstance(receiver.next_event(), Ping)
    assert receiver.next_event() == ConnectionClosed(clean=False)
    ref = weakref.ref(receiver)
    del receiver
    assert ref() is None


def test_a_detached_error_keeps_class_and_fields() -> None:
    exc = VersionMismatchError(7, 2, "protocol")
    copy = detached(exc)
    assert type(copy) is VersionMismatchError and str(copy) == str(exc)
    assert (copy.peer_version, copy.our_version, copy.what) == (7, 2, "protocol")
    assert copy.__traceback__ is None


def test_the_decoder_on_its_own_still_checks_max_frame() -> None:
    decoder = FrameDecoder(max_frame=1 * MIB)  # no limit: a tool or a fuzzer
    decoder.feed(prefix(MessageType.RECORDS, header_len=37, payload=2 * MIB))
    with pytest.raises(RemoteProtocolError, match="limit is 1048576"):
        decoder.next_frame()
    assert decoder.allocated == 0
    assert frames.MAX_HEADER >= MAX_HELLO_FRAME
