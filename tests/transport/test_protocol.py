"""The sans-IO state machine: conversations, turn-taking, credit, LSN and manifest rules."""

from __future__ import annotations

import random

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from replicator.transport import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    ConnectionClosed,
    ConnectionFailedError,
    Credit,
    Error,
    Goodbye,
    Hello,
    LocalProtocolError,
    Manifest,
    ManifestRequest,
    Message,
    MessageType,
    Ping,
    Pong,
    ProtocolConnection,
    Records,
    Refuse,
    RemoteProtocolError,
    Role,
    State,
    VersionMismatchError,
    Welcome,
)
from replicator.transport.frames import encode_frame
from replicator.transport.messages import (
    Handover,
    PointFloor,
    ReadData,
    ReadRequest,
    Tree,
    TreeEntry,
    TreeRequest,
    encode_tree,
)
from replicator.transport.protocol import TRANSITIONS

from .helpers import HELLO, pack_records, random_records, welcome


class Wire:
    """Bytes in flight towards one ProtocolConnection, and the events it produced."""

    def __init__(self, dst: ProtocolConnection) -> None:
        self.dst = dst
        self.pending = bytearray()
        self.events: list[Message] = []

    def push(self, buffers: list[bytes | memoryview]) -> None:
        for buf in buffers:
            self.pending += buf

    def deliver(self, data: st.DataObject | None = None) -> None:
        """Deliver some (a random prefix, with data) or all pending bytes, in random chunks."""
        rnd = random.Random(data.draw(st.integers(0, 2**32)) if data else 0)
        stop = rnd.randint(0, len(self.pending)) if data else len(self.pending)
        while stop > 0:
            n = rnd.randint(1, stop)
            chunk = bytes(self.pending[:n])
            del self.pending[:n]
            stop -= n
            if rnd.random() < 0.5:
                self.dst.receive_data(chunk)
            else:  # BufferedProtocol path
                pos = 0
                while pos < len(chunk):
                    room = self.dst.get_buffer(len(chunk) - pos)
                    k = min(len(room), len(chunk) - pos)
                    room[:k] = chunk[pos : pos + k]
                    room.release()
                    self.dst.buffer_updated(k)
                    pos += k
            self.drain()

    def drain(self) -> None:
        while True:
            event = self.dst.next_event()
            if event is NEED_DATA:
                return
            assert not isinstance(event, ConnectionClosed)
            assert isinstance(event, Message)
            self.events.append(event)


def _blob(rnd: random.Random, size: int, compressible: bool) -> bytes:
    return bytes(size) if compressible else rnd.randbytes(size)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_conversation_in_random_chunks(data: st.DataObject) -> None:
    window = data.draw(st.integers(0, 256 * 1024), label="window")
    sender = ProtocolConnection(Role.SENDER)
    receiver = ProtocolConnection(Role.RECEIVER, window=window)
    to_r, to_s = Wire(receiver), Wire(sender)
    sent_s: list[Message] = []
    sent_r: list[Message] = []
    rnd = random.Random(data.draw(st.integers(0, 2**32), label="seed"))

    def send_s(msg: Message) -> None:
        to_r.push(sender.send(msg))
        sent_s.append(msg)

    def send_r(msg: Message) -> None:
        to_s.push(receiver.send(msg))
        sent_r.append(msg)

    send_s(HELLO)
    to_r.deliver(data)
    to_r.deliver()  # the receiver answers only once it has the Hello
    resume = data.draw(st.integers(0, 1000), label="resume")
    send_r(welcome(window, resume, rnd.randint(0, resume)))
    to_s.deliver(data)
    to_s.deliver()  # the sender needs the Welcome (its credit) before it sends anything
    request_ids = iter(range(1, 1000))
    actions = st.sampled_from(
        ["records", "records", "credit", "ack", "manifest", "ping", "deliver_r", "deliver_s"]
    )
    for _ in range(data.draw(st.integers(0, 25), label="steps")):
        action = data.draw(actions)
        if action == "records":
            sizes = [rnd.choice([10, 600, 5000, 40_000]) for _ in range(rnd.randint(1, 3))]
            first = sender.last_lsn + rnd.randint(1, 3)
            msg = pack_records(first, [_blob(rnd, n, rnd.random() < 0.5) for n in sizes])
            if len(msg.payload) > sender.credit:  # the receiver grants what is missing
                send_r(Credit(len(msg.payload) - sender.credit + rnd.randint(0, 1000)))
                to_s.deliver()
            send_s(msg)
        elif action == "credit":
            send_r(Credit(rnd.randint(1, 100_000)))
        elif action == "ack":
            low_r, low_a = receiver.acked
            received = rnd.randint(low_r, receiver.last_lsn)
            send_r(Ack(received, rnd.randint(low_a, received)))
        elif action == "manifest":
            rid = next(request_ids)
            send_s(ManifestRequest(rid, "disk.img", 4096, rnd.random() < 0.5))
            to_r.deliver()
            size = rnd.randint(0, 20 * 4096)
            count = -(-size // 4096)
            first = 0
            while True:
                n = rnd.randint(0, count - first)
                done = first + n == count and rnd.random() < 0.7
                send_r(
                    Manifest(rid, "disk.img", True, size, 4096, first, rnd.randbytes(16 * n), done)
                )
                first += n
                if done:
                    break
        elif action == "ping":
            nonce = rnd.randint(0, 2**64 - 1)
            if rnd.random() < 0.5:
                send_s(Ping(nonce, 1))
                send_r(Pong(nonce, 1))
            else:
                send_r(Ping(nonce, 2))
                send_s(Pong(nonce, 2))
        elif action == "deliver_r":
            to_r.deliver(data)
        else:
            to_s.deliver(data)
    # a clean close: the sender says Goodbye, the receiver acks what it has, says Goodbye too
    send_s(Goodbye("done"))
    assert sender.state is State.GOODBYE_SENT
    to_r.deliver(data)
    to_r.deliver()
    assert receiver.state is State.GOODBYE_RECEIVED
    send_r(Ack(receiver.last_lsn, receiver.acked[1]))
    send_r(Goodbye("bye"))
    to_s.deliver(data)
    to_s.deliver()
    assert to_r.events == sent_s
    assert to_s.events == sent_r
    for conn in (sender, receiver):
        assert conn.state is State.CLOSED
        conn.receive_data(b"")
        assert conn.next_event() == ConnectionClosed(clean=True)
        assert conn.next_event() == ConnectionClosed(clean=True)
    assert sender.stats.bytes_sent == receiver.stats.bytes_received
    assert sender.stats.payload_sent == receiver.stats.payload_received
    records = [m for m in sent_s if isinstance(m, Records)]
    event(f"records messages: {min(len(records), 5)}+")
    event(f"lz4 used: {sender.stats.payload_sent_wire < sender.stats.payload_sent}")
    event(f"large frame: {any(len(m.payload) > 64 * 1024 for m in records)}")


# --- the transition table, exhaustively ---------------------------------------------------------


def _frame(msg: Message) -> bytes:
    return b"".join(encode_frame(msg).buffers)


def _pair_in(role: Role, state: State) -> ProtocolConnection:
    """A connection of ``role`` driven into ``state`` (with a manifest, a tree and a read
    request pending)."""
    sender = ProtocolConnection(Role.SENDER)
    receiver = ProtocolConnection(Role.RECEIVER, window=1 << 20)
    me = sender if role is Role.SENDER else receiver

    def s_to_r(msg: Message) -> None:
        receiver.receive_data(b"".join(sender.send(msg)))
        assert receiver.next_event() == msg

    def r_to_s(msg: Message) -> None:
        sender.receive_data(b"".join(receiver.send(msg)))
        assert sender.next_event() == msg

    if state is State.START:
        return me
    if state is State.HELLO_SENT:
        sender.send(HELLO)
        return sender
    s_to_r(HELLO)
    if state is State.HELLO_RECEIVED:
        return receiver
    r_to_s(welcome(1 << 20))
    s_to_r(ManifestRequest(1, "disk.img", 4096, False))
    s_to_r(TreeRequest(1))
    s_to_r(ReadRequest(1, "disk.img", 0, 4096))
    if state is State.ESTABLISHED:
        return me
    if state is State.CLOSED:
        s_to_r(Goodbye("x"))
        r_to_s(Goodbye("y"))
        return me
    closing_side, other = (sender, receiver) if role is Role.SENDER else (receiver, sender)
    if state is State.GOODBYE_SENT:
        closing_side.send(Goodbye("x"))
    else:
        me.receive_data(b"".join(other.send(Goodbye("x"))))
        assert me.next_event() == Goodbye("x")
    assert me.state is state
    return me


SAMPLES: dict[MessageType, Message] = {
    MessageType.HELLO: HELLO,
    MessageType.WELCOME: welcome(1 << 20),
    MessageType.REFUSE: Refuse("busy", "no"),
    MessageType.RECORDS: random_records(1, n=1, size=100),
    MessageType.ACK: Ack(0, 0),
    MessageType.CREDIT: Credit(10),
    MessageType.MANIFEST_REQUEST: ManifestRequest(2, "disk.img", 4096, False),
    MessageType.MANIFEST: Manifest(1, "disk.img", False, 0, 4096, 0, b"", True),
    MessageType.PING: Ping(1, 1),
    MessageType.PONG: Pong(1, 1),
    MessageType.GOODBYE: Goodbye("bye"),
    MessageType.ERROR: Error("internal", "oops"),
    MessageType.TREE_REQUEST: TreeRequest(2),
    MessageType.TREE: Tree(1, True, encode_tree([TreeEntry("d.img", "f", 0o644, "")])),
    MessageType.HANDOVER: Handover("request", 0, 0),
    MessageType.READ_REQUEST: ReadRequest(2, "disk.img", 4096, 4096),
    MessageType.READ_DATA: ReadData(1, 0, b"x" * 4096),
    MessageType.POINT_FLOOR: PointFloor(7),
}
REACHABLE = [s for s in State if s is not State.ERROR]
CASES = [
    (role, state, direction, mtype)
    for role in Role
    for state in REACHABLE
    for direction in ("send", "recv")
    for mtype in MessageType
    if (role, state) not in {(Role.SENDER, State.HELLO_RECEIVED), (Role.RECEIVER, State.HELLO_SENT)}
]


@pytest.mark.parametrize(("role", "state", "direction", "mtype"), CASES, ids=str)
def test_transition_table(role: Role, state: State, direction: str, mtype: MessageType) -> None:
    conn = _pair_in(role, state)
    msg = SAMPLES[mtype]
    expected = TRANSITIONS.get((role, state, direction, mtype))  # type: ignore[arg-type]
    if direction == "send":
        if expected is None:
            with pytest.raises(LocalProtocolError, match="cannot send"):
                conn.send(msg)
            assert conn.state is State.ERROR
        else:
            conn.send(msg)
            assert conn.state is expected
    else:
        conn.receive_data(_frame(msg))
        if expected is None:
            with pytest.raises(RemoteProtocolError):
                conn.next_event()
            assert conn.state is State.ERROR
        else:
            assert conn.next_event() == msg
            assert conn.state is expected


def test_every_reachable_state_has_a_way_out() -> None:
    for role in Role:
        for state in (State.START, State.ESTABLISHED, State.GOODBYE_SENT, State.GOODBYE_RECEIVED):
            assert any(k[0] is role and k[1] is state for k in TRANSITIONS), (role, state)


# --- error state ----------------------------------------------------------------------------------


def test_error_state_allows_only_last_words() -> None:
    receiver = _pair_in(Role.RECEIVER, State.ESTABLISHED)
    receiver.receive_data(_frame(Welcome(PROTOCOL_VERSION, 0, 0, 1, (), 0)))
    with pytest.raises(RemoteProtocolError, match="out of turn"):
        receiver.next_event()
    assert receiver.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="out of turn"):
        receiver.next_event()  # stays failed
    with pytest.raises(LocalProtocolError):
        receiver.send(Ping(1, 1))
    assert receiver.send(Error("protocol", "you sent Welcome"))
    assert receiver.state is State.ERROR


def test_a_send_after_a_failure_names_the_failure_as_its_cause() -> None:
    """Another task may send (an Ack) after the reader failed the connection on a bad
    frame: the send is refused, and the error carries the bad frame's error as its cause,
    so the session reports that (a corrupted frame), not a bug of ours."""
    receiver = _pair_in(Role.RECEIVER, State.ESTABLISHED)
    receiver.receive_data(_frame(Welcome(PROTOCOL_VERSION, 0, 0, 1, (), 0)))
    with pytest.raises(RemoteProtocolError, match="out of turn") as failed:
        receiver.next_event()
    with pytest.raises(ConnectionFailedError, match="failed earlier") as refused:
        receiver.send(Ack(0, 0))
    assert isinstance(refused.value, LocalProtocolError)  # still a refused send
    assert type(refused.value.cause) is RemoteProtocolError
    assert str(refused.value.cause) == str(failed.value)
    fresh = _pair_in(Role.RECEIVER, State.ESTABLISHED)
    with pytest.raises(LocalProtocolError) as illegal:
        fresh.send(Welcome(PROTOCOL_VERSION, 0, 0, 1, (), 0))  # our own mistake: no cause
    assert not isinstance(illegal.value, ConnectionFailedError)


def test_version_mismatch_in_hello_can_be_refused() -> None:
    sender = ProtocolConnection(Role.SENDER)
    receiver = ProtocolConnection(Role.RECEIVER)
    future = Hello(PROTOCOL_VERSION + 1, "job", (), (), 0, "s")
    receiver.receive_data(_frame(future))  # a newer sender, bypassing our own send check
    with pytest.raises(VersionMismatchError) as info:
        receiver.next_event()
    assert info.value.peer_version == PROTOCOL_VERSION + 1 and info.value.what == "protocol"
    refusal = Refuse("version", "receiver speaks protocol 1")
    sender.send(HELLO)
    sender.receive_data(b"".join(receiver.send(refusal)))
    assert sender.next_event() == refusal
    assert sender.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        ProtocolConnection(Role.SENDER).send(future)


def test_version_mismatch_in_frame_format_can_be_refused() -> None:
    receiver = ProtocolConnection(Role.RECEIVER)
    receiver.receive_data(b"RPLW\x09" + bytes(60))
    with pytest.raises(VersionMismatchError):
        receiver.next_event()
    assert receiver.send(Refuse("version", "frame format 1 only"))


def test_welcome_from_a_newer_receiver_is_a_version_mismatch() -> None:
    sender = ProtocolConnection(Role.SENDER)
    sender.send(HELLO)
    sender.receive_data(_frame(Welcome(PROTOCOL_VERSION + 1, 0, 0, 10, (), 0)))
    with pytest.raises(VersionMismatchError):
        sender.next_event()


# --- credit -------------------------------------------------------------------------------------


def _established(
    window: int = 10_000, resume: int = 0
) -> tuple[ProtocolConnection, ProtocolConnection]:
    sender = ProtocolConnection(Role.SENDER)
    receiver = ProtocolConnection(Role.RECEIVER, window=window)
    receiver.receive_data(b"".join(sender.send(HELLO)))
    receiver.next_event()
    sender.receive_data(b"".join(receiver.send(welcome(window, resume))))
    sender.next_event()
    return sender, receiver


def test_sender_cannot_exceed_its_credit() -> None:
    sender, receiver = _established(window=5000)
    assert sender.credit == receiver.credit == 5000
    msg = random_records(1, n=1, size=3000)
    receiver.receive_data(b"".join(sender.send(msg)))
    assert receiver.next_event() == msg
    assert sender.credit == receiver.credit == 5000 - len(msg.payload)
    with pytest.raises(LocalProtocolError, match="exceeds the credit"):
        sender.send(random_records(2, n=1, size=3000))
    assert sender.state is State.ERROR


def test_credit_grants_more() -> None:
    sender, receiver = _established(window=0)
    sender.receive_data(b"".join(receiver.send(Credit(4000))))
    assert sender.next_event() == Credit(4000)
    assert sender.credit == receiver.credit == 4000
    receiver.receive_data(b"".join(sender.send(random_records(1, n=1, size=3000))))
    assert isinstance(receiver.next_event(), Records)


def test_receiver_rejects_a_peer_beyond_the_window() -> None:
    _, receiver = _established(window=5000)
    receiver.receive_data(_frame(random_records(1, n=2, size=3000)))  # bypasses the sender
    # refused on its prefix, before the decoder allocates anything for its body
    with pytest.raises(
        RemoteProtocolError, match=r"the credit window allows at most .* a 5000-byte payload"
    ):
        receiver.next_event()
    assert receiver.state is State.ERROR


def test_credit_counts_uncompressed_bytes() -> None:
    sender, receiver = _established(window=70_000)
    msg = pack_records(1, [bytes(60_000)])
    frame = encode_frame(msg)
    assert frame.payload_wire < 1000
    receiver.receive_data(b"".join(sender.send(msg)))
    receiver.next_event()
    assert sender.credit == receiver.credit == 70_000 - len(msg.payload)


# --- LSNs and acks ----------------------------------------------------------------------------


def test_records_lsns_must_increase_across_messages() -> None:
    sender, receiver = _established(window=1 << 20, resume=10)
    with pytest.raises(LocalProtocolError, match="not above 10"):
        _established(window=1 << 20, resume=10)[0].send(random_records(10, n=1))
    receiver.receive_data(b"".join(sender.send(random_records(11, n=2))))
    assert isinstance(receiver.next_event(), Records)
    assert sender.last_lsn == receiver.last_lsn == 12
    receiver.receive_data(_frame(random_records(12, n=1)))
    with pytest.raises(RemoteProtocolError, match="not above 12"):
        receiver.next_event()


def test_acks_must_not_exceed_what_was_sent_nor_go_back() -> None:
    sender, receiver = _established(window=1 << 20, resume=5)
    receiver.receive_data(b"".join(sender.send(random_records(6, n=3))))
    receiver.next_event()
    sender.receive_data(b"".join(receiver.send(Ack(8, 6))))
    assert sender.next_event() == Ack(8, 6)
    assert sender.acked == receiver.acked == (8, 6)
    with pytest.raises(LocalProtocolError, match="only sent up to 8"):
        _receiver_copy(receiver).send(Ack(9, 0))
    sender.receive_data(_frame(Ack(7, 7)))
    with pytest.raises(RemoteProtocolError, match="goes back"):
        sender.next_event()
    sender2, _ = _established(window=1 << 20, resume=5)
    sender2.receive_data(_frame(Ack(6, 0)))
    with pytest.raises(RemoteProtocolError, match="only sent up to 5"):
        sender2.next_event()


def _receiver_copy(receiver: ProtocolConnection) -> ProtocolConnection:
    """A fresh receiver in the same LSN position (so one failure doesn't end the test)."""
    return _established(window=1 << 20, resume=receiver.last_lsn)[1]


# --- manifests ------------------------------------------------------------------------------------


def test_manifest_parts_are_checked_against_the_request() -> None:
    sender, receiver = _established()
    receiver.receive_data(b"".join(sender.send(ManifestRequest(7, "a", 4096, True))))
    receiver.next_event()
    digests = bytes(16 * 3)
    for part in (
        Manifest(7, "a", True, 3 * 4096, 4096, 0, digests[:16], False),
        Manifest(7, "a", True, 3 * 4096, 4096, 1, digests[16:], True),
    ):
        sender.receive_data(b"".join(receiver.send(part)))
        assert sender.next_event() == part
    # request 7 is answered: another part for it is an error on both sides
    late = Manifest(7, "a", False, 0, 4096, 0, b"", True)
    with pytest.raises(LocalProtocolError, match="not outstanding"):
        receiver.send(late)
    sender.receive_data(_frame(late))
    with pytest.raises(RemoteProtocolError, match="not outstanding"):
        sender.next_event()


@pytest.mark.parametrize(
    ("parts", "error"),
    [
        ([Manifest(1, "b", False, 0, 4096, 0, b"", True)], "request was 'a'"),
        ([Manifest(1, "a", False, 0, 512, 0, b"", True)], "in extents of 512"),
        ([Manifest(1, "a", True, 8192, 4096, 1, bytes(16), True)], "expected 0"),
        (
            [
                Manifest(1, "a", True, 8192, 4096, 0, bytes(16), False),
                Manifest(1, "a", True, 12288, 4096, 1, bytes(32), True),
            ],
            "disagree",
        ),
    ],
)
def test_bad_manifest_parts(parts: list[Manifest], error: str) -> None:
    sender, receiver = _established()
    receiver.receive_data(b"".join(sender.send(ManifestRequest(1, "a", 4096, False))))
    receiver.next_event()
    for part in parts[:-1]:
        sender.receive_data(_frame(part))
        sender.next_event()
    sender.receive_data(_frame(parts[-1]))
    with pytest.raises(RemoteProtocolError, match=error):
        sender.next_event()


def test_manifest_request_ids_are_unique_while_outstanding() -> None:
    sender, receiver = _established()
    receiver.receive_data(b"".join(sender.send(ManifestRequest(1, "a", 4096, False))))
    receiver.next_event()
    receiver.receive_data(_frame(ManifestRequest(1, "b", 4096, False)))
    with pytest.raises(RemoteProtocolError, match="already in use"):
        receiver.next_event()
    with pytest.raises(LocalProtocolError, match="already in use"):
        sender.send(ManifestRequest(1, "b", 4096, False))


# --- closing and EOF ------------------------------------------------------------------------------


def test_nothing_may_follow_the_peers_goodbye() -> None:
    sender, receiver = _established()
    receiver.receive_data(b"".join(sender.send(Goodbye("done"))) + _frame(Ping(1, 1)))
    assert receiver.next_event() == Goodbye("done")
    with pytest.raises(RemoteProtocolError, match="out of turn"):
        receiver.next_event()


def test_half_close_lets_the_other_side_finish() -> None:
    sender, receiver = _established()
    receiver.receive_data(b"".join(sender.send(random_records(1, n=1))))
    receiver.next_event()
    receiver.receive_data(b"".join(sender.send(Goodbye("done"))))
    assert receiver.next_event() == Goodbye("done")
    # the receiver still sends its final ack and credit; the sender still reads them
    for msg in (Ack(1, 1), Credit(100), Goodbye("bye")):
        sender.receive_data(b"".join(receiver.send(msg)))
        assert sender.next_event() == msg
    assert sender.state is receiver.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        sender.send(Ping(1, 1))


def test_eof_mid_frame_is_an_error() -> None:
    receiver = ProtocolConnection(Role.RECEIVER)
    receiver.receive_data(_frame(HELLO)[:-3])
    assert receiver.next_event() is NEED_DATA
    receiver.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="in the middle of a frame"):
        receiver.next_event()


def test_eof_in_a_session_is_unclean() -> None:
    sender, _ = _established()
    sender.receive_data(b"")
    assert sender.next_event() == ConnectionClosed(clean=False)
    assert sender.state is State.CLOSED
    with pytest.raises(RuntimeError, match="after EOF"):
        sender.receive_data(b"more")


def test_eof_after_own_goodbye_is_clean() -> None:
    sender, _ = _established()
    sender.send(Goodbye("done"))
    sender.receive_data(b"")
    assert sender.next_event() == ConnectionClosed(clean=True)


def test_frames_queued_before_eof_are_delivered_first() -> None:
    receiver = ProtocolConnection(Role.RECEIVER)
    receiver.receive_data(_frame(HELLO))
    receiver.receive_data(b"")
    assert receiver.next_event() == HELLO
    assert receiver.next_event() == ConnectionClosed(clean=False)


def test_frame_limit_is_enforced_on_send() -> None:
    sender = ProtocolConnection(Role.SENDER, max_frame=64 * 1024)
    receiver = ProtocolConnection(Role.RECEIVER, window=1 << 20)
    receiver.receive_data(b"".join(sender.send(HELLO)))
    receiver.next_event()
    sender.receive_data(b"".join(receiver.send(welcome(1 << 20))))
    sender.next_event()
    with pytest.raises(LocalProtocolError, match="frame limit"):
        sender.send(random_records(1, n=1, size=100_000))


def test_a_precomputed_encoding_must_be_of_the_same_message() -> None:
    sender, receiver = _established(window=1 << 20)
    msg = random_records(1)
    with pytest.raises(ValueError, match="not the encoding"):
        sender.send(msg, encoded=sender.encode(random_records(1)))
    receiver.receive_data(b"".join(sender.send(msg, encoded=sender.encode(msg))))
    assert receiver.next_event() == msg


def test_read_data_answers_only_an_outstanding_read_with_what_it_asked() -> None:
    sender = _pair_in(Role.SENDER, State.ESTABLISHED)  # ReadRequest(1, 0, 4096) outstanding
    receiver = ProtocolConnection(Role.RECEIVER, window=1 << 20)
    receiver.receive_data(_frame(HELLO))
    receiver.next_event()
    receiver.send(welcome(1 << 20))
    receiver.receive_data(_frame(ReadRequest(7, "disk.img", 8192, 512)))
    assert receiver.next_event() == ReadRequest(7, "disk.img", 8192, 512)
    with pytest.raises(LocalProtocolError, match="carries 1024 bytes"):
        receiver.send(ReadData(7, 8192, b"x" * 1024))  # more than asked
    sender.receive_data(_frame(ReadData(1, 0, b"y" * 100)))  # short: the volume ends
    assert sender.next_event() == ReadData(1, 0, b"y" * 100)
    sender.receive_data(_frame(ReadData(1, 0, b"y")))  # answered already
    with pytest.raises(RemoteProtocolError, match="not outstanding"):
        sender.next_event()


def test_a_refused_handover_crosses_an_established_session() -> None:
    sender, receiver = _established(window=1 << 20)
    receiver.receive_data(b"".join(sender.send(Handover("refused", 0, 0))))
    assert receiver.next_event() == Handover("refused", 0, 0)


def test_handover_steps_are_checked_on_construction() -> None:
    assert Handover("final", 12, 0).lsn == 12
    with pytest.raises(ValueError, match="step"):
        Handover("surrender", 0, 0)
    with pytest.raises(ValueError, match="length"):
        ReadRequest(1, "disk.img", 0, 0)
