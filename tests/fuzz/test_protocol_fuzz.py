"""Stateful fuzzing of two ProtocolConnections (a sender and a receiver) over an
in-memory link: legal and illegal sends from both sides, random byte splits, injected
corruption, truncation and EOF.

A reference model of each side, written from docs/PROTOCOL.md (the TRANSITIONS table
and "Rules beyond the turn-taking"), predicts whether every send is legal and whether
every arriving message must be accepted; the connections must agree with it exactly:

* an illegal send raises LocalProtocolError and moves the side to ERROR, a legal one
  never raises; an arriving message the model accepts is delivered unchanged, one it
  rejects raises RemoteProtocolError (VersionMismatchError is one) and moves to ERROR;
* the state only changes along TRANSITIONS (or to ERROR on an error, to CLOSED at EOF);
* credit is never negative and matches the model; LSNs of Records only increase;
* corrupted bytes never become a message; a side in ERROR never yields one again;
* no other exception escapes, and no call that feeds bytes ever raises.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from replicator.engine.window import MAX_WINDOW
from replicator.transport import (
    NEED_DATA,
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
    Ping,
    Pong,
    ProtocolConnection,
    ProtocolError,
    Records,
    Refuse,
    RemoteProtocolError,
    Role,
    State,
    VersionMismatchError,
    Welcome,
)
from replicator.transport.messages import DIGEST_SIZE, I64_MAX, message_type
from replicator.transport.protocol import MAX_MANIFEST_PART, TRANSITIONS
from tests.fuzz import support
from tests.fuzz.streams import frame_bytes
from tests.transport.helpers import HELLO, messages, pack_records

MAX_OUTSTANDING = 256  # ManifestRequests per connection (docs/PROTOCOL.md)
CLEAN_AT_EOF = (State.CLOSED, State.GOODBYE_SENT, State.GOODBYE_RECEIVED)


class Pending:
    """An outstanding ManifestRequest, as the model tracks it."""

    def __init__(self, volume: str, extent_size: int) -> None:
        self.volume = volume
        self.extent_size = extent_size
        self.next_extent = 0
        self.exists: bool | None = None
        self.size = 0


class Model:
    """One side of a connection as docs/PROTOCOL.md describes it."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.START
        self.credit = 0
        self.last_lsn = 0
        self.acked = (0, 0)
        self.manifests: dict[int, Pending] = {}
        self.closed = False  # saw EOF (ConnectionClosed)

    def allows(self, direction: str, msg: Message) -> bool:
        if (self.role, self.state, direction, message_type(msg)) not in TRANSITIONS:
            return False
        if isinstance(msg, Hello | Welcome):
            return msg.protocol_version == PROTOCOL_VERSION
        if isinstance(msg, Records):
            return len(msg.payload) <= self.credit and msg.first_lsn > self.last_lsn
        if isinstance(msg, Ack):
            return (
                msg.received_lsn <= self.last_lsn
                and msg.received_lsn >= self.acked[0]
                and msg.applied_lsn >= self.acked[1]
            )
        if isinstance(msg, Credit):
            return self.credit + msg.window_bytes <= I64_MAX
        if isinstance(msg, ManifestRequest):
            return msg.request_id not in self.manifests and len(self.manifests) < MAX_OUTSTANDING
        if isinstance(msg, Manifest):
            pending = self.manifests.get(msg.request_id)
            return (
                len(msg.digests) <= MAX_MANIFEST_PART
                and pending is not None
                and (msg.volume, msg.extent_size) == (pending.volume, pending.extent_size)
                and (
                    pending.exists is None
                    or (msg.exists, msg.size) == (pending.exists, pending.size)
                )
                and msg.first_extent == pending.next_extent
            )
        return True

    def apply(self, direction: str, msg: Message) -> None:
        self.state = TRANSITIONS[(self.role, self.state, direction, message_type(msg))]  # type: ignore[index]
        if isinstance(msg, Welcome):
            self.credit = msg.window
            self.last_lsn = msg.received_lsn
            self.acked = (msg.received_lsn, msg.applied_lsn)
        elif isinstance(msg, Records):
            self.credit -= len(msg.payload)
            self.last_lsn = msg.last_lsn
        elif isinstance(msg, Credit):
            self.credit += msg.window_bytes
        elif isinstance(msg, Ack):
            self.acked = (msg.received_lsn, msg.applied_lsn)
        elif isinstance(msg, ManifestRequest):
            self.manifests[msg.request_id] = Pending(msg.volume, msg.extent_size)
        elif isinstance(msg, Manifest):
            if msg.done:
                del self.manifests[msg.request_id]
            else:
                pending = self.manifests[msg.request_id]
                pending.exists, pending.size = msg.exists, msg.size
                pending.next_extent = msg.end_extent


def first_difference(actual: bytes | bytearray, clean: bytes | bytearray) -> int | None:
    """Offset of the first byte where ``actual`` is not ``clean``; None when it is
    ``clean`` or a prefix of it (cut short, but not corrupted)."""
    n = min(len(actual), len(clean))
    for pos in range(0, n, 4096):
        end = min(pos + 4096, n)
        if actual[pos:end] != clean[pos:end]:
            return next(i for i in range(pos, end) if actual[i] != clean[i])
    return n if len(actual) > len(clean) else None


class Wire:
    """Bytes on their way to one side, and the frames among them not yet consumed.

    ``clean`` is the stream as it was sent, ``actual`` as it arrives (corrupted, cut);
    offsets are stream offsets. ``taint`` is where they first differ: a frame that ends
    at or before it is intact, anything after it must never become a message.
    """

    def __init__(self) -> None:
        self.clean = bytearray()
        self.actual = bytearray()
        self.delivered = 0  # bytes of actual handed to the connection
        self.frames: list[tuple[Message, int, int]] = []  # (message, start, end)
        self.taint: int | None = None
        self.closing = False  # EOF follows the pending bytes; nothing more is pushed
        self.eof_sent = False

    @property
    def pending(self) -> int:
        return len(self.actual) - self.delivered

    def push(self, msg: Message, data: bytes) -> None:
        if self.closing:
            return  # the peer's end is gone: what it sends now is lost
        # A deletion at the very end leaves ``actual`` a prefix of ``clean`` (no taint
        # yet); bytes pushed after it land where others were, so that is a taint too.
        diverged = self.taint is not None or len(self.actual) != len(self.clean)
        start = len(self.clean)
        self.clean += data
        self.actual += data
        self.frames.append((msg, start, len(self.clean)))
        if diverged:
            self.taint = first_difference(self.actual, self.clean)

    def intact(self, frame: tuple[Message, int, int]) -> bool:
        return self.taint is None or frame[2] <= self.taint

    def corrupt(self, data: st.DataObject) -> None:
        """Flip, insert or delete bytes somewhere in the undelivered part (or add garbage
        at its end)."""
        if not self.pending or rare(data, 6, "garbage at the end"):
            self.actual += data.draw(st.binary(min_size=1, max_size=8), label="garbage")
        else:
            pos = self.delivered + data.draw(st.integers(0, self.pending - 1), label="at")
            kind = data.draw(st.sampled_from(["flip", "insert", "delete"]), label="corruption")
            if kind == "flip":
                self.actual[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
            elif kind == "insert":
                self.actual[pos:pos] = data.draw(st.binary(min_size=1, max_size=8), label="ins")
            else:
                del self.actual[pos : pos + data.draw(st.integers(1, 4), label="deleted")]
        self.taint = first_difference(self.actual, self.clean)

    def cut(self, keep: int) -> None:
        """Keep ``keep`` of the pending bytes, drop the rest, and close after them. A frame
        cut in two stays listed: it can never complete, and EOF must be an error."""
        del self.actual[self.delivered + keep :]
        self.frames = [f for f in self.frames if f[1] < len(self.actual)]
        self.taint = first_difference(self.actual, self.clean)
        self.closing = True

    def take(self, n: int) -> bytes:
        """The next ``n`` pending bytes; ``delivered`` moves on as they are fed."""
        return bytes(self.actual[self.delivered : self.delivered + n])


class Side:
    def __init__(self, role: Role, name: str) -> None:
        self.name = name
        self.conn = ProtocolConnection(role, window=0)
        self.model = Model(role)
        self.inbox = Wire()  # bytes heading to this side
        self.error: type[Exception] | None = None  # what moved it to ERROR
        self.received: list[Message] = []
        self.sent = 0
        self.closed: ConnectionClosed | None = None
        self.request_ids = iter(range(1, 10**6))


class LinkMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        support.tick()
        self.s = Side(Role.SENDER, "sender")
        self.r = Side(Role.RECEIVER, "receiver")
        self.steps = 0

    @initialize(data=st.data())
    def handshake(self, data: st.DataObject) -> None:
        """Most runs start from an established session (the handshake itself is fuzzed
        in the others, and by test_frames_fuzz.py)."""
        if rare(data, 5, "start from scratch"):
            return
        self.send(self.s, HELLO)
        self.feed(self.r, self.r.inbox.take(self.r.inbox.pending), random.Random(0))
        msg = _receiver_message(self.r.model, data, False)
        assert isinstance(msg, Welcome | Refuse)
        self.send(self.r, msg)
        self.feed(self.s, self.s.inbox.take(self.s.inbox.pending), random.Random(1))

    def peer(self, side: Side) -> Side:
        return self.r if side is self.s else self.s

    def side(self, data: st.DataObject) -> Side:
        return self.s if data.draw(st.booleans(), label="sender?") else self.r

    # -- sending ---------------------------------------------------------------------------

    def send(self, side: Side, msg: Message) -> None:
        conn, model = side.conn, side.model
        legal = model.allows("send", msg)
        before = conn.state
        try:
            buffers = conn.send(msg)
        except LocalProtocolError:
            assert not legal, f"{side.name} refused a legal send of {msg!r} in {before}"
            assert conn.state is State.ERROR
            if model.state is not State.ERROR:
                side.error = LocalProtocolError
            model.state = State.ERROR
            return
        assert legal, f"{side.name} sent {msg!r} in {before}, which the protocol forbids"
        side.sent += 1
        model.apply("send", msg)
        assert conn.state is model.state
        self.peer(side).inbox.push(msg, b"".join(buffers))

    def say_something(self, side: Side, data: st.DataObject) -> None:
        msg = plausible(side, data)
        if msg is not None:
            self.send(side, msg)

    @rule(data=st.data())
    def sender_says(self, data: st.DataObject) -> None:
        self.say_something(self.s, data)

    @rule(data=st.data())
    def receiver_says(self, data: st.DataObject) -> None:
        self.say_something(self.r, data)

    @rule(data=st.data(), msg=messages)
    def send_anything(self, data: st.DataObject, msg: Message) -> None:
        """Any message at all (mostly out of turn or breaking a rule), now and then."""
        if rare(data, 40, "send anything?"):
            self.send(self.side(data), msg)

    @rule(data=st.data())
    def forge(self, data: st.DataObject) -> None:
        """A frame the peer's own checks would never let out (a peer with other code, or
        a man in the middle with a valid checksum): only the receiving side's checks
        stand between it and the engine."""
        if rare(data, 4, "forge?"):
            target = self.side(data)
            msg = forged(target.model, data)
            target.inbox.push(msg, frame_bytes(msg))

    # -- the link ----------------------------------------------------------------------------

    def deliver(self, side: Side, data: st.DataObject) -> None:
        """Some or all of the bytes in flight arrive, in random pieces; then EOF, if the
        link was closed and everything before it arrived."""
        wire = side.inbox
        if wire.pending:
            n = wire.pending
            if data.draw(st.booleans(), label="only some"):
                n = data.draw(st.integers(1, wire.pending), label="bytes")
            rnd = random.Random(data.draw(st.integers(0, 2**32 - 1), label="split seed"))
            self.feed(side, wire.take(n), rnd)
        if wire.closing and not wire.pending and not wire.eof_sent:
            wire.eof_sent = True
            side.conn.receive_data(b"")
            self.drain(side)

    @rule(data=st.data())
    def deliver_to_sender(self, data: st.DataObject) -> None:
        self.deliver(self.s, data)

    @rule(data=st.data())
    def deliver_to_receiver(self, data: st.DataObject) -> None:
        self.deliver(self.r, data)

    @rule(data=st.data())
    def corrupt(self, data: st.DataObject) -> None:
        if rare(data, 40, "corrupt?"):
            wire = self.side(data).inbox
            if not wire.closing:
                wire.corrupt(data)

    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        """The link toward one side ends (FIN), perhaps in the middle of a frame."""
        if rare(data, 40, "close?"):
            wire = self.side(data).inbox
            if not wire.closing:
                wire.cut(data.draw(st.integers(0, wire.pending), label="keep"))

    def feed(self, side: Side, chunk: bytes, rnd: random.Random) -> None:
        """Hand ``chunk`` (taken from the side's inbox) over in random pieces, through
        either input path, collecting events as the adapter would."""
        conn, wire = side.conn, side.inbox
        for piece in support.splits(rnd, chunk):
            if rnd.random() < 0.5:
                conn.receive_data(piece)
                wire.delivered += len(piece)
            else:
                pos = 0
                while pos < len(piece):
                    room = conn.get_buffer(-1)
                    n = min(len(room), len(piece) - pos)
                    room[:n] = piece[pos : pos + n]
                    room.release()
                    conn.buffer_updated(n)
                    wire.delivered += n
                    pos += n
                    if conn.ready:
                        self.drain(side)
            self.drain(side)

    def drain(self, side: Side) -> None:
        """Collect events and hold each one against the model."""
        conn, model, wire = side.conn, side.model, side.inbox
        while True:
            before = conn.state
            head = wire.frames[0] if wire.frames else None
            complete = head is not None and head[2] <= wire.delivered
            ready = conn.ready
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                assert conn.state is State.ERROR and ready, (exc, ready)
                if side.error is not None:
                    assert type(exc) is side.error, "a later call raised another error class"
                    return
                assert isinstance(exc, RemoteProtocolError), exc
                side.error = type(exc)
                if head is None:
                    allowed = wire.taint is not None  # garbage after the last frame
                elif not wire.intact(head):
                    allowed = True
                elif not model.allows("recv", head[0]):
                    allowed = True  # refused, perhaps on its prefix already
                    if isinstance(exc, VersionMismatchError):
                        assert isinstance(head[0], Hello | Welcome), exc
                else:
                    allowed = not complete and wire.eof_sent  # cut short by EOF
                assert allowed, f"{side.name} refused {head!r} in {before}: {exc!r}"
                model.state = State.ERROR
                return
            assert side.error is None and model.state is not State.ERROR, "event after an error"
            assert ready is (event is not NEED_DATA), (ready, event)
            if event is NEED_DATA:
                assert not wire.eof_sent
                if head is not None and complete and wire.intact(head):
                    raise AssertionError(f"{side.name} sat on a complete frame {head!r}")
                return
            if isinstance(event, ConnectionClosed):
                assert wire.eof_sent and not wire.frames and wire.taint is None, event
                if side.closed is None:
                    assert event.clean is (model.state in CLEAN_AT_EOF), (event, model.state)
                    side.closed = event
                    model.state = State.CLOSED
                    model.closed = True
                assert event == side.closed and conn.state is State.CLOSED
                return
            assert isinstance(event, Message)
            assert not model.closed
            assert head is not None and complete and wire.intact(head), (
                f"{side.name} got {event!r} from corrupted or missing bytes"
            )
            assert event == head[0], f"{side.name} got {event!r} instead of {head[0]!r}"
            assert model.allows("recv", event), f"{side.name} accepted {event!r} in {before}"
            if isinstance(event, Records):
                earlier = [m for m in side.received if isinstance(m, Records)]
                assert not earlier or event.first_lsn > earlier[-1].last_lsn
            model.apply("recv", event)
            assert conn.state is model.state
            key = (conn.role, before, "recv", message_type(event))
            assert TRANSITIONS[key] is conn.state  # type: ignore[index]
            wire.frames.pop(0)
            side.received.append(event)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self) -> None:
        self.steps += 1
        for side in (self.s, self.r):
            conn, model = side.conn, side.model
            assert conn.state is model.state, (side.name, conn.state, model.state)
            assert conn.credit >= 0
            assert conn.stats.frames_received == len(side.received)
            assert conn.stats.frames_sent == side.sent
            greeting = Hello if conn.role is Role.RECEIVER else Welcome
            assert conn.handshake_received is any(isinstance(m, greeting) for m in side.received)
            if conn.state is not State.ERROR:
                assert conn.credit == model.credit
                assert conn.last_lsn == model.last_lsn
                assert conn.acked == model.acked
            else:
                with pytest.raises(side.error or LocalProtocolError):
                    conn.next_event()

    def teardown(self) -> None:
        """Everything still in flight arrives, then EOF: every side ends cleanly or with
        a RemoteProtocolError, never hangs on a complete frame."""
        support.tick_steps(self.steps)
        for side in (self.s, self.r):
            kinds = sorted({type(m).__name__ for m in side.received})
            event(f"{side.name} received: {', '.join(kinds) or 'nothing'}")
        for side in (self.s, self.r):
            wire = side.inbox
            wire.closing = True
            self.feed(side, wire.take(wire.pending), random.Random(0))
            if not wire.eof_sent:
                wire.eof_sent = True
                side.conn.receive_data(b"")
                self.drain(side)
            if side.model.state is not State.ERROR:
                self.drain(side)
                assert side.closed is not None or side.error is not None
            event(f"{side.name} ends: {side.error.__name__ if side.error else side.closed}")


# --- what each side would plausibly send -------------------------------------------------------


def rare(data: st.DataObject, n: int, label: str) -> bool:
    """True about once in ``n`` draws. Hypothesis favours 0 and the ends of a range, so
    the rare value sits in the middle (and shrinking, towards 0, drops it)."""
    return data.draw(st.integers(0, n - 1), label=label) == n // 2


def weighted(data: st.DataObject, label: str, **weights: int) -> str:
    """One of the keywords, with the given weights (the first is what shrinking keeps)."""
    total = sum(weights.values())
    x = data.draw(st.integers(0, total - 1), label=label)
    for name, weight in weights.items():
        if x < weight:
            return name
        x -= weight
    raise AssertionError("unreachable")


def plausible(side: Side, data: st.DataObject) -> Message | None:
    """A message that fits the side's state most of the time, and breaks a rule now and
    then (an out-of-range field, a repeated id, a wrong version); None: nothing to say."""
    bad = rare(data, 60, "break a rule")
    if side.model.role is Role.SENDER:
        return _sender_message(side, side.model, data, bad)
    return _receiver_message(side.model, data, bad)


def _sender_message(side: Side, model: Model, data: st.DataObject, bad: bool) -> Message | None:
    state = model.state
    if state is State.START:
        return Hello(PROTOCOL_VERSION + bad, HELLO.job, HELLO.volumes, (), 7, "s1")
    if state not in (State.ESTABLISHED, State.GOODBYE_RECEIVED) and not bad:
        return None
    if rare(data, 40, "sender ends"):
        return Goodbye("done") if rare(data, 2, "how") else Error("internal", "oops")
    kind = weighted(data, "sender sends", records=10, request=3, ping=2, pong=1)
    if kind == "records":
        sizes = data.draw(
            st.lists(st.sampled_from([0, 1, 40, 600, 3000]), min_size=1, max_size=3),
            label="record sizes",
        )
        if rare(data, 10, "big record"):
            sizes.append(70_000)  # a frame body above 64 KiB takes the large-frame path
        gap = data.draw(st.integers(1, 3), label="lsn gap")
        first = model.last_lsn if bad and model.last_lsn else model.last_lsn + gap
        records = pack_records(first, [bytes([i]) * n for i, n in enumerate(sizes)])
        if len(records.payload) > model.credit and not bad:
            return None  # the engine waits for credit
        return records
    if kind == "request":
        rid = next(iter(model.manifests)) if bad and model.manifests else next(side.request_ids)
        return ManifestRequest(rid, "disk.img", data.draw(st.sampled_from([512, 4096])), False)
    if kind == "ping":
        return Ping(data.draw(st.integers(0, 1000), label="nonce"), 1)
    return Pong(data.draw(st.integers(0, 1000), label="nonce"), 2)


def _receiver_message(model: Model, data: st.DataObject, bad: bool) -> Message | None:
    state = model.state
    if state is State.ERROR:
        return Refuse("version", "no") if rare(data, 2, "refuse") else Error("protocol", "bye")
    if state is State.START:
        return Refuse("busy", "no") if bad else None
    if state is State.HELLO_RECEIVED:
        if rare(data, 10, "refuse"):
            return Refuse("busy", "no")
        window = data.draw(st.sampled_from([1 << 20, 0, 100, 5000]), label="window")
        received = data.draw(st.integers(0, 50), label="resume")
        applied = data.draw(st.integers(0, received), label="applied")
        return Welcome(PROTOCOL_VERSION + bad, received, applied, window, (), 1)
    if state not in (State.ESTABLISHED, State.GOODBYE_RECEIVED) and not bad:
        return None
    if rare(data, 40, "receiver ends"):
        return Goodbye("done") if rare(data, 2, "how") else Error("storage", "disk full")
    kind = weighted(data, "receiver sends", credit=4, ack=4, manifest=5, ping=2, pong=1)
    if kind == "credit":
        grant = data.draw(st.sampled_from([70_000, 1, 1000, 1 << 20]), label="grant")
        return Credit(I64_MAX if bad else grant)
    if kind == "ack" or (kind == "manifest" and not model.manifests):
        low_r, low_a = model.acked
        top = model.last_lsn + (data.draw(st.integers(1, 5), label="too far") if bad else 0)
        received = data.draw(st.integers(min(low_r, top), top), label="ack received")
        applied = data.draw(st.integers(min(low_a, received), received), label="ack applied")
        return Ack(received, applied)
    if kind == "manifest":
        return _manifest_part(model, data, bad)
    if kind == "ping":
        return Ping(data.draw(st.integers(0, 1000), label="nonce"), 3)
    return Pong(data.draw(st.integers(0, 1000), label="nonce"), 4)


def forged(target: Model, data: st.DataObject) -> Message:
    """A message for ``target`` that breaks one of the rules it must check (or fits
    them, or is anything at all): what the peer's own checks would have refused."""
    kind = weighted(data, "forged", rule=4, anything=1)
    if kind == "anything":
        return data.draw(messages, label="forged message")
    if target.role is Role.RECEIVER:
        what = weighted(data, "breaks", lsn=2, credit=2, request=1, version=1)
        if what == "credit" and target.credit > MAX_WINDOW:
            what = "lsn"  # past more credit than a receiver grants: more than a test allocates
        if what == "lsn":
            first = max(1, target.last_lsn - data.draw(st.integers(0, 2), label="back"))
            return pack_records(first, [b"x" * 10])
        if what == "credit":
            return pack_records(target.last_lsn + 1, [bytes(target.credit + 1)])
        if what == "request" and target.manifests:
            return ManifestRequest(next(iter(target.manifests)), "disk.img", 4096, False)
        return Hello(PROTOCOL_VERSION + 1, HELLO.job, HELLO.volumes, (), 7, "s1")
    what = weighted(data, "breaks", ack=2, credit=1, manifest=2, version=1)
    if what == "ack":
        top = target.last_lsn + data.draw(st.integers(1, 3), label="beyond")
        return Ack(top, data.draw(st.integers(0, top), label="applied"))
    if what == "credit":  # more than 63 bits of credit in all (or just a lot)
        over = data.draw(st.integers(1, 3), label="over")
        return Credit(min(I64_MAX, I64_MAX - target.credit + over))
    if what == "manifest":
        known = data.draw(st.booleans(), label="known request")
        if known and target.manifests:
            rid = data.draw(st.sampled_from(sorted(target.manifests)), label="request")
            pending = target.manifests[rid]
            first = pending.next_extent + data.draw(st.integers(1, 2), label="gap")
            size = pending.extent_size * (first + 4)
            return Manifest(rid, pending.volume, True, size, pending.extent_size, first, b"", False)
        return Manifest(data.draw(st.integers(0, 10**6)), "x", False, 0, 512, 0, b"", True)
    return Welcome(PROTOCOL_VERSION + 1, 0, 0, 1, (), 1)


def _manifest_part(model: Model, data: st.DataObject, bad: bool) -> Manifest:
    rid = data.draw(st.sampled_from(sorted(model.manifests)), label="request")
    pending = model.manifests[rid]
    ext = pending.extent_size
    if pending.exists is None and rare(data, 4, "missing volume"):
        return Manifest(rid, pending.volume, False, 0, ext, 0, b"", True)
    size = pending.size if pending.exists else data.draw(st.integers(0, 40 * ext), label="size")
    count = -(-size // ext)
    first = min(pending.next_extent + bad, count)
    n = data.draw(st.integers(0, count - first), label="extents")
    done = first + n == count and data.draw(st.booleans(), label="done")
    return Manifest(rid, pending.volume, True, size, ext, first, bytes(DIGEST_SIZE * n), done)


def run_machine(prof: settings) -> None:
    machine: Any = LinkMachine.TestCase
    machine.settings = prof
    machine().runTest()


@pytest.mark.parametrize("prof", support.profiles(150, 4_000, stateful_step_count=40))
def test_two_connections_over_a_hostile_link(prof: settings) -> None:
    run_machine(prof)
