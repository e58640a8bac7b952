"""The replication rules of both sides (``engine/session_core.py``), driven by hypothesis.

The state machine joins a ``SenderCore`` and a ``ReceiverCore`` through two real sans-IO
protocol ends (``ProtocolConnection``), with the bytes between them delivered in any
amounts and any interleaving of: the source writing, the shipper packing and sending, the
receiver syncing and applying at its own pace, acks arriving late, the sender's journal
under pressure (``relieve``), and receiver restarts (with or without losing what it had not
applied). What must hold at every step, whatever the order:

* the receiver's durable records are the sender's records, in order, without gaps;
* the sender trims only what the receiver has applied (or, under pressure, received);
* the receiver never holds more unsynced payload than the window it granted (the protocol
  itself refuses a frame beyond the credit, which would fail the run);
* the lag is what is shipped and not applied;
* at the end, with the link drained, everything up to the last barrier is applied and all
  credit is back with the sender.
"""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from replicator.engine.session_core import (
    FRAME_TARGET,
    ReceiverCore,
    Send,
    SenderCore,
    Trim,
    Woken,
    check_record,
    refusal_error,
)
from replicator.journal import EncodedRecord, Record, RecordType, encode_record
from replicator.journal import check_record as check_stored
from replicator.journal.records import framed_run, peek_length
from replicator.transport import (
    PROTOCOL_VERSION,
    Ack,
    Credit,
    Error,
    Goodbye,
    Hello,
    Message,
    Ping,
    Pong,
    Records,
    RemoteProtocolError,
    Welcome,
)
from replicator.transport.protocol import NEED_DATA, ProtocolConnection, Role

WINDOW = 256 * 1024  # small, so credit runs out often


def _encoded(record: Record, lsn: int, ts_ns: int) -> EncodedRecord:
    return EncodedRecord(lsn, ts_ns, encode_record(record.with_lsn(lsn, ts_ns)))


def _events(end: ProtocolConnection) -> list[Message]:
    out: list[Message] = []
    while True:
        event = end.next_event()
        if event is NEED_DATA:
            return out
        assert isinstance(event, Message), event
        out.append(event)


class Replication(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.journal: list[EncodedRecord] = []  # the sender's records, lsn = index + 1
        self.barriers: list[int] = []
        self.trimmed_below = 1  # the sender's journal starts here
        self.relieved = False
        # the receiver's durable journal (lsn order) and applied LSN survive restarts
        self.durable: list[Record] = []
        self.applied = 0
        self.ts = 1_000_000_000
        self._connect()

    # -- a session: both ends, the handshake ---------------------------------------------
    def _connect(self) -> None:
        self.sp = ProtocolConnection(Role.SENDER)
        self.rp = ProtocolConnection(Role.RECEIVER, window=WINDOW)
        self.to_receiver = bytearray()
        self.to_sender = bytearray()
        self.unsynced: list[Record] = []
        self.unsynced_bytes = 0
        self.held: Records | None = None  # a frame packed, waiting for credit
        self.rp.receive_data(
            b"".join(self.sp.send(Hello(PROTOCOL_VERSION, "job", (), ("lz4",), 0, "s")))
        )
        assert isinstance(_events(self.rp)[0], Hello)
        received = self.durable[-1].lsn if self.durable else self.applied
        received = max(received, self.applied)
        self.receiver = ReceiverCore(self.applied)
        welcome = Welcome(PROTOCOL_VERSION, received, self.applied, WINDOW, ("lz4",), 0)
        self.sp.receive_data(b"".join(self.rp.send(welcome)))
        assert _events(self.sp) == [welcome]
        self.sender = SenderCore(welcome)
        # the shipper starts after what the receiver holds
        self.pending: collections.deque[EncodedRecord] = collections.deque(
            r for r in self.journal if r.lsn > received
        )
        self.receiver_had = received

    # -- the source ----------------------------------------------------------------------
    @rule(size=st.integers(0, 80_000), name=st.sampled_from(["a", "b", "dir/c"]))
    def write(self, size: int, name: str) -> None:
        self._append(Record.write(name, len(self.journal) * 512, b"\x5a" * size))

    @rule()
    def barrier(self) -> None:
        self._append(Record.epoch(len(self.barriers) + 1))
        self.barriers.append(len(self.journal))

    def _append(self, record: Record) -> None:
        self.ts += 1_000_000
        lsn = len(self.journal) + 1
        encoded = _encoded(record, lsn, self.ts)
        self.journal.append(encoded)
        self.pending.append(encoded)

    # -- the sender's shipper --------------------------------------------------------------
    @precondition(lambda self: self.held is not None or self.pending)
    @rule()
    def ship(self) -> None:
        if self.held is None:
            first = self.pending[0]
            self.sender.oldest_queued_ts = first.ts_ns
            frame = self.sender.pack(self.pending)
            size = len(frame.payload)
            # a frame is one record, or fits both the frame target and the window
            assert frame.count == 1 or size <= WINDOW
            assert frame.count == 1 or size - len(self._raw(frame.last_lsn)) < FRAME_TARGET
            self.held = frame
        if self.sp.credit >= len(self.held.payload):
            self.sender.shipped(self.held)
            self.to_receiver += b"".join(self.sp.send(self.held))
            self.held = None

    def _raw(self, lsn: int) -> bytes:
        return bytes(self.journal[lsn - 1].raw)

    # -- the wire ------------------------------------------------------------------------
    @precondition(lambda self: self.to_receiver)
    @rule(amount=st.integers(1, 300_000))
    def deliver_to_receiver(self, amount: int) -> None:
        chunk, self.to_receiver = self.to_receiver[:amount], self.to_receiver[amount:]
        self.rp.receive_data(bytes(chunk))
        for msg in _events(self.rp):
            if isinstance(msg, Records):
                before = self.receiver.in_hand_bytes
                records = self.receiver.records(msg)
                # read: in hand (counted against the journal's room) before it is written
                assert self.receiver.in_hand_bytes == before + len(msg.payload)
                barriers = [r.lsn for r in records if r.is_barrier]
                if barriers:
                    assert self.receiver.barrier_read == barriers[-1]
                self.unsynced += records
                self.unsynced_bytes += len(msg.payload)
                self.receiver.ingested(records, len(msg.payload))
            else:
                self._to_sender(self.receiver.control(msg))

    @precondition(lambda self: self.to_sender)
    @rule(amount=st.integers(1, 200))
    def deliver_to_sender(self, amount: int) -> None:
        chunk, self.to_sender = self.to_sender[:amount], self.to_sender[amount:]
        self.sp.receive_data(bytes(chunk))
        for msg in _events(self.sp):
            for action in self.sender.receive(msg):
                if isinstance(action, Trim):
                    assert action.upto <= self.sender.applied_lsn + 1
                    assert action.upto - 1 <= self.applied  # only what the receiver applied
                    self.trimmed_below = max(self.trimmed_below, action.upto)
                elif isinstance(action, Send):
                    self.to_receiver += b"".join(self.sp.send(action.message))
                else:
                    assert isinstance(action, Woken)

    def _to_sender(self, actions: list[Send]) -> None:
        for action in actions:
            self.to_sender += b"".join(self.rp.send(action.message))

    # -- the receiver's sync and apply ---------------------------------------------------------
    @precondition(lambda self: self.receiver.unsynced)
    @rule()
    def receiver_sync(self) -> None:
        records, granted = self.receiver.take_unsynced()
        assert records == self.unsynced and granted == self.unsynced_bytes
        self.durable += records
        self.unsynced, self.unsynced_bytes = [], 0
        self._to_sender(self.receiver.synced(self._received(), self.applied, granted))

    @rule()
    def receiver_apply(self) -> None:
        received = self._received()
        barriers = [lsn for lsn in self.barriers if lsn <= received]
        if barriers and barriers[-1] > self.applied:
            self.applied = barriers[-1]
        self._to_sender(self.receiver.applied(received, self.applied))

    def _received(self) -> int:
        return max(self.durable[-1].lsn if self.durable else 0, self.applied)

    # -- pressure and restarts -------------------------------------------------------------
    @rule()
    def journal_pressure(self) -> None:
        below = self.sender.relieve_below()
        if below is not None:
            assert below - 1 <= self._received()  # only what the receiver holds durably
            assert below > self.sender.applied_lsn + 1
            if below > self.trimmed_below:
                self.trimmed_below = below
                self.relieved = True

    @rule(lose_unapplied=st.booleans())
    def receiver_restart(self, lose_unapplied: bool) -> None:
        """The connection drops (frames in flight are lost); the receiver comes back with
        its durable journal, or (damage) with only what it applied."""
        if lose_unapplied:
            self.durable = [r for r in self.durable if r.lsn <= self.applied]
        received = self._received()
        if received + 1 < self.trimmed_below:
            # the receiver lacks records the sender gave up: only after relieve, and then
            # the engine compares with the replica instead (basis "remote"); start over
            assert self.relieved and lose_unapplied
            self.durable = [r for r in self.durable if r.lsn <= self.applied]
            self.trimmed_below = self.applied + 1
            self.relieved = False
        self._connect()

    # -- what holds at every step ----------------------------------------------------------
    @invariant()
    def durable_is_a_prefix_of_the_source(self) -> None:
        lsns = [r.lsn for r in self.durable]
        start = lsns[0] if lsns else 1
        assert lsns == list(range(start, start + len(lsns)))
        for record in self.durable:
            assert encode_record(record) == self._raw(record.lsn)

    @invariant()
    def memory_within_the_window(self) -> None:
        assert self.unsynced_bytes <= WINDOW
        assert self.rp.credit >= 0 and self.sp.credit >= 0

    @invariant()
    def nothing_needed_was_trimmed(self) -> None:
        assert self.trimmed_below <= self._received() + 1
        for record in self.pending:
            assert record.lsn >= self.trimmed_below or record.lsn <= self.receiver_had

    @invariant()
    def lag_is_what_is_not_applied(self) -> None:
        lag = self.sender.lag(len(self.journal), now_ns=self.ts)
        assert lag["records"] == max(0, len(self.journal) - self.sender.applied_lsn)
        assert lag["seconds"] >= 0
        if len(self.journal) <= self.sender.applied_lsn:
            assert lag["seconds"] == 0

    def teardown(self) -> None:
        """Drain: ship, deliver, sync and apply until nothing moves."""
        for _ in range(10_000):
            moved = False
            if self.held is not None or self.pending:
                before = (self.held, len(self.pending))
                self.ship()
                moved |= (self.held, len(self.pending)) != before
            if self.to_receiver:
                self.deliver_to_receiver(len(self.to_receiver))
                moved = True
            if self.receiver.unsynced:
                self.receiver_sync()
                moved = True
            applied = self.applied
            self.receiver_apply()
            moved |= self.applied != applied
            if self.to_sender:
                self.deliver_to_sender(len(self.to_sender))
                moved = True
            if not moved:
                break
        last_barrier = self.barriers[-1] if self.barriers else 0
        assert self._received() == len(self.journal)
        assert self.applied == max(last_barrier, self.applied)
        assert self.sender.applied_lsn == self.applied
        assert self.sp.credit == WINDOW  # every byte of credit came back
        assert self.sender.lag(len(self.journal))["bytes"] == 0 or self.applied < len(self.journal)


TestReplication = Replication.TestCase
TestReplication.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


# -- the pieces, one by one --------------------------------------------------------------


def test_a_record_larger_than_the_target_goes_alone() -> None:
    core = SenderCore(Welcome(PROTOCOL_VERSION, 0, 0, 64 * 1024 * 1024, (), 0))
    big = _encoded(Record.write("a", 0, b"x" * (FRAME_TARGET + 1)), 1, 1)
    small = _encoded(Record.write("a", 0, b"y"), 2, 2)
    pending = collections.deque([big, small])
    frame = core.pack(pending)
    assert (frame.first_lsn, frame.last_lsn, frame.count) == (1, 1, 1)
    assert list(pending) == [small]


def test_an_ack_trims_only_when_the_applied_lsn_moves() -> None:
    core = SenderCore(Welcome(PROTOCOL_VERSION, 0, 0, WINDOW, (), 0))
    assert core.receive(Ack(5, 0)) == [Woken(room=True)]
    assert core.relieve_below() == 6
    assert core.receive(Ack(5, 3)) == [Trim(4), Woken(room=True)]
    assert core.receive(Ack(5, 3)) == [Woken(room=True)]
    assert core.receive(Credit(10)) == [Woken(room=False)]
    assert core.receive(Ping(7, 8)) == [Send(Pong(7, 8))]
    assert core.receive(Ack(5, 5)) == [Trim(6), Woken(room=True)]
    assert core.relieve_below() is None


def test_a_source_clock_stepped_back_hides_no_backlog() -> None:
    """Records stamped before NTP stepped the source's clock an hour back look written in
    the future: their age read 0 s while they waited. It is never less than the time since
    this process read them from its journal, shipped or still queued."""
    hour, now_ns, now_mono = 3600 * 10**9, 1_800_000_000 * 10**9, 5000.0
    core = SenderCore(Welcome(PROTOCOL_VERSION, 0, 0, WINDOW, (), 0))
    core.oldest_queued_ts, core.oldest_queued_at = now_ns + hour, now_mono - 12
    assert core.lag(1, now_ns=now_ns, now_mono=now_mono)["seconds"] == 12.0
    pending = collections.deque([_encoded(Record.write("a", 0, b"x"), 1, now_ns + hour)])
    core.shipped(core.pack(pending), read_at=now_mono - 30)
    assert core.lag(1, now_ns=now_ns, now_mono=now_mono)["seconds"] == 30.0
    core.receive(Ack(1, 1))
    assert core.lag(1, now_ns=now_ns, now_mono=now_mono)["seconds"] == 0.0
    # clocks right: the stamp counts, the data's age since it was written
    pending = collections.deque([_encoded(Record.write("a", 0, b"x"), 2, now_ns - 50 * 10**9)])
    core.shipped(core.pack(pending), read_at=now_mono - 1)
    assert core.lag(2, now_ns=now_ns, now_mono=now_mono)["seconds"] == 50.0


def test_refusals_and_goodbyes_become_user_errors() -> None:
    core = SenderCore(Welcome(PROTOCOL_VERSION, 0, 0, WINDOW, (), 0))
    with pytest.raises(Exception, match=r"refused \(storage\): disk full"):
        core.receive(Error("storage", "disk full"))
    with pytest.raises(Exception, match="closed the session: bye"):
        core.receive(Goodbye("bye"))
    assert "--resync" in (refusal_error("diverged", "x").hint or "")


def test_frames_grow_to_the_most_credit_the_sender_has_held() -> None:
    """A Welcome's credit may start low (within a small journal's room); frames capped
    there for the whole session would all be single records."""
    core = SenderCore(Welcome(PROTOCOL_VERSION, 0, 0, 0, (), 0))
    pending = collections.deque(
        _encoded(Record.write("a", i * 1000, b"z" * 1000), i + 1, i + 1) for i in range(20)
    )
    assert core.pack(pending).count == 1
    core.receive(Credit(5000), credit=5000)
    assert core.pack(pending).count == 4  # what 5000 bytes of credit cover
    core.receive(Credit(1000), credit=3000)  # less held now: the cap stays at the most seen
    assert core.pack(pending).count == 4


def test_the_receiver_holds_a_frame_in_hand_from_its_reading_to_its_sync() -> None:
    """Bytes read off the wire count against the journal's room from the moment they are
    read (the next frame is read while the last one is written), and a barrier read says
    the applier will have an epoch to apply once they are synced."""
    sender = SenderCore(Welcome(PROTOCOL_VERSION, 0, 0, WINDOW, (), 0))
    pending = collections.deque(
        [_encoded(Record.write("a", 0, b"q" * 100), 1, 1), _encoded(Record.epoch(1), 2, 2)]
    )
    frame = sender.pack(pending)
    core = ReceiverCore(0)
    records = core.records(frame)
    assert (core.in_hand_bytes, core.unsynced_bytes) == (len(frame.payload), 0)
    assert core.barrier_read == 2
    core.ingested(records, len(frame.payload))
    assert (core.in_hand_bytes, core.unsynced_bytes) == (len(frame.payload),) * 2
    assert core.take_unsynced() == (records, len(frame.payload))
    assert core.in_hand_bytes == 0


def test_the_receiver_acks_applied_once_per_move() -> None:
    core = ReceiverCore(0)
    assert core.applied(4, 0) == []
    assert core.applied(4, 2) == [Send(Ack(4, 2))]
    assert core.applied(4, 2) == []
    core.ingested([], 100)
    assert core.take_unsynced() == ([], 100)
    assert core.synced(6, 3, 100) == [Send(Ack(6, 3)), Send(Credit(100))]
    assert core.applied(6, 3) == []


@pytest.mark.parametrize(
    "record",
    [
        Record(RecordType.WRITE, "../escape", 0, 1, b"x", 1, 1),
        Record(RecordType.WRITE, "/abs", 0, 1, b"x", 1, 1),
        Record(RecordType.RENAME, "a", 0, 4, b"../b", 1, 1),
        Record(RecordType.WRITE, "a", 2**63 - 1, 1, b"x", 1, 1),
        Record(RecordType.ZERO, "a", 2**62, 2**62, b"", 1, 1),
    ],
    ids=["dotdot", "absolute", "rename-target", "write-past-2^63", "zero-past-2^63"],
)
def test_records_no_sender_makes_are_refused(record: Record) -> None:
    with pytest.raises(RemoteProtocolError, match="lsn 1"):
        check_record(record)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300_000), min_size=1, max_size=30),
    cuts=st.sets(st.integers(1, 29)),
    copied=st.sets(st.integers(0, 29)),
    dropped=st.sets(st.integers(0, 29)),
    window=st.integers(64 * 1024, 8 * 1024 * 1024),
)
def test_frames_carry_every_record_once_slicing_a_chunk_when_they_can(
    sizes: list[int], cuts: set[int], copied: set[int], dropped: set[int], window: int
) -> None:
    """Records that lie back to back in one read chunk go out as a slice of it; a frame
    that spans two chunks, holds a copied record or skips one the chunk holds (``dropped``:
    read, not shipped) is joined. Either way the frames carry exactly the records shipped."""
    encoded = [
        encode_record(Record.write("a", 0, bytes([i % 251]) * size).with_lsn(i + 1, i + 1))
        for i, size in enumerate(sizes)
    ]
    chunk_of: dict[int, int | None] = {}  # lsn -> the chunk it was read in (None: copied)
    pending: collections.deque[EncodedRecord] = collections.deque()
    start = 0
    for end in sorted({c for c in cuts if c < len(sizes)} | {len(sizes)}):
        chunk, at = b"".join(encoded[start:end]), 0
        for i in range(start, end):
            if i in copied:  # checked in a reused buffer: copied out
                record, _ = check_stored(memoryview(bytearray(encoded[i])))
                chunk_of[i + 1] = None
            else:
                record, _ = check_stored(chunk, at)
                chunk_of[i + 1] = end
            if i not in dropped:
                pending.append(record)
            at += len(encoded[i])
        start = end
    shipped = [e for i, e in enumerate(encoded) if i not in dropped]
    core = SenderCore(Welcome(PROTOCOL_VERSION, 0, 0, window, (), 0))
    frames = []
    while pending:
        frames.append(core.pack(pending))
    assert b"".join(bytes(f.payload) for f in frames) == b"".join(shipped)
    for f in frames:
        lsns = range(f.first_lsn, f.last_lsn + 1)
        sources = {chunk_of[lsn] for lsn in lsns}
        sliced = sources != {None} and len(sources) == 1 and not {n - 1 for n in lsns} & dropped
        assert isinstance(f.payload, memoryview) == sliced, (f.first_lsn, f.last_lsn, sources)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 700_000), min_size=1, max_size=40),
    budgets=st.lists(st.integers(1, 6 * 1024 * 1024), min_size=1, max_size=8),
    window=st.integers(64 * 1024, 8 * 1024 * 1024),
)
def test_runs_are_cut_to_fit_a_frame_and_the_window(
    sizes: list[int], budgets: list[int], window: int
) -> None:
    """A shipping read's runs (``framed_run``, as many records as a read budget covers)
    go out in frames of at most the frame target and the window, a run cut at a record's
    bound where a frame is full (one record larger than both goes alone): every record
    once, in order, each frame a slice of the chunk."""
    chunk = b"".join(
        encode_record(Record.write("a", 0, bytes([i % 251]) * size).with_lsn(i + 1, i + 7))
        for i, size in enumerate(sizes)
    )
    pending: collections.deque[EncodedRecord] = collections.deque()
    at, turn = 0, 0
    while at < len(chunk):
        run = framed_run(chunk, at, len(chunk), None, budgets[turn % len(budgets)])
        turn += 1
        if not run.records:  # the budget is below the next record: it goes alone
            run = framed_run(chunk, at, len(chunk), None, peek_length(chunk, at))
        pending.append(EncodedRecord.of_run(chunk, at, run))
        at = run.end
    core = SenderCore(Welcome(PROTOCOL_VERSION, 0, 0, window, (), 0))
    frames = []
    while pending:
        frames.append(core.pack(pending))
    assert b"".join(bytes(f.payload) for f in frames) == chunk
    assert sum(f.count for f in frames) == len(sizes)
    for f in frames:
        assert isinstance(f.payload, memoryview)
        assert f.count == 1 or len(f.payload) <= min(FRAME_TARGET, window)
        assert f.source_ts_ns == f.first_lsn + 6
