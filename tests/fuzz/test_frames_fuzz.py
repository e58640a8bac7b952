"""Fuzzing the frame decoder and a ProtocolConnection with hostile and corrupted bytes.

Allowed outcomes only: valid messages, NEED_DATA / None, ConnectionClosed, and
RemoteProtocolError (VersionMismatchError is one); after an error every later call
raises the same class; the outcome never depends on how the bytes were split, nor on
which input path (``feed``/``receive_data`` or ``get_buffer``/``buffer_updated``)
carried them; ``ready()``/``ready`` tell the truth about what the next call returns;
memory stays bounded; and a corrupted frame never decodes into another message (the
checksum covers the prefix fields, the header and the payload as decompressed: only a
change inside an lz4 payload that decompresses to the same bytes goes through, and
then the message is the original one).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st

from replicator.transport import (
    NEED_DATA,
    ConnectionClosed,
    Goodbye,
    Hello,
    Message,
    Ping,
    ProtocolConnection,
    RemoteProtocolError,
    Role,
    State,
    Welcome,
)
from replicator.transport.frames import (
    DEFAULT_MAX_FRAME,
    MAX_HELLO_FRAME,
    MIN_MAX_FRAME,
    PREFIX_SIZE,
    READAHEAD,
    FrameDecoder,
    encode_frame,
)
from replicator.transport.messages import MESSAGE_CLASSES, message_type
from replicator.transport.protocol import TRANSITIONS
from tests.fuzz import support
from tests.fuzz.streams import (
    Session,
    announced,
    ends,
    frame_bytes,
    hostile_streams,
    receiver_sessions,
    sender_sessions,
)
from tests.transport.helpers import HELLO, messages, pack_records, welcome

MAX_FRAMES = st.sampled_from([MIN_MAX_FRAME, 256 * 1024, 1 << 20, DEFAULT_MAX_FRAME])
SEEDS = support.SEEDS
MESSAGE_TYPES = tuple(MESSAGE_CLASSES.values())
# What a peer that has not completed the handshake can make a connection hold, at most:
# one Hello-sized frame in a staging buffer that grows by doubling (in whole pages).
STRANGER_BOUND = 2 * MAX_HELLO_FRAME + 8 * 1024
SPARE_MAX = 8 << 20  # a large-frame buffer kept for reuse (frames.py)
STAGING_MAX = 2 * (PREFIX_SIZE + 64 * 1024 + READAHEAD) + 8 * 1024  # small frames, readahead


def check_message(msg: Message) -> None:
    """A decoded message is a real message: it encodes again and decodes to itself."""
    assert isinstance(msg, MESSAGE_TYPES), type(msg)
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode_frame(msg).buffers))
    frame = decoder.next_frame()
    assert frame is not None and frame.message == msg


@dataclass
class Outcome:
    messages: list[Message] = field(default_factory=list)
    error: type[Exception] | None = None
    closed: ConnectionClosed | None = None


# --- the bare decoder -------------------------------------------------------------------------


class DecoderRun:
    """Feeds a FrameDecoder and checks its contract after every call."""

    def __init__(self, max_frame: int) -> None:
        self.decoder = FrameDecoder(max_frame)
        self.max_frame = max_frame
        self.out = Outcome()

    def drain(self) -> None:
        """Collect frames; ``ready()`` must say whether next_frame() has something."""
        decoder = self.decoder
        while True:
            ready = decoder.ready()
            try:
                frame = decoder.next_frame()
            except RemoteProtocolError as exc:
                if self.out.error is None:
                    self.out.error = type(exc)
                assert type(exc) is self.out.error, "a later call raised another error class"
                assert ready, "next_frame() raised, but ready() was False"
                assert decoder.ready() and not decoder.has_partial()
                return
            if frame is None:
                assert not ready, "ready() was True, but next_frame() had nothing"
                # what is held is part of a frame: an error if the stream ends now
                assert decoder.has_partial() is (decoder.buffered > 0)
                return
            assert ready, "next_frame() returned a frame, but ready() was False"
            assert self.out.error is None, "a message after an error"
            check_message(frame.message)
            self.out.messages.append(frame.message)

    def check_memory(self, bound: int | None = None) -> None:
        """At most one frame is held (``bound``: more when ``feed`` took a larger chunk,
        which it copies whole before anything is collected)."""
        buffered = self.decoder.buffered
        bound = self.max_frame + PREFIX_SIZE if bound is None else bound
        assert buffered <= bound, (buffered, bound, self.max_frame)
        if self.out.error is not None:
            assert buffered == 0 and self.decoder.allocated == 0

    def push(self, chunk: bytes, rnd: random.Random) -> None:
        if rnd.random() < 0.5:
            held = self.decoder.buffered
            self.decoder.feed(chunk)
            self.check_memory(max(self.max_frame + PREFIX_SIZE, held + len(chunk)))
            self.drain()
        else:  # the BufferedProtocol path; the adapter collects a frame once one is ready
            pos = 0
            while pos < len(chunk):
                room = self.decoder.get_buffer(rnd.choice([-1, 1, 4096, 1 << 20]))
                assert len(room) > 0
                n = min(len(room), len(chunk) - pos, rnd.choice([1, 7, 100, 1 << 30]))
                room[:n] = chunk[pos : pos + n]
                room.release()
                self.decoder.buffer_updated(n)
                pos += n
                self.check_memory()
                if self.decoder.ready():
                    self.drain()
            self.drain()
        if self.out.error is None:  # what is left is one frame short of complete
            assert self.decoder.buffered < self.max_frame

    def finish(self) -> Outcome:
        self.decoder.eof()
        self.drain()
        if self.out.error is None:
            assert self.decoder.buffered == 0
            assert self.decoder.next_frame() is None
        else:  # dead for good: input is dropped, every call raises the same class
            self.decoder.feed(b"RPLW\x01more")
            room = self.decoder.get_buffer(-1)
            room[:1] = b"x"
            room.release()
            self.decoder.buffer_updated(1)
            for _ in range(2):
                with pytest.raises(RemoteProtocolError) as info:
                    self.decoder.next_frame()
                assert type(info.value) is self.out.error
        return self.out


def decode_at_once(stream: bytes, max_frame: int) -> Outcome:
    run = DecoderRun(max_frame)
    run.decoder.feed(stream)
    return run.finish()


def decode_in_pieces(stream: bytes, max_frame: int, seed: int) -> Outcome:
    rnd = random.Random(seed)
    run = DecoderRun(max_frame)
    for chunk in support.splits(rnd, stream):
        run.push(chunk, rnd)
    return run.finish()


def arbitrary_bytes_into_decoder(stream: bytes, max_frame: int, seed: int) -> None:
    support.tick()
    whole = decode_at_once(stream, max_frame)
    pieces = decode_in_pieces(stream, max_frame, seed)
    assert pieces == whole, "the outcome depends on how the bytes were split"


@pytest.mark.parametrize("prof", support.profiles(400, 14_000))
def test_arbitrary_bytes_into_decoder(prof: settings) -> None:
    support.run(prof, arbitrary_bytes_into_decoder, hostile_streams(big=True), MAX_FRAMES, SEEDS)


# --- a ProtocolConnection, both roles ------------------------------------------------------


class ConnRun:
    """Drives a ProtocolConnection as its owner would and checks every event."""

    def __init__(self, session: Session, max_frame: int) -> None:
        role = Role.RECEIVER if session.receiver else Role.SENDER
        self.session = session
        self.conn = ProtocolConnection(role, max_frame=max_frame, window=session.window)
        self.max_frame = max_frame
        self.out = Outcome()
        self.eof = False
        if role is Role.SENDER:
            self.conn.send(HELLO)

    def drain(self) -> None:
        conn = self.conn
        while True:
            before = conn.state
            ready = conn.ready
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                if self.out.error is None:
                    self.out.error = type(exc)
                assert type(exc) is self.out.error, "a later call raised another error class"
                assert conn.state is State.ERROR and conn.ready
                assert ready, "next_event() raised, but ready was False"
                return
            assert self.out.error is None, "an event after an error"
            assert ready is (event is not NEED_DATA), (ready, event)
            if event is NEED_DATA:
                assert not self.eof
                return
            if isinstance(event, ConnectionClosed):
                assert self.eof and conn.state is State.CLOSED
                assert self.out.closed in (None, event)
                self.out.closed = event
                return
            assert isinstance(event, Message)
            assert self.out.closed is None
            check_message(event)
            new = TRANSITIONS.get((conn.role, before, "recv", message_type(event)))
            assert new is conn.state, (before, event, conn.state)
            self.out.messages.append(event)
            self.react(event)

    def react(self, msg: Message) -> None:
        """What the engine does: answer a Hello, send requests once welcomed."""
        if isinstance(msg, Hello):
            self.conn.send(welcome(self.session.window))
        elif isinstance(msg, Welcome):
            for req in self.session.requests:
                self.conn.send(req)

    def check_memory(self, in_place: bool) -> None:
        """Reading in place (the decoder offers the room), a connection holds at most one
        frame, a spare buffer for the next large one, and a staging buffer; before the
        handshake, no more than a Hello. (``receive_data`` copies a whole chunk first.)"""
        held = self.conn.buffer_bytes
        if in_place and not self.conn.handshake_received:
            assert held <= STRANGER_BOUND, held
        elif in_place:
            assert held <= self.max_frame + min(self.max_frame, SPARE_MAX) + STAGING_MAX, held

    def push(self, chunk: bytes, rnd: random.Random) -> None:
        conn = self.conn
        if rnd.random() < 0.5:
            conn.receive_data(chunk)
            self.check_memory(False)
        else:
            pos = 0
            while pos < len(chunk):
                room = conn.get_buffer(-1)
                assert len(room) > 0
                n = min(len(room), len(chunk) - pos, rnd.choice([1, 7, 100, 1 << 30]))
                room[:n] = chunk[pos : pos + n]
                room.release()
                conn.buffer_updated(n)
                pos += n
                self.check_memory(True)
                if conn.ready:
                    self.drain()
        self.drain()

    def finish(self) -> Outcome:
        self.conn.receive_data(b"")
        self.eof = True
        self.drain()
        assert self.out.error is not None or self.out.closed is not None
        self.drain()  # again: the same error, or the same ConnectionClosed
        if self.out.error is not None:
            assert self.conn.buffer_bytes == 0
        return self.out


def conn_outcome(session: Session, stream: bytes, max_frame: int, seed: int | None) -> Outcome:
    run = ConnRun(session, max_frame)
    if seed is None:
        if stream:  # b"" would mean EOF
            run.conn.receive_data(stream)
        run.drain()
    else:
        rnd = random.Random(seed)
        for chunk in support.splits(rnd, stream):
            run.push(chunk, rnd)
    return run.finish()


sessions = st.one_of(receiver_sessions(big=True), sender_sessions())


def arbitrary_bytes_into_connection(
    session: Session, keep: int, garbage: bytes, max_frame: int, seed: int
) -> None:
    """A legal session cut after ``keep`` frames, then hostile bytes."""
    support.tick()
    stream = b"".join(session.frames[:keep]) + garbage
    whole = conn_outcome(session, stream, max_frame, None)
    pieces = conn_outcome(session, stream, max_frame, seed)
    assert pieces == whole, "the outcome depends on how the bytes were split"
    legal = list(session.msgs[:keep])
    if keep and max(map(announced, session.frames[:keep])) <= max_frame:
        assert whole.messages[: len(legal)] == legal  # a legal session is never refused


@pytest.mark.parametrize("prof", support.profiles(300, 12_000))
def test_arbitrary_bytes_into_connection(prof: settings) -> None:
    support.run(
        prof,
        arbitrary_bytes_into_connection,
        sessions,
        st.integers(0, 8),
        hostile_streams(big=True),
        MAX_FRAMES,
        SEEDS,
    )


# --- mutations of valid frames -------------------------------------------------------------


def lz4_payload_at(frame: bytes | bytearray) -> int | None:
    """Where an lz4 frame's compressed payload starts (None: the frame is raw)."""
    if frame[6] != 1:
        return None
    (header_len,) = struct.unpack_from("<I", frame, 8)
    return int(PREFIX_SIZE + header_len)


def check_mutated_outcome(
    msgs: Sequence[Message],
    frames: list[bytes],
    mutated: bytes,
    decoded: list[Message],
    failed: bool,
) -> None:
    """What a mutated stream of frames may decode to.

    The frames wholly before the first changed byte are intact and must decode. A frame
    holding a changed byte can decode only to its own message, and only when the change
    is confined to its compressed payload (the checksum covers the payload as
    decompressed, and lz4 can spell the same bytes in more than one way, e.g. a copy
    from another offset inside a run of zeros); a changed prefix or header needs a
    blake3 collision. Frames behind such a benign change decode as usual. Never a
    different message. The stream must fail unless it ends
    exactly after the frames it decoded.
    """
    stream = b"".join(frames)
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(stream, mutated, strict=False)) if a != b),
        min(len(stream), len(mutated)),
    )
    boundaries = ends(frames)
    intact = sum(1 for end in boundaries if end <= first_diff)
    n = len(decoded)
    assert decoded == list(msgs[:n]), "a corrupted frame decoded into another message"
    assert n >= intact, "an intact frame was refused"
    for i in range(intact, n):  # decoded although a byte before its end changed
        start = boundaries[i - 1] if i else 0  # frames before it kept their lengths
        if mutated[start : boundaries[i]] == frames[i]:
            continue  # itself untouched, behind a benign change
        payload_at = lz4_payload_at(frames[i])
        assert payload_at is not None, f"a changed raw frame decoded: {msgs[i]!r}"
        assert mutated[start : start + payload_at] == frames[i][:payload_at]
    assert failed is (len(mutated) != (boundaries[n - 1] if n else 0)), (n, failed)


def mutated_frames_into_decoder(
    msgs: list[Message], compress: bool, data: st.DataObject, seed: int
) -> None:
    support.tick()
    frames = [frame_bytes(m, compress) for m in msgs]
    mutated = data.draw(support.mutations(b"".join(frames)), label="mutated")
    out = decode_in_pieces(mutated, DEFAULT_MAX_FRAME, seed)
    check_mutated_outcome(msgs, frames, mutated, out.messages, out.error is not None)


@pytest.mark.parametrize("prof", support.profiles(400, 20_000))
def test_mutated_frames_into_decoder(prof: settings) -> None:
    support.run(
        prof,
        mutated_frames_into_decoder,
        st.lists(messages, min_size=1, max_size=4),
        st.booleans(),
        st.data(),
        SEEDS,
    )


def mutated_session_into_connection(session: Session, data: st.DataObject, seed: int) -> None:
    support.tick()
    frames = session.frames
    mutated = data.draw(support.mutations(b"".join(frames)), label="mutated")
    out = conn_outcome(session, mutated, DEFAULT_MAX_FRAME, seed)
    check_mutated_outcome(session.msgs, frames, mutated, out.messages, out.error is not None)
    assert (out.error is None) is (out.closed is not None)


@pytest.mark.parametrize("prof", support.profiles(300, 10_000))
def test_mutated_session_into_connection(prof: settings) -> None:
    support.run(prof, mutated_session_into_connection, sessions, st.data(), SEEDS)


# --- every single-bit flip of a frame ---------------------------------------------------------


def every_bit_flip(msg: Message, compress: bool) -> None:
    """No single-bit flip anywhere in a frame gets past the decoder, except one inside
    an lz4 payload that decompresses to the very same bytes (then the message is the
    original one; see check_mutated_outcome)."""
    frame = bytearray(frame_bytes(msg, compress))
    payload_at = lz4_payload_at(frame)
    for pos in range(len(frame)):
        for bit in range(8):
            support.tick()
            frame[pos] ^= 1 << bit
            decoder = FrameDecoder()
            decoder.feed(frame)
            decoder.eof()
            try:
                decoded = decoder.next_frame()
            except RemoteProtocolError:
                pass
            else:
                assert decoded is not None and decoded.message == msg, (pos, bit)
                assert payload_at is not None and pos >= payload_at, (pos, bit)
            frame[pos] ^= 1 << bit


@pytest.mark.parametrize("prof", support.profiles(10, 60))
def test_every_bit_flip_is_caught(prof: settings) -> None:
    # a few hundred bytes per frame, 8 flips per byte: thousands of cases per example
    support.run(
        prof, every_bit_flip, messages.filter(lambda m: len(frame_bytes(m)) < 1500), st.booleans()
    )


# --- found by the fuzzers ---------------------------------------------------------------------


def test_ready_reports_a_bad_frame_behind_a_good_one() -> None:
    """ready() promises "True when next_frame() would return a frame or raise". A good
    frame and a bad one read together: once the good one is collected, the prefix of
    the bad one is first parsed inside ready(), which records the failure and returns
    False; next_frame() then raises."""
    decoder = FrameDecoder()
    decoder.feed(frame_bytes(Ping(1, 2)) + b"\0")  # a frame, then a byte that is no frame
    assert decoder.next_frame() is not None
    assert decoder.ready()  # fails: ready() is False ...
    with pytest.raises(RemoteProtocolError, match="not a replicator peer"):
        decoder.next_frame()  # ... but next_frame() raises


def test_protocol_ready_reports_a_frame_out_of_turn_behind_a_good_one() -> None:
    """The same through ProtocolConnection.ready ("True when next_event() has something
    for the caller (an event or an error)"): a sender's Goodbye and a Ping behind it in
    one read; after the Goodbye nothing may follow, so the Ping is refused on its
    prefix."""
    receiver = ProtocolConnection(Role.RECEIVER)
    receiver.receive_data(frame_bytes(HELLO))
    assert receiver.next_event() == HELLO
    receiver.send(welcome())
    receiver.receive_data(frame_bytes(Goodbye("done")) + frame_bytes(Ping(1, 2)))
    assert receiver.next_event() == Goodbye("done")
    assert receiver.ready  # fails: ready is False ...
    with pytest.raises(RemoteProtocolError, match="out of turn"):
        receiver.next_event()  # ... but next_event() raises


def test_a_large_frame_cut_short_by_eof_is_an_error_even_after_ready() -> None:
    """next_frame() promises to raise on a partial frame after eof(). A small frame and
    the prefix of a large one (body above 64 KiB) arrive, the stream ends, and ready()
    is asked after eof(), as FramedConnection does on eof_received: ready() parses the
    prefix and moves the frame into its own buffer, after eof() had looked for one to
    fail. next_frame() then takes the large-frame branch and returns None for good."""
    large = frame_bytes(pack_records(1, [bytes(100_000)]), compress=False)
    decoder = FrameDecoder()
    decoder.feed(frame_bytes(Ping(1, 2)) + large[:1000])
    decoder.eof()
    assert decoder.next_frame() is not None
    assert decoder.ready() and decoder.has_partial()
    with pytest.raises(RemoteProtocolError, match="in the middle of a frame"):
        decoder.next_frame()  # fails: it returns None


def test_records_cut_short_after_our_goodbye_is_not_a_clean_close() -> None:
    """The same through a receiver that said Goodbye while the sender still sends: a
    Records frame cut short by EOF comes out as ConnectionClosed(clean=True) instead of
    RemoteProtocolError when ``ready`` was asked after EOF (FramedConnection's
    eof_received does exactly that)."""
    large = frame_bytes(pack_records(1, [bytes(100_000)]), compress=False)
    receiver = ProtocolConnection(Role.RECEIVER)
    receiver.receive_data(frame_bytes(HELLO))
    assert receiver.next_event() == HELLO
    receiver.send(welcome(1 << 20))
    receiver.send(Goodbye("done"))
    receiver.receive_data(frame_bytes(Ping(1, 2)) + large[:1000])
    assert receiver.next_event() == Ping(1, 2)
    receiver.receive_data(b"")  # EOF in the middle of the Records frame
    assert receiver.ready
    with pytest.raises(RemoteProtocolError, match="in the middle of a frame"):
        receiver.next_event()  # fails: ConnectionClosed(clean=True)
