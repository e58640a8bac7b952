"""Records frames whose checksum leaves out the payload (frames.RECORDS_CHECKED).

The flag is sent only to a receiver whose Welcome lists ``records-checked``; such a frame
is whole only once each of its records passed its own checksum (ReceiverCore.records).
Every single-byte corruption must still be caught by one of the two.
"""

from __future__ import annotations

import os

import pytest

from replicator.engine.session_core import ReceiverCore
from replicator.transport import PROTOCOL_VERSION, Records, RemoteProtocolError, Welcome
from replicator.transport.frames import (
    CAP_RECORDS_CHECKED,
    RECORDS_CHECKED,
    Codec,
    FrameDecoder,
    encode_frame,
)
from replicator.transport.protocol import ProtocolConnection, Role

from .helpers import (
    HELLO,
    flipped_frames,
    pack_records,
    payload_start,
    random_records,
    raw_frame,
    zero_records,
)

FLAGS_AT = 7  # the prefix's flags byte


def _frame(msg: Records, *, compress: bool = False) -> bytes:
    return b"".join(encode_frame(msg, compress=compress, records_checked=True).buffers)


def test_a_flagged_frame_leaves_its_payload_out_of_the_frame_checksum() -> None:
    msg = random_records(5, n=3)
    flagged, plain = _frame(msg), b"".join(encode_frame(msg, compress=False).buffers)
    assert flagged[FLAGS_AT] == RECORDS_CHECKED and plain[FLAGS_AT] == 0
    decoder = FrameDecoder()
    decoder.feed(flagged)
    frame = decoder.next_frame()
    assert frame is not None and frame.message == msg
    # the same payload with one record's data replaced still passes the frame check ...
    other = pack_records(5, [os.urandom(4096) for _ in range(3)])
    swapped = flagged[: len(flagged) - len(msg.payload)] + other.payload
    decoder = FrameDecoder()
    decoder.feed(swapped)
    frame = decoder.next_frame()
    assert frame is not None and isinstance(frame.message, Records)
    # ... and is whole only if its records are: these are, with their own checksums
    assert len(ReceiverCore(0).records(frame.message)) == 3


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "lz4"])
def test_every_single_byte_corruption_is_caught_by_the_frame_or_its_records(
    compress: bool,
) -> None:
    msg = zero_records(9, n=2, size=2000) if compress else random_records(9, n=2, size=600)
    data = _frame(msg, compress=compress)
    assert data[6] == (Codec.LZ4 if compress else Codec.RAW)
    payload = payload_start(data)
    caught_by_records = 0
    for pos, flip, decoder in flipped_frames(data):
        try:
            frame = decoder.next_frame()
            if frame is None:  # looks incomplete: an error at EOF
                assert decoder.buffered > 0
                continue
            assert isinstance(frame.message, Records)
            ReceiverCore(0).records(frame.message)
        except RemoteProtocolError:
            caught_by_records += pos >= payload
            continue
        # lz4 has redundant encodings: a flip may decompress to the very same bytes
        assert compress and pos >= payload, f"byte {pos} ^ {flip:#x} undetected"
        assert frame.message == msg, f"byte {pos} ^ {flip:#x} decoded to a wrong message"
    assert caught_by_records > 0


def test_the_flag_is_refused_on_any_other_frame_type() -> None:
    from replicator.transport import MessageType

    frame = raw_frame(MessageType.ACK, b"\x92\x01\x02", flags=RECORDS_CHECKED)
    decoder = FrameDecoder()
    decoder.feed(frame)
    with pytest.raises(RemoteProtocolError, match="unknown frame flags 0x1"):
        decoder.next_frame()
    records = random_records(1, n=1)
    assert encode_frame(HELLO, records_checked=True).buffers[0][FLAGS_AT] == 0
    unknown = bytearray(_frame(records))
    unknown[FLAGS_AT] = 0x02
    decoder = FrameDecoder()
    decoder.feed(bytes(unknown))
    with pytest.raises(RemoteProtocolError, match="unknown frame flags 0x2"):
        decoder.next_frame()


@pytest.mark.parametrize("offered", [True, False])
def test_a_sender_flags_records_only_when_the_welcome_allows_it(offered: bool) -> None:
    sender = ProtocolConnection(Role.SENDER)
    receiver = ProtocolConnection(Role.RECEIVER, window=1 << 20)
    receiver.receive_data(b"".join(sender.send(HELLO)))
    receiver.next_event()
    caps = ("lz4", CAP_RECORDS_CHECKED) if offered else ("lz4",)
    sender.receive_data(b"".join(receiver.send(Welcome(PROTOCOL_VERSION, 0, 0, 1 << 20, caps, 7))))
    sender.next_event()
    assert sender.records_checked is offered and not receiver.records_checked
    msg = random_records(1, n=2)
    wire = b"".join(sender.send(msg))
    assert wire[FLAGS_AT] == (RECORDS_CHECKED if offered else 0)
    receiver.receive_data(wire)
    assert receiver.next_event() == msg
