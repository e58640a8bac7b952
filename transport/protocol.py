"""Sans-IO protocol connection: bytes in, events out; messages in, bytes out.

In the style of h11/wsproto: ``ProtocolConnection`` does no I/O. Feed it what the
socket delivered (``receive_data``, or ``get_buffer``/``buffer_updated`` to read in
place), call ``next_event()`` until it returns ``NEED_DATA``; ``send(msg)`` returns the
buffers to write. The same object serves the asyncio adapter, tests and fuzzers.

Misuse by our own code raises ``LocalProtocolError``; a misbehaving peer raises
``RemoteProtocolError``. Either moves the connection to ``State.ERROR``, after which
nothing is received and only "last words" may be sent (an ``Error``, or a ``Refuse``
from a receiver that could not accept a Hello, e.g. after ``VersionMismatchError``).

Memory: every frame the peer announces is judged on its prefix, before anything is
allocated for it, against what the state allows (``limit_for_next_frame``): before the
handshake only a Hello-sized frame (receiver) or a control frame (sender), after it a
Records payload within the credit granted, a Manifest part, or a control frame. Input
buffers are released at EOF and on errors (docs/PROTOCOL.md, "Memory bounds").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal

from replicator.transport.errors import ConnectionFailedError
from replicator.transport.frames import (
    CAP_RECORDS_CHECKED,
    COMPRESS_THRESHOLD,
    DEFAULT_MAX_FRAME,
    MAX_BULK_HEADER,
    MAX_CONTROL_FRAME,
    MAX_HELLO_FRAME,
    PREFIX_SIZE,
    READAHEAD,
    EncodedFrame,
    FrameDecoder,
    FrameLimit,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    VersionMismatchError,
    detached,
    encode_frame,
)
from replicator.transport.messages import (
    I64_MAX,
    MAX_READ,
    MAX_TREE_PART,
    MESSAGE_CLASSES,
    Ack,
    Credit,
    Hello,
    Manifest,
    ManifestRequest,
    Message,
    MessageType,
    ReadData,
    ReadRequest,
    Records,
    Tree,
    TreeRequest,
    Welcome,
    message_type,
)
from replicator.transport.version import PROTOCOL_VERSION

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_MANIFEST_PART",
    "NEED_DATA",
    "TRANSITIONS",
    "ConnectionClosed",
    "LocalProtocolError",
    "NeedData",
    "ProtocolConnection",
    "ProtocolError",
    "RemoteProtocolError",
    "Role",
    "State",
    "TransferStats",
    "VersionMismatchError",
]

# The receiver's default credit window: the largest record (64 MiB) plus framing, so a
# sender can always make progress. The engine may grant more or less (Welcome.window).
DEFAULT_WINDOW: Final = 66 * 1024 * 1024
MAX_PENDING_MANIFESTS: Final = 256  # outstanding ManifestRequests per connection
# Digest bytes in one Manifest part (256 Ki extents): bounds what a sender must buffer
# for one Manifest frame. The engine sends parts of 64 Ki extents (1 MiB).
MAX_MANIFEST_PART: Final = 4 * 1024 * 1024


class Role(Enum):
    SENDER = "sender"
    RECEIVER = "receiver"

    @property
    def peer(self) -> Role:
        return Role.RECEIVER if self is Role.SENDER else Role.SENDER


class State(Enum):
    START = "START"
    HELLO_SENT = "HELLO_SENT"  # sender, waiting for Welcome or Refuse
    HELLO_RECEIVED = "HELLO_RECEIVED"  # receiver, must answer Welcome or Refuse
    ESTABLISHED = "ESTABLISHED"
    GOODBYE_SENT = "GOODBYE_SENT"  # we said Goodbye; the peer may still be sending
    GOODBYE_RECEIVED = "GOODBYE_RECEIVED"  # they said Goodbye; we may finish (final acks)
    CLOSED = "CLOSED"  # both directions ended (or Refuse/Error, or EOF)
    ERROR = "ERROR"


Direction = Literal["send", "recv"]


class NeedData:
    """The type of NEED_DATA: more bytes are needed before the next event."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the byte stream. ``clean``: after a Goodbye/Error/Refuse exchange
    (or our own Goodbye); False when it vanished in the middle of a session."""

    clean: bool


@dataclass(slots=True)
class TransferStats:
    """Counters of one connection; ``*_wire`` are bytes as sent (compressed)."""

    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    payload_sent: int = 0
    payload_sent_wire: int = 0
    payload_received: int = 0
    payload_received_wire: int = 0


# --- the transition table -------------------------------------------------------------------
#
# Everything that decides which message may be sent or received in which state, and
# which state follows, lives in TRANSITIONS: (role, state, direction, type) -> new state.
# A (role, state, direction, type) that is not a key is a protocol error. The only other
# transitions: a protocol error moves to ERROR, and EOF moves any other state to CLOSED.
# Per-message field rules (credit, LSN order, manifest bookkeeping) are checked by
# _check_send/_check_recv and can only lead to ERROR.

_S, _R = Role.SENDER, Role.RECEIVER
_T = MessageType
_SENDER_SENDS = (
    _T.RECORDS,
    _T.MANIFEST_REQUEST,
    _T.TREE_REQUEST,
    _T.READ_REQUEST,
    _T.HANDOVER,
    _T.POINT_FLOOR,
    _T.PING,
    _T.PONG,
)
_RECEIVER_SENDS = (
    _T.ACK,
    _T.CREDIT,
    _T.MANIFEST,
    _T.TREE,
    _T.READ_DATA,
    _T.HANDOVER,
    _T.PING,
    _T.PONG,
)
_DATA = {_S: _SENDER_SENDS, _R: _RECEIVER_SENDS}
_PRE = {_S: (State.START, State.HELLO_SENT), _R: (State.START, State.HELLO_RECEIVED)}

_Key = tuple[Role, State, Direction, MessageType]


def _rules() -> Iterable[tuple[Role, Iterable[State], Direction, Iterable[MessageType], State]]:
    for role in Role:
        data_out, data_in = _DATA[role], _DATA[role.peer]
        yield from (
            # an established session carries each side's messages both ways
            (role, [State.ESTABLISHED], "send", data_out, State.ESTABLISHED),
            (role, [State.ESTABLISHED], "recv", data_in, State.ESTABLISHED),
            # Goodbye closes one direction; the other side may finish what it was doing
            (role, [State.ESTABLISHED], "send", [_T.GOODBYE], State.GOODBYE_SENT),
            (role, [State.ESTABLISHED], "recv", [_T.GOODBYE], State.GOODBYE_RECEIVED),
            (role, [State.GOODBYE_SENT], "recv", data_in, State.GOODBYE_SENT),
            (role, [State.GOODBYE_SENT], "recv", [_T.GOODBYE, _T.ERROR], State.CLOSED),
            (role, [State.GOODBYE_RECEIVED], "send", data_out, State.GOODBYE_RECEIVED),
            (role, [State.GOODBYE_RECEIVED], "send", [_T.GOODBYE, _T.ERROR], State.CLOSED),
            # before the session: a Goodbye or an Error ends the connection
            (role, _PRE[role], "send", [_T.GOODBYE, _T.ERROR], State.CLOSED),
            (role, _PRE[role], "recv", [_T.GOODBYE, _T.ERROR], State.CLOSED),
            # an Error ends everything, from any open state
            (role, [State.ESTABLISHED], "send", [_T.ERROR], State.CLOSED),
            (role, [State.ESTABLISHED], "recv", [_T.ERROR], State.CLOSED),
            # last words after a protocol error
            (role, [State.ERROR], "send", [_T.ERROR], State.ERROR),
        )
    yield from (
        # the handshake
        (_S, [State.START], "send", [_T.HELLO], State.HELLO_SENT),
        (_S, [State.HELLO_SENT], "recv", [_T.WELCOME], State.ESTABLISHED),
        (_S, [State.START, State.HELLO_SENT], "recv", [_T.REFUSE], State.CLOSED),
        # a receiver that takes a while to answer (opening a job, recovering its journal)
        # pings meanwhile, so a silent peer is known not to be a receiver at all
        (_S, [State.HELLO_SENT], "recv", [_T.PING], State.HELLO_SENT),
        (_R, [State.START], "recv", [_T.HELLO], State.HELLO_RECEIVED),
        (_R, [State.HELLO_RECEIVED], "send", [_T.WELCOME], State.ESTABLISHED),
        (_R, [State.START, State.HELLO_RECEIVED], "send", [_T.REFUSE], State.CLOSED),
        (_R, [State.HELLO_RECEIVED], "send", [_T.PING], State.HELLO_RECEIVED),
        # a receiver that could not accept a Hello (bad version, bad fields) refuses it
        (_R, [State.ERROR], "send", [_T.REFUSE], State.ERROR),
    )


def _expand() -> dict[_Key, State]:
    table: dict[_Key, State] = {}
    for role, states, direction, types, new in _rules():
        for state in states:
            for mtype in types:
                key = (role, state, direction, mtype)
                assert key not in table, f"duplicate transition {key}"
                table[key] = new
    return table


TRANSITIONS: Final[dict[_Key, State]] = _expand()
# the types each role may receive in ESTABLISHED (limit_for_next_frame's fast path)
_RECV_ESTABLISHED: Final = {
    role: frozenset(
        t for r, s, d, t in TRANSITIONS if (r, s, d) == (role, State.ESTABLISHED, "recv")
    )
    for role in Role
}


@dataclass(slots=True)
class _PendingManifest:
    volume: str
    extent_size: int
    next_extent: int = 0
    exists: bool | None = None
    size: int = 0


class ProtocolConnection:
    """One end of a replication connection, without I/O.

    ``window`` (receiver): the credit window it means to grant; pass ``conn.window`` in
    Welcome. What counts is the Welcome actually sent: its ``window`` becomes the
    peer's credit. On the sender, ``window`` becomes the peer's Welcome.window.

    ``credit``: on the sender, payload bytes it may still send; on the receiver, payload
    bytes the peer may still send (granted minus received). Credit counts the
    uncompressed ``Records.payload``.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        window: int = DEFAULT_WINDOW,
        compress: bool = True,
        compress_threshold: int = COMPRESS_THRESHOLD,
    ) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, not {role!r}")
        if not 0 <= window <= I64_MAX:
            raise ValueError(f"window {window} out of range")
        self.role = role
        self.max_frame = max_frame
        self.window = window
        self.compress = compress
        self.compress_level = 0  # lz4 level when compressing (0: fast; see encode_frame)
        self.compress_threshold = compress_threshold
        # the peer's Welcome allowed Records frames whose checksum leaves out the payload
        # (frames.RECORDS_CHECKED: the receiver checks each record's own checksum)
        self.records_checked = False
        self.state = State.START
        self.stats = TransferStats()
        self.error: ProtocolError | None = None  # what moved us to ERROR (a detached copy)
        self._decoder = FrameDecoder(max_frame, limits=self)
        self._recv_established = _RECV_ESTABLISHED[role]
        self._eof = False
        self._greeted = False  # the peer's Hello (we receive) or Welcome (we send) arrived
        self._closed_event: ConnectionClosed | None = None
        self._credit = 0
        # highest LSN carried by Records so far (starts at Welcome.received_lsn)
        self._last_lsn = 0
        self._acked = (0, 0)  # (received_lsn, applied_lsn) of the latest Welcome/Ack
        self._manifests: dict[int, _PendingManifest] = {}
        self._trees: set[int] = set()  # outstanding TreeRequest ids
        self._reads: dict[int, tuple[int, int]] = {}  # outstanding ReadRequests: (offset, length)

    # -- properties ---------------------------------------------------------------------------

    @property
    def their_role(self) -> Role:
        return self.role.peer

    @property
    def credit(self) -> int:
        return self._credit

    @property
    def last_lsn(self) -> int:
        """Highest LSN sent (sender) or received (receiver) in Records, or the resume point."""
        return self._last_lsn

    @property
    def acked(self) -> tuple[int, int]:
        """(received_lsn, applied_lsn) of the latest Welcome or Ack sent/received."""
        return self._acked

    @property
    def handshake_received(self) -> bool:
        """True once the peer's part of the handshake arrived: a valid Hello (receiver) or
        Welcome (sender). Until then the peer is a stranger (see limit_for_next_frame)."""
        return self._greeted

    @property
    def buffer_bytes(self) -> int:
        """Bytes of input buffers held for this connection (what the peer costs us)."""
        return self._decoder.allocated

    @property
    def buffer_high_water(self) -> int:
        """The most ``buffer_bytes`` has been."""
        return self._decoder.high_water

    def limit_for_next_frame(self, mtype: MessageType) -> FrameLimit:
        """What the peer's next frame of type ``mtype`` may announce in the current state.

        The decoder asks on every prefix, before it allocates anything for the frame.
        A type that is out of turn raises RemoteProtocolError here already (a stranger
        gets no further than its prefix). The prefix of a frame is parsed only after the
        frames before it were returned by next_event, and everything the peer may
        legitimately send was sent after it saw the messages that allow it, which we
        counted when we sent them (Welcome, Credit, ManifestRequest): a frame that passes
        the later checks always passes this one.
        """
        state = self.state
        if state is State.ESTABLISHED:  # every frame of a session: a set, not the table
            if mtype not in self._recv_established:
                raise self._out_of_turn(MESSAGE_CLASSES[mtype].__name__)
        elif (self.role, state, "recv", mtype) not in TRANSITIONS:
            raise self._out_of_turn(MESSAGE_CLASSES[mtype].__name__)
        if mtype is MessageType.RECORDS:
            return (MAX_BULK_HEADER, self._credit, "the credit window")
        if mtype is MessageType.HELLO:
            return _HELLO_LIMIT
        if mtype is MessageType.TREE:
            if not self._trees:
                raise RemoteProtocolError(
                    "peer sent a Tree for a request that is not outstanding (none is)"
                )
            return _TREE_LIMIT
        if mtype is MessageType.READ_DATA:
            if not self._reads:
                raise RemoteProtocolError(
                    "peer sent ReadData for a request that is not outstanding (none is)"
                )
            return _READ_LIMIT
        if mtype is MessageType.MANIFEST:
            if not self._manifests:
                raise RemoteProtocolError(
                    "peer sent a Manifest for a request that is not outstanding (none is)"
                )
            return _MANIFEST_LIMIT
        return _CONTROL_LIMIT

    # -- input --------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the peer; ``b""`` means the peer closed its end (EOF)."""
        if self._eof:
            if len(data):
                raise RuntimeError("receive_data() called with data after EOF")
            return
        if not len(data):
            self._eof = True
            self._decoder.eof()  # a frame cut short can never complete: its buffer goes now
            return
        self._decoder.feed(data)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Zero-copy input, as in asyncio.BufferedProtocol: a buffer for the next bytes."""
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the buffer from get_buffer()."""
        if self._eof:
            raise RuntimeError("buffer_updated() after EOF")
        self._decoder.buffer_updated(nbytes)

    @property
    def ready(self) -> bool:
        """True when next_event() has something for the caller (an event or an error)."""
        return self._decoder.ready() or self.state is State.ERROR or self._eof

    def next_event(self) -> Message | NeedData | ConnectionClosed:
        """The next message from the peer, NEED_DATA, or ConnectionClosed after EOF."""
        if self.state is State.ERROR:
            assert self.error is not None
            raise detached(self.error)
        if self._closed_event is not None:
            return self._closed_event
        try:
            frame = self._decoder.next_frame()  # at EOF it raises on a frame cut short
            if frame is None:
                if not self._eof:
                    return NEED_DATA
                clean = self.state in (State.CLOSED, State.GOODBYE_SENT, State.GOODBYE_RECEIVED)
                self.state = State.CLOSED
                self._closed_event = ConnectionClosed(clean)
                self._decoder.release()
                return self._closed_event
            msg = frame.message
            new = self._transition("recv", msg)
            self._check_recv(msg)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        self._apply("recv", msg)
        self.state = new
        stats = self.stats
        stats.frames_received += 1
        stats.bytes_received += frame.wire_size
        stats.payload_received += frame.payload_raw
        stats.payload_received_wire += frame.payload_wire
        return msg

    # -- output -------------------------------------------------------------------------------

    def encode(self, msg: Message) -> EncodedFrame:
        """Encode a message with this connection's settings, changing no state.

        A pure function of the message (lz4 and blake3 release the GIL), so a caller
        may run it in a worker thread and pass the result to ``send(msg, encoded=...)``.
        """
        return encode_frame(
            msg,
            compress=self.compress,
            compress_threshold=self.compress_threshold,
            max_frame=self.max_frame,
            level=self.compress_level,
            records_checked=self.records_checked,
        )

    def send(
        self, msg: Message, *, encoded: EncodedFrame | None = None
    ) -> list[bytes | memoryview]:
        """Check a message against the protocol, encode it (unless ``encoded`` is its
        encoding from ``encode()``), and return the buffers to write, in order."""
        if encoded is not None and encoded.message is not msg:
            raise ValueError("encoded is not the encoding of this message")
        try:
            new = self._transition("send", msg)
            self._check_send(msg)
            frame = self.encode(msg) if encoded is None else encoded
            _check_header_bound(frame)
        except LocalProtocolError as exc:
            self._fail(exc)
            raise
        self._apply("send", msg)
        self.state = new
        stats = self.stats
        stats.frames_sent += 1
        stats.bytes_sent += frame.wire_size
        stats.payload_sent += frame.payload_raw
        stats.payload_sent_wire += frame.payload_wire
        return frame.buffers

    # -- rules --------------------------------------------------------------------------------

    def _fail(self, exc: ProtocolError) -> None:
        if self.state is not State.ERROR:
            self.state = State.ERROR
            # the caller gets exc itself, with its traceback; see detached() for why not us
            self.error = detached(exc)
        self._decoder.release()  # nothing is received in ERROR

    def _transition(self, direction: Direction, msg: Message) -> State:
        mtype = message_type(msg)
        new = TRANSITIONS.get((self.role, self.state, direction, mtype))
        if new is not None:
            return new
        if direction == "send" and self.state is State.ERROR:
            raise ConnectionFailedError(
                f"a {self.role.value} cannot send {type(msg).__name__}: the connection "
                f"failed earlier ({self.error})",
                None if self.error is None else detached(self.error),
            )
        if direction == "send":
            raise LocalProtocolError(
                f"a {self.role.value} cannot send {type(msg).__name__} in state {self.state.value}"
            )
        raise self._out_of_turn(type(msg).__name__)

    def _out_of_turn(self, name: str) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"the {self.their_role.value} sent {name} out of turn (our state: {self.state.value})"
        )

    def _check_send(self, msg: Message) -> None:
        err = LocalProtocolError
        if isinstance(msg, Hello | Welcome):
            if msg.protocol_version != PROTOCOL_VERSION:
                raise err(
                    f"this code speaks protocol {PROTOCOL_VERSION}, not {msg.protocol_version}"
                )
        elif isinstance(msg, Records):
            if len(msg.payload) > self._credit:
                raise err(
                    f"Records payload of {len(msg.payload)} bytes exceeds the credit of "
                    f"{self._credit} the receiver granted"
                )
            self._check_lsn_order(msg, err)
        elif isinstance(msg, Ack):
            self._check_ack(msg, err)
        elif isinstance(msg, Credit):
            if self._credit + msg.window_bytes > I64_MAX:
                raise err("credit would overflow 63 bits")
        elif isinstance(msg, ManifestRequest):
            self._check_manifest_request(msg, err)
        elif isinstance(msg, Manifest):
            self._check_manifest(msg, err)
        elif isinstance(msg, TreeRequest | Tree):
            self._check_tree(msg, err)
        elif isinstance(msg, ReadRequest | ReadData):
            self._check_read(msg, err)

    def _check_recv(self, msg: Message) -> None:
        err = RemoteProtocolError
        if isinstance(msg, Hello | Welcome):
            if msg.protocol_version != PROTOCOL_VERSION:
                raise VersionMismatchError(msg.protocol_version, PROTOCOL_VERSION, "protocol")
        elif isinstance(msg, Records):
            if len(msg.payload) > self._credit:
                raise err(
                    f"peer exceeded credit window: Records payload of {len(msg.payload)} bytes, "
                    f"{self._credit} bytes of credit left"
                )
            self._check_lsn_order(msg, err)
        elif isinstance(msg, Ack):
            self._check_ack(msg, err)
        elif isinstance(msg, Credit):
            if self._credit + msg.window_bytes > I64_MAX:
                raise err("peer granted credit beyond 63 bits")
        elif isinstance(msg, ManifestRequest):
            self._check_manifest_request(msg, err)
        elif isinstance(msg, Manifest):
            self._check_manifest(msg, err)
        elif isinstance(msg, TreeRequest | Tree):
            self._check_tree(msg, err)
        elif isinstance(msg, ReadRequest | ReadData):
            self._check_read(msg, err)

    def _check_read(self, msg: ReadRequest | ReadData, err: type[ProtocolError]) -> None:
        pending = self._reads.get(msg.request_id)
        if isinstance(msg, ReadRequest):
            if pending is not None or len(self._reads) >= MAX_PENDING_MANIFESTS:
                raise err(f"ReadRequest id {msg.request_id} is in use, or too many outstanding")
            return
        if pending is None:
            raise err(f"ReadData for request {msg.request_id}, which is not outstanding")
        offset, length = pending
        if msg.offset != offset or len(msg.data) > length:
            raise err(
                f"ReadData for request {msg.request_id} carries {len(msg.data)} bytes at "
                f"{msg.offset}; the request was {length} bytes at {offset}"
            )

    def _check_tree(self, msg: TreeRequest | Tree, err: type[ProtocolError]) -> None:
        outstanding = msg.request_id in self._trees
        if isinstance(msg, Tree) and not outstanding:
            raise err(f"Tree for request {msg.request_id}, which is not outstanding")
        if isinstance(msg, TreeRequest) and (
            outstanding or len(self._trees) >= MAX_PENDING_MANIFESTS
        ):
            raise err(f"TreeRequest id {msg.request_id} is in use, or too many outstanding")

    def _check_lsn_order(self, msg: Records, err: type[ProtocolError]) -> None:
        if msg.first_lsn <= self._last_lsn:
            raise err(
                f"Records LSNs must increase: first_lsn {msg.first_lsn} is not above "
                f"{self._last_lsn}, the last LSN already sent or acknowledged"
            )

    def _check_ack(self, msg: Ack, err: type[ProtocolError]) -> None:
        received, applied = self._acked
        if msg.received_lsn > self._last_lsn:
            raise err(
                f"Ack of received_lsn {msg.received_lsn}, but records were only sent up to "
                f"{self._last_lsn}"
            )
        if msg.received_lsn < received or msg.applied_lsn < applied:
            raise err(
                f"Ack ({msg.received_lsn}, {msg.applied_lsn}) goes back from "
                f"({received}, {applied})"
            )

    def _check_manifest_request(self, msg: ManifestRequest, err: type[ProtocolError]) -> None:
        if msg.request_id in self._manifests:
            raise err(f"ManifestRequest id {msg.request_id} is already in use")
        if len(self._manifests) >= MAX_PENDING_MANIFESTS:
            raise err(f"more than {MAX_PENDING_MANIFESTS} ManifestRequests outstanding")

    def _check_manifest(self, msg: Manifest, err: type[ProtocolError]) -> None:
        if len(msg.digests) > MAX_MANIFEST_PART:
            raise err(
                f"Manifest part of {len(msg.digests)} digest bytes exceeds the limit of "
                f"{MAX_MANIFEST_PART}"
            )
        pending = self._manifests.get(msg.request_id)
        if pending is None:
            raise err(f"Manifest for request {msg.request_id}, which is not outstanding")
        if msg.volume != pending.volume or msg.extent_size != pending.extent_size:
            raise err(
                f"Manifest for request {msg.request_id} is for {msg.volume!r} in extents of "
                f"{msg.extent_size}; the request was {pending.volume!r} in {pending.extent_size}"
            )
        if pending.exists is not None and (msg.exists, msg.size) != (pending.exists, pending.size):
            raise err(f"Manifest parts of request {msg.request_id} disagree on the volume size")
        if msg.first_extent != pending.next_extent:
            raise err(
                f"Manifest part of request {msg.request_id} starts at extent {msg.first_extent}, "
                f"expected {pending.next_extent}"
            )

    def _apply(self, direction: Direction, msg: Message) -> None:
        """State effects of a message that passed the checks."""
        sending_side = direction == "send"
        if isinstance(msg, Welcome):
            self._credit = msg.window
            self._last_lsn = msg.received_lsn
            self._acked = (msg.received_lsn, msg.applied_lsn)
            if not sending_side:
                self.window = msg.window
                self._greeted = True
                self.records_checked = CAP_RECORDS_CHECKED in msg.capabilities
            # the peer is a session partner now: read a run of small frames in few calls
            self._decoder.readahead = READAHEAD
        elif isinstance(msg, Hello) and not sending_side:
            self._greeted = True
        elif isinstance(msg, Records):
            self._credit -= len(msg.payload)
            self._last_lsn = msg.last_lsn
        elif isinstance(msg, Credit):
            self._credit += msg.window_bytes
        elif isinstance(msg, Ack):
            self._acked = (msg.received_lsn, msg.applied_lsn)
        elif isinstance(msg, ManifestRequest):
            self._manifests[msg.request_id] = _PendingManifest(msg.volume, msg.extent_size)
        elif isinstance(msg, Manifest):
            if msg.done:
                del self._manifests[msg.request_id]
            else:
                pending = self._manifests[msg.request_id]
                pending.exists, pending.size = msg.exists, msg.size
                pending.next_extent = msg.end_extent
        elif isinstance(msg, TreeRequest):
            self._trees.add(msg.request_id)
        elif isinstance(msg, Tree) and msg.done:
            self._trees.discard(msg.request_id)
        elif isinstance(msg, ReadRequest):
            self._reads[msg.request_id] = (msg.offset, msg.length)
        elif isinstance(msg, ReadData):
            del self._reads[msg.request_id]


_HELLO_LIMIT: Final[FrameLimit] = (
    MAX_HELLO_FRAME - PREFIX_SIZE,
    0,
    f"the {MAX_HELLO_FRAME}-byte Hello limit",
)
_MANIFEST_LIMIT: Final[FrameLimit] = (MAX_BULK_HEADER, MAX_MANIFEST_PART, "the Manifest part limit")
_TREE_LIMIT: Final[FrameLimit] = (MAX_BULK_HEADER, MAX_TREE_PART, "the Tree part limit")
_READ_LIMIT: Final[FrameLimit] = (MAX_BULK_HEADER, MAX_READ, "the ReadData limit")
_CONTROL_LIMIT: Final[FrameLimit] = (
    MAX_CONTROL_FRAME - PREFIX_SIZE,
    0,
    f"the {MAX_CONTROL_FRAME}-byte control-frame limit",
)


def _header_bound(mtype: MessageType) -> int:
    if mtype is MessageType.HELLO:
        return MAX_HELLO_FRAME - PREFIX_SIZE
    if mtype in (
        MessageType.RECORDS,
        MessageType.MANIFEST,
        MessageType.TREE,
        MessageType.READ_DATA,
    ):
        return MAX_BULK_HEADER
    return MAX_CONTROL_FRAME - PREFIX_SIZE


def _check_header_bound(frame: EncodedFrame) -> None:
    """Never send a frame whose header the peer's limit_for_next_frame would refuse. The
    message constructors keep every header within bounds (test_limits.py builds the
    worst cases); this catches a field added without updating the bounds."""
    header = len(frame.buffers[0]) - PREFIX_SIZE
    bound = _header_bound(message_type(frame.message))
    if header > bound:
        raise LocalProtocolError(
            f"{type(frame.message).__name__} header of {header} bytes exceeds the "
            f"protocol's bound of {bound}"
        )
