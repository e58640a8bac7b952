"""Sans-IO codec for the server side of the NBD fixed-newstyle protocol.

No sockets here: the I/O adapter (``server.py``) lets the socket read straight into
:meth:`ServerConnection.get_buffer` and reports with
:meth:`ServerConnection.buffer_updated` (or hands over bytes it has with
:meth:`ServerConnection.receive_data`), pulls events with
:meth:`ServerConnection.next_event` and writes the bytes the reply methods return.
The same object serves asyncio, the unit tests and the fuzzers.

A large WRITE's payload is read into a buffer of its own, which becomes the request's
``data``: the bytes cross from the socket to the request in one copy, and a 1 MiB request
is not gathered piecewise in a buffer that grows and shifts.

Wire formats (all integers big endian; NetworkBlockDevice/nbd ``doc/proto.md``)::

    greeting  S: "NBDMAGIC" u64 | "IHAVEOPT" u64 | handshake flags u16
              C: client flags u32
    option    C: "IHAVEOPT" u64 | option u32 | length u32 | data
    opt reply S: 0x3e889045565a9 u64 | option u32 | reply type u32 | length u32 | data
    request   C: 0x25609513 u32 | flags u16 | type u16 | handle u64 | offset u64 | length u32
              (+ length bytes of payload for NBD_CMD_WRITE)
    reply     S: 0x67446698 u32 | error u32 | handle u64 (+ data for a successful read)

Only simple replies are produced; ``NBD_OPT_STRUCTURED_REPLY`` is refused, which
every client must accept. Everything that affects state transitions lives in
``_TRANSITIONS``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag, auto
from typing import Final, NamedTuple

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698

MAX_STRING: Final = 4096  # export names and messages (spec: MUST be no longer)
MAX_OPTION_DATA: Final = 64 * 1024  # no option we know needs more; beyond is abuse
DEFAULT_MAX_REQUEST: Final = 32 * 1024 * 1024
# An over-long WRITE payload up to this size is read and thrown away so the client gets
# a clean EINVAL; beyond it we cannot trust the length field and hang up instead.
MAX_SKIP: Final = 256 * 1024 * 1024
# WRITE payloads at least this long, not yet all received, are read straight into a
# buffer of their own; shorter ones wait in the receive buffer with the headers.
DIRECT_PAYLOAD: Final = 64 * 1024
# The least room get_buffer offers outside a payload (a read of headers and small writes).
MIN_READ: Final = 128 * 1024
# ... and before transmission: a connection costs memory only as its client sends bytes
# (one option is at most 16 + MAX_OPTION_DATA), not a read buffer per idle connection.
HANDSHAKE_READ: Final = 4096

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")

REQUEST_SIZE: Final = _REQUEST.size  # 28
# native.py's scan_writes: (buffer, pos, end, max_length, file_size, max_count) -> (count,
# bytes consumed, payload bytes)
ScanWrites = Callable[[bytearray, int, int, int, int, int], tuple[int, int, int]]
REPLY_SIZE: Final = _REPLY.size  # 16


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class Errno(IntEnum):
    """The only error values the protocol allows on the wire."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class NbdProtocolError(Exception):
    """Base of the two codec errors; either one moves the connection to ERROR."""


class NbdClientError(NbdProtocolError):
    """The client broke the protocol; the only safe reaction is to hang up."""


class NbdUsageError(NbdProtocolError):
    """The server code misused this codec (a bug on our side)."""


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionExportName:
    """NBD_OPT_EXPORT_NAME: answer with ``accept_export_name`` or ``reject_export_name``.

    ``name`` is None when the bytes are not a valid NBD string (it matches no export).
    """

    name: str | None


@dataclass(frozen=True, slots=True)
class OptionGo:
    """NBD_OPT_GO (``go``) or NBD_OPT_INFO: answer with ``accept_go`` or ``reply_error``."""

    name: str
    info_requests: tuple[int, ...]
    go: bool

    @property
    def option(self) -> Opt:
        return Opt.GO if self.go else Opt.INFO


@dataclass(frozen=True, slots=True)
class OptionList:
    """NBD_OPT_LIST: answer with ``reply_list``."""


@dataclass(frozen=True, slots=True)
class OptionAbort:
    """NBD_OPT_ABORT: answer with ``reply_abort`` (the connection then ends)."""


@dataclass(frozen=True, slots=True)
class OptionOther:
    """Any other option (or a known one with a malformed payload, ``invalid`` says why).

    Answer with ``reply_error`` (ERR_UNSUP, or ERR_INVALID when ``invalid`` is set).
    """

    option: int
    data: bytes
    invalid: str | None = None


class Request(NamedTuple):
    """One transmission-phase request; ``data`` is the payload of a WRITE.

    A NamedTuple, not a frozen dataclass: one is built per request, and building a
    frozen dataclass costs several times as much.
    """

    cmd: int
    flags: int
    handle: int
    offset: int
    length: int
    # a large payload is a read-only view of the buffer it was received into, handed
    # over: nothing else holds or changes that buffer
    data: bytes | memoryview = b""


@dataclass(frozen=True, slots=True)
class OversizedRequest:
    """A request longer than ``max_request``; its payload (if any) was skipped.

    The server answers it with an error reply; the connection stays usable.
    """

    cmd: int
    flags: int
    handle: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: finish in-flight requests, then close. Nothing more will be read."""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

OptionEvent = OptionExportName | OptionGo | OptionList | OptionAbort | OptionOther
Event = OptionEvent | Request | OversizedRequest | Disconnect


# --- state machine -------------------------------------------------------------------


class Phase(Enum):
    CLIENT_FLAGS = auto()  # greeting sent, waiting for the client's flags
    OPTIONS = auto()  # option haggling, ready to read the next option
    OPTION_PENDING = auto()  # an option was handed out; waiting for our final reply
    TRANSMISSION = auto()
    CLOSED = auto()  # after ABORT, DISC or a refused EXPORT_NAME
    ERROR = auto()


class _Step(Enum):
    CLIENT_FLAGS = auto()
    OPTION = auto()
    OPTION_REPLIED = auto()
    ENTER_TRANSMISSION = auto()
    CLOSE = auto()
    REQUEST = auto()


# Every transition the codec can make; anything absent is a NbdUsageError.
_TRANSITIONS: Final[dict[tuple[Phase, _Step], Phase]] = {
    (Phase.CLIENT_FLAGS, _Step.CLIENT_FLAGS): Phase.OPTIONS,
    (Phase.OPTIONS, _Step.OPTION): Phase.OPTION_PENDING,
    (Phase.OPTION_PENDING, _Step.OPTION_REPLIED): Phase.OPTIONS,
    (Phase.OPTION_PENDING, _Step.ENTER_TRANSMISSION): Phase.TRANSMISSION,
    (Phase.OPTION_PENDING, _Step.CLOSE): Phase.CLOSED,
    (Phase.TRANSMISSION, _Step.REQUEST): Phase.TRANSMISSION,
    (Phase.TRANSMISSION, _Step.CLOSE): Phase.CLOSED,
}


@dataclass(frozen=True, slots=True)
class BlockSize:
    """NBD_INFO_BLOCK_SIZE: the request sizes the export handles (min, preferred, max)."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = DEFAULT_MAX_REQUEST

    def __post_init__(self) -> None:
        for v in (self.minimum, self.preferred):
            if v <= 0 or v & (v - 1):
                raise ValueError("block size minimum/preferred must be powers of 2")
        if self.minimum > 65536 or self.preferred < max(512, self.minimum):
            raise ValueError("block size minimum must be <= 64 KiB, preferred >= 512")
        if self.maximum < self.preferred or self.maximum % self.minimum:
            raise ValueError("block size maximum must be >= preferred and a multiple of minimum")

    @classmethod
    def for_max_request(cls, max_request: int) -> BlockSize:
        """Any alignment, 4 KiB preferred (less if ``max_request`` is smaller)."""
        if max_request < 512:
            raise ValueError("max_request must be at least 512 bytes")
        preferred = min(4096, 1 << (max_request.bit_length() - 1))
        return cls(1, preferred, max_request)


class ServerConnection:
    """Server side of one NBD connection, from greeting to disconnect.

    Usage: send :meth:`greeting`, then loop ``receive_data`` / ``next_event``; answer
    every option event with one of the reply methods (the codec hands out no further
    option until the final reply was produced); in transmission, answer requests with
    the module-level :func:`reply_header` in any order.
    """

    def __init__(
        self,
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        direct_payload: int = DIRECT_PAYLOAD,
        read_size: int = MIN_READ,
    ) -> None:
        """``direct_payload``: the least WRITE payload read into a buffer of its own;
        ``read_size``: the least room :meth:`get_buffer` offers outside a payload."""
        if not 0 < max_request <= MAX_SKIP:
            raise NbdUsageError(f"max_request must be in 1..{MAX_SKIP}")
        if direct_payload < 1 or read_size < 1:
            raise NbdUsageError("direct_payload and read_size must be at least 1")
        self.max_request = max_request
        self.direct_payload = direct_payload
        self._read_size = read_size
        self.state = Phase.CLIENT_FLAGS
        self.client_flags = ClientFlag(0)
        # Received bytes are _buf[_pos:_end]. _buf never changes size (a reader may still
        # hold a view of it); it is replaced when it must grow (the first get_buffer).
        self._buf = bytearray()
        self._pos = 0
        self._end = 0
        self._skip = 0  # payload bytes of an oversized WRITE still to discard
        # ... and that WRITE, handed out once its payload is through (not before: a client
        # still sending it takes a reply to it for a server bug; libnbd hangs up)
        self._skipping: OversizedRequest | None = None
        self._pending_option: int | None = None
        # A large WRITE whose payload is being read into a buffer of its own.
        self._payload: bytearray | None = None
        self._payload_have = 0
        self._payload_head = (0, 0, 0)  # flags, handle, offset
        self._into_payload = False  # where the last get_buffer pointed

    # -- byte plumbing -----------------------------------------------------------------

    def greeting(self) -> bytes:
        return _GREETING.pack(
            NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        )

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (never empty); report them with
        :meth:`buffer_updated`. asyncio's ``BufferedProtocol.get_buffer``."""
        payload = self._payload
        if payload is not None and self._payload_have < len(payload):
            self._into_payload = True
            return memoryview(payload)[self._payload_have :]
        self._into_payload = False
        pos, end = self._pos, self._end
        if pos == end:
            self._pos = self._end = pos = end = 0
        least = self._read_size
        if self.state is not Phase.TRANSMISSION:
            least = min(least, HANDSHAKE_READ)
        room = len(self._buf) - end
        if room < least and pos:
            held = end - pos
            if held:
                self._buf[:held] = self._buf[pos:end]
            self._pos, self._end = 0, held
            end = held
            room = len(self._buf) - end
        if room < least:  # more held than a read's worth: only while events wait
            grown = bytearray(max(2 * len(self._buf), end + least))
            grown[:end] = self._buf[:end]
            self._buf = grown
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer`'s view."""
        if self._into_payload:
            self._payload_have += nbytes
            return
        if self.state in (Phase.CLOSED, Phase.ERROR):
            return  # nothing may follow DISC/ABORT; after an error we only wait to hang up
        if self._skip:
            dropped = min(self._skip, nbytes)
            self._skip -= dropped
            nbytes -= dropped
            if nbytes:
                end = self._end
                self._buf[end : end + nbytes] = self._buf[end + dropped : end + dropped + nbytes]
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes already received elsewhere (one copy into the codec's buffers)."""
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                with self.get_buffer() as target:
                    n = min(len(target), len(view) - done)
                    target[:n] = view[done : done + n]
                self.buffer_updated(n)
                done += n

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (for flow control)."""
        return self._end - self._pos + (self._payload_have if self._payload is not None else 0)

    def _available(self) -> int:
        return self._end - self._pos

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:
            out = bytes(view[self._pos : self._pos + n])
        self._pos += n
        return out

    def _step(self, step: _Step) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, step)]
        except KeyError:
            raise NbdUsageError(f"cannot {step.name} in state {self.state.name}") from None

    def _fail(self, message: str) -> NbdClientError:
        self.state = Phase.ERROR
        return NbdClientError(message)

    # -- events --------------------------------------------------------------------------

    def next_event(self) -> Event | _NeedData:
        """The next complete event, or NEED_DATA. Raises NbdClientError on garbage."""
        state = self.state
        if state is Phase.TRANSMISSION:
            return self._next_request()
        if state is Phase.OPTIONS:
            return self._next_option()
        if state is Phase.CLIENT_FLAGS:
            if self._available() < _CLIENT_FLAGS.size:
                return NEED_DATA
            (flags,) = _CLIENT_FLAGS.unpack(self._take(_CLIENT_FLAGS.size))
            if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
                raise self._fail(f"client set unknown handshake flags {flags:#x}")
            self.client_flags = ClientFlag(flags)
            self._step(_Step.CLIENT_FLAGS)
            return self._next_option()
        return NEED_DATA  # OPTION_PENDING, CLOSED, ERROR: nothing to hand out

    def _next_option(self) -> OptionEvent | _NeedData:
        if self._available() < _OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = _OPTION_HEADER.unpack_from(self._buf, self._pos)
        if magic != IHAVEOPT:
            raise self._fail(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            raise self._fail(f"option {option} carries {length} bytes (limit {MAX_OPTION_DATA})")
        if self._available() < _OPTION_HEADER.size + length:
            return NEED_DATA
        self._pos += _OPTION_HEADER.size
        data = self._take(length)
        self._pending_option = option
        self._step(_Step.OPTION)
        return _parse_option(option, data)

    def _next_request(self) -> Request | OversizedRequest | Disconnect | _NeedData:
        skipping = self._skipping
        if skipping is not None:
            if self._skip:
                return NEED_DATA
            self._skipping = None
            return skipping
        payload = self._payload
        if payload is not None:
            if self._payload_have < len(payload):
                return NEED_DATA
            self._payload = None
            flags, handle, offset = self._payload_head
            # handed over read-only: the record keeps it without a copy (journal/records.py)
            return Request(
                _WRITE, flags, handle, offset, len(payload), memoryview(payload).toreadonly()
            )
        if self._available() < REQUEST_SIZE:
            return NEED_DATA
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(self._buf, self._pos)
        if magic != REQUEST_MAGIC:
            raise self._fail(f"bad request magic {magic:#x}")
        if cmd == _WRITE:
            if length > self.max_request:
                if length > MAX_SKIP:
                    raise self._fail(f"WRITE of {length} bytes: payload too large to skip")
                self._pos += REQUEST_SIZE
                have = min(self._available(), length)
                self._pos += have
                self._skip = length - have
                refused = OversizedRequest(cmd, flags, handle, offset, length)
                if self._skip:
                    self._skipping = refused
                    return NEED_DATA
                return refused
            if self._available() < REQUEST_SIZE + length:
                if length < self.direct_payload:
                    return NEED_DATA
                self._pos += REQUEST_SIZE
                return self._receive_payload(flags, handle, offset, length)
            self._pos += REQUEST_SIZE
            return Request(cmd, flags, handle, offset, length, self._take(length))
        self._pos += REQUEST_SIZE
        if cmd == _DISC:
            self._step(_Step.CLOSE)
            self._pos = self._end = 0
            return Disconnect()
        if cmd == _READ and length > self.max_request:
            return OversizedRequest(cmd, flags, handle, offset, length)
        return Request(cmd, flags, handle, offset, length)

    def take_writes(
        self, scan: ScanWrites, file_size: int, max_count: int
    ) -> tuple[bytes, int, int] | None:
        """The run of plain WRITEs received whole at the front of the buffer, taken out
        for the batch path (``native.py``): (their bytes as received, count, payload
        bytes), or None when the next event is anything else (``next_event`` has it).
        ``scan`` decides which qualify: no flags, a payload short enough to have come with
        the headers, inside ``file_size``."""
        if (
            self.state is not Phase.TRANSMISSION
            or self._payload is not None
            or self._skipping is not None
            or self._skip
        ):
            return None
        pos = self._pos
        max_length = min(self.max_request, self.direct_payload)
        count, consumed, payload = scan(self._buf, pos, self._end, max_length, file_size, max_count)
        if not count:
            return None
        with memoryview(self._buf) as view:
            batch = bytes(view[pos : pos + consumed])
        self._pos = pos + consumed
        return batch, count, payload

    def _receive_payload(self, flags: int, handle: int, offset: int, length: int) -> _NeedData:
        """Go on reading a WRITE's payload into a buffer of its own (what has arrived of
        it moves there now)."""
        have = self._available()
        payload = bytearray(length)
        with memoryview(self._buf) as view:
            payload[:have] = view[self._pos : self._end]
        self._pos = self._end
        self._payload = payload
        self._payload_have = have
        self._payload_head = (flags, handle, offset)
        return NEED_DATA

    # -- option replies -----------------------------------------------------------------

    def _reply_to(self, option: int) -> None:
        if self.state is not Phase.OPTION_PENDING or self._pending_option != option:
            raise NbdUsageError(f"no option {option} is waiting for a reply")

    def _final(self, option: int, step: _Step) -> None:
        self._reply_to(option)
        self._pending_option = None
        self._step(step)

    def reply_error(self, option: int, rep: Rep, message: str = "") -> bytes:
        """Final error reply (any ``Rep.ERR_*``) with an optional human-readable message."""
        if rep < (1 << 31):
            raise NbdUsageError(f"{rep!r} is not an error reply")
        self._final(option, _Step.OPTION_REPLIED)
        # cut to the spec's limit on a character boundary (the message is UTF-8)
        raw = message.encode()[:MAX_STRING].decode(errors="ignore").encode()
        return option_reply(option, rep, raw)

    def reply_ack(self, option: int) -> bytes:
        """Final NBD_REP_ACK for an option that needs no data (the connection continues)."""
        self._final(option, _Step.OPTION_REPLIED)
        return option_reply(option, Rep.ACK)

    def reply_list(self, names: list[str]) -> bytes:
        self._reply_to(Opt.LIST)
        parts = [option_reply(Opt.LIST, Rep.SERVER, _string(n)) for n in names]
        self._final(Opt.LIST, _Step.OPTION_REPLIED)
        parts.append(option_reply(Opt.LIST, Rep.ACK))
        return b"".join(parts)

    def reply_abort(self) -> bytes:
        self._final(Opt.ABORT, _Step.CLOSE)
        return option_reply(Opt.ABORT, Rep.ACK)

    def accept_go(self, event: OptionGo, size: int, flags: int, block: BlockSize) -> bytes:
        """INFO replies and the final ACK; for NBD_OPT_GO this enters transmission."""
        self._reply_to(event.option)
        info_export = _INFO_EXPORT.pack(Info.EXPORT, size, flags | TransmissionFlag.HAS_FLAGS)
        # The spec lets a server send NBD_INFO_BLOCK_SIZE unasked; clients honour it.
        info_block = _INFO_BLOCK_SIZE.pack(
            Info.BLOCK_SIZE, block.minimum, block.preferred, block.maximum
        )
        parts = [
            option_reply(event.option, Rep.INFO, info_export),
            option_reply(event.option, Rep.INFO, info_block),
            option_reply(event.option, Rep.ACK),
        ]
        self._final(event.option, _Step.ENTER_TRANSMISSION if event.go else _Step.OPTION_REPLIED)
        return b"".join(parts)

    def accept_export_name(self, size: int, flags: int) -> bytes:
        self._final(Opt.EXPORT_NAME, _Step.ENTER_TRANSMISSION)
        out = _EXPORT_NAME_REPLY.pack(size, flags | TransmissionFlag.HAS_FLAGS)
        if not self.client_flags & ClientFlag.NO_ZEROES:
            out += bytes(124)
        return out

    def reject_export_name(self) -> bytes:
        """EXPORT_NAME cannot carry an error: the spec requires hanging up instead."""
        self._final(Opt.EXPORT_NAME, _Step.CLOSE)
        return b""

    def close(self) -> None:
        """The server is ending the session (after DISC or its own shutdown)."""
        if self.state not in (Phase.CLOSED, Phase.ERROR):
            self.state = Phase.CLOSED


# --- pure helpers ----------------------------------------------------------------------


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack(">I", len(raw)) + raw


def option_reply(option: int, rep: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, rep, len(data)) + data


def reply_header(handle: int, error: int = 0) -> bytes:
    """Simple reply header; for a successful READ the data follows it."""
    return _REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def _decode_name(raw: bytes) -> str | None:
    if len(raw) > MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _parse_option(option: int, data: bytes) -> OptionEvent:
    if option == Opt.EXPORT_NAME:
        return OptionExportName(_decode_name(data))
    if option == Opt.ABORT:
        return OptionAbort()
    if option == Opt.LIST:
        if data:
            return OptionOther(option, data, "NBD_OPT_LIST carries no data")
        return OptionList()
    if option in (Opt.GO, Opt.INFO):
        return _parse_go(option, data)
    return OptionOther(option, data)


def _parse_go(option: int, data: bytes) -> OptionGo | OptionOther:
    if len(data) < 6:
        return OptionOther(option, data, "option too short")
    (name_len,) = struct.unpack_from(">I", data)
    if len(data) < 4 + name_len + 2:
        return OptionOther(option, data, "export name length exceeds the option")
    name = _decode_name(data[4 : 4 + name_len])
    if name is None:
        return OptionOther(option, data, "export name is not a valid string")
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    rest = data[4 + name_len + 2 :]
    if len(rest) != 2 * count:
        return OptionOther(option, data, "information request count does not match length")
    infos = struct.unpack(f">{count}H", rest)
    return OptionGo(name, infos, option == Opt.GO)


# Plain-int copies for the per-request path: IntEnum/IntFlag arithmetic runs Python
# code (and ``~`` on an IntFlag only covers the defined bits, not unknown ones).
_READ, _WRITE, _DISC, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
_TRIM, _WRITE_ZEROES = int(Cmd.TRIM), int(Cmd.WRITE_ZEROES)
_FUA, _NO_HOLE = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE)
_T_FLUSH, _T_FUA = int(TransmissionFlag.SEND_FLUSH), int(TransmissionFlag.SEND_FUA)
_T_TRIM, _T_ZEROES = int(TransmissionFlag.SEND_TRIM), int(TransmissionFlag.SEND_WRITE_ZEROES)
_T_READ_ONLY = int(TransmissionFlag.READ_ONLY)
_EINVAL, _ENOSPC, _EPERM = int(Errno.EINVAL), int(Errno.ENOSPC), int(Errno.EPERM)


def parse_request(buf: bytes | bytearray | memoryview, at: int = 0) -> Request:
    """The request whose header starts at ``at`` in ``buf``, with its payload when it is a
    WRITE (which must follow whole): a batch's requests handed back one by one."""
    magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(buf, at)
    if magic != REQUEST_MAGIC:
        raise NbdUsageError(f"bad request magic {magic:#x}")
    if cmd != _WRITE:
        return Request(cmd, flags, handle, offset, length)
    start = at + REQUEST_SIZE
    return Request(cmd, flags, handle, offset, length, bytes(buf[start : start + length]))


def check_request(req: Request, size: int, flags: int) -> int:
    """The NBD error a request deserves before it touches the export (0 when valid).

    ``flags`` are the transmission flags the export advertised. Follows the spec's
    SHOULDs: EINVAL for unknown commands and flags, ENOSPC for a WRITE or WRITE_ZEROES
    past the end (EINVAL for a READ or TRIM), EPERM for changes to a read-only export.
    """
    cmd = req.cmd
    allowed = _FUA if flags & _T_FUA else 0
    if cmd in (_READ, _WRITE):
        pass
    elif cmd == _FLUSH:
        if not flags & _T_FLUSH or req.offset or req.length:
            return _EINVAL
    elif cmd == _TRIM:
        if not flags & _T_TRIM:
            return _EINVAL
    elif cmd == _WRITE_ZEROES:
        if not flags & _T_ZEROES:
            return _EINVAL
        allowed |= _NO_HOLE
    else:
        return _EINVAL
    if req.flags & ~allowed:
        return _EINVAL
    if cmd == _FLUSH:
        return 0
    writes = cmd != _READ
    if writes and flags & _T_READ_ONLY:
        return _EPERM
    if req.length == 0:
        return _EINVAL
    if req.offset + req.length > size:
        return _ENOSPC if cmd in (_WRITE, _WRITE_ZEROES) else _EINVAL
    return 0
