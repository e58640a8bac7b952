"""Frame codec: one message <-> one checksummed, optionally compressed frame.

Layout (little endian; ``docs/PROTOCOL.md`` has the table and the rules)::

    offset size field
    0      4    magic          b"RPLW"
    4      1    version        frame format version (1)
    5      1    type           MessageType
    6      1    codec          0 raw, 1 lz4 block (payload only)
    7      1    flags          0, or RECORDS_CHECKED on a Records frame (see below)
    8      4    header_len     bytes of the msgpack header that follows the prefix
    12     4    wire_len       bytes of the payload as sent
    16     4    raw_len        bytes of the payload after decompression
    20     16   checksum       blake3-128 over prefix[0:20] + header + uncompressed payload
                                   (without the payload when RECORDS_CHECKED is set)
    36     -    header (msgpack array of the message's fields except the payload),
                then the payload (Records.payload / Manifest.digests)

``RECORDS_CHECKED`` (only on a Records frame, only to a receiver whose Welcome lists the
capability ``records-checked``): the payload is a run of records that each carry their
own blake3 checksum, which the receiver verifies before it uses any record of the frame
(``ReceiverCore.records``), so the frame's checksum leaves the payload out instead of
hashing the same bytes a second time on each side (a first sync of 768 MiB of data spent
~0.4 s of each side's one busy thread on it). Headers and prefixes stay covered.

Magic and version (bytes 0..4) keep their place in every future format, so a peer
that speaks another version is always recognised as such (``VersionMismatchError``)
rather than as garbage. The payload travels outside msgpack, so it is never copied
into a packed object; ``encode_frame`` returns buffers for ``writelines``.

``FrameDecoder`` is incremental and bounded: a prefix that announces more than
``max_frame`` bytes, or more than its ``limits`` allow for that message type (the
protocol state decides: see ``ProtocolConnection.limit_for_next_frame``), is rejected
before anything is allocated; decompression is bounded by the announced raw length,
and the checksum is verified before a message is built. It offers both ``feed(bytes)``
and the ``get_buffer``/``buffer_updated`` pair of ``asyncio.BufferedProtocol``, so a
socket can read straight into the buffer of a large frame.
"""

from __future__ import annotations

import copy
import mmap
import struct
import weakref
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, Protocol, TypeAlias, TypeVar

import blake3
import lz4.block
import msgpack

from replicator.journal.records import HEADER_SIZE as RECORD_HEADER_SIZE
from replicator.journal.records import MAX_DATA, MAX_NAME
from replicator.transport.errors import LocalProtocolError as LocalProtocolError
from replicator.transport.errors import ProtocolError as ProtocolError
from replicator.transport.errors import RemoteProtocolError as RemoteProtocolError
from replicator.transport.errors import VersionMismatchError as VersionMismatchError
from replicator.transport.messages import (
    MESSAGE_CLASSES,
    PAYLOAD_FIELD,
    Hello,
    Message,
    MessageError,
    MessageType,
    VolumeInfo,
    message_type,
)

FRAME_MAGIC: Final = b"RPLW"
FRAME_VERSION: Final = 1
RECORDS_CHECKED: Final = 0x01  # frame flag: the payload's records are checked, not the frame
CAP_RECORDS_CHECKED: Final = "records-checked"  # the Welcome capability that allows it
_FIELDS = struct.Struct("<4sBBBBIII")  # the checksummed part of the prefix
PREFIX = struct.Struct("<4sBBBBIII16s")
PREFIX_SIZE: Final = PREFIX.size  # 36
CHECKSUM_SIZE: Final = 16

MAX_HEADER: Final = 2 * 1024 * 1024  # no message has a header this big: see the bounds below
# One record of MAX_DATA with the longest name must fit in one frame, with room to spare.
DEFAULT_MAX_FRAME: Final = MAX_DATA + 4 * 1024 * 1024
MIN_MAX_FRAME: Final = 64 * 1024
# the largest record plus a generous Records header
assert PREFIX_SIZE + 1024 + RECORD_HEADER_SIZE + MAX_NAME + MAX_DATA <= DEFAULT_MAX_FRAME

COMPRESS_THRESHOLD: Final = 512  # payloads shorter than this are always sent raw
# lz4 is used only when it saves at least 10%: compressed * 10 < raw * 9.
_PAYS_NUM, _PAYS_DEN = 9, 10

# Payloads from _SAMPLE_FROM bytes are first sampled (_SAMPLES x _SAMPLE_SIZE bytes);
# when the samples shrink by less than 5%, the payload is sent raw without trying. The
# bar sits 5 points above the 10% that lz4 must save: 8 KiB samples compress a little
# worse than the whole payload (less history), but data sampling at 0.95-0.97 (fio's
# buffers: 0.967-0.975, whole 0.965-0.973) would be compressed in full and then thrown
# away, which cost a quarter of the sender's CPU on 1 MiB writes.
_SAMPLE_FROM = 256 * 1024
_SAMPLES = 8
_SAMPLE_SIZE = 8 * 1024
_SAMPLE_SKIP_PERCENT = 95

# What a peer may announce in one frame, by kind (checked on the prefix, before anything
# is allocated for the frame; docs/PROTOCOL.md, "Memory bounds"). The worst cases are
# built and measured by tests/transport/test_limits.py.
# A Hello is the only frame a receiver accepts from a peer that has not said Hello yet,
# so this bounds what a stranger can make it hold. The worst Hello (MAX_VOLUMES = 12
# volumes with 4096-byte names, 64 capabilities of 64 bytes, longest job and session)
# is 54,032 bytes; with 14 volumes it would be 62,260, with 15 already 66,374.
MAX_HELLO_FRAME: Final = 64 * 1024
# Every other frame without a payload (Welcome, Refuse, Ack, Credit, ManifestRequest,
# Ping, Pong, Goodbye, Error). The largest is an Error whose 4096-character text is all
# 4-byte UTF-8: 16,489 bytes.
MAX_CONTROL_FRAME: Final = 20 * 1024
# The header of a Records (37 bytes at most) or Manifest (4,132 bytes with a 4096-byte
# volume name) frame; their payloads are bounded by credit and by MAX_MANIFEST_PART.
MAX_BULK_HEADER: Final = 8 * 1024

_BIG_FRAME = 64 * 1024  # frames with a body above this get their own exactly-sized buffer
# The staging buffer (prefixes and small frames) starts at _STAGING and grows only for a
# frame that was allowed, by at most the bytes of it already received (so what a peer can
# make us hold follows what it sent, not what it announced). Once the peer has completed
# the handshake, get_buffer also offers `readahead` bytes of room (READAHEAD), so a run
# of small frames is read in few system calls (a stream of 16 KiB frames read 64 KiB at
# a time reallocates the buffer twice in 257 reads, then only compacts it). A staging
# buffer grown beyond _STAGING + 2 * readahead (a burst) is replaced when it empties.
_STAGING = 4 * 1024
READAHEAD: Final = 64 * 1024
_SPARE_MAX = 8 * 1024 * 1024  # large-frame buffers up to this size are reused
# A body above this is assembled in anonymous memory the kernel commits page by page as
# the peer's bytes arrive (mmap), not in a bytearray zeroed whole at once: an authenticated
# peer announcing a Records frame of its whole credit (66 MiB) and sending a few bytes
# made the receiver hold all of it, per session (12 sessions: +790 MiB of RSS). Only
# above 4 MiB (twice the sender's frame target; frames that large carry one big record),
# since a mapping costs a system call and a page fault per page each time where the heap
# reuses pages already there.
_LAZY_FRAME = 4 * 1024 * 1024
_SCRAP = bytearray(4 * 1024)  # where input goes after a failure or release: it is dropped


class Codec(IntEnum):
    RAW = 0
    LZ4 = 1


_E = TypeVar("_E", bound=ProtocolError)


def detached(exc: _E) -> _E:
    """A copy of ``exc`` without traceback, cause or context, to keep and raise again.

    An exception that was raised holds the frames it passed through, and those hold the
    decoder or connection that keeps the exception: a reference cycle, which leaves a
    closed connection (and anything it still holds) to the cyclic GC. So the exception
    raised first goes to the caller with its traceback, and what is kept is a copy.
    """
    return copy.copy(exc)


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """Buffers of one frame, ready for ``writelines``, and its sizes for accounting."""

    message: Message
    buffers: list[bytes | memoryview]
    wire_size: int  # prefix + header + payload as sent
    payload_raw: int  # uncompressed payload bytes
    payload_wire: int  # payload bytes as sent
    codec: Codec
    # lz4 ran over the payload (its result kept or not); False when it was not asked for,
    # or samples said it would not pay: only such frames measure lz4's cost and ratio
    lz4_ran: bool


# --- header fields --------------------------------------------------------------------------


def _header_names(cls: type[Message]) -> tuple[str, ...]:
    payload = PAYLOAD_FIELD.get(cls)
    return tuple(name for name in cls.__dataclass_fields__ if name != payload)


_HEADER_NAMES: Final = {cls: _header_names(cls) for cls in MESSAGE_CLASSES.values()}
_HELLO_VOLUMES: Final = _HEADER_NAMES[Hello].index("volumes")


def _header_values(msg: Message) -> list[Any]:
    values: list[Any] = [getattr(msg, name) for name in _HEADER_NAMES[type(msg)]]
    if isinstance(msg, Hello):  # VolumeInfo travels as [name, size, kind]
        values[_HELLO_VOLUMES] = [(v.name, v.size, v.kind) for v in msg.volumes]
    return values


def _build(mtype: MessageType, values: object, payload: bytes | memoryview) -> Message:
    """Build a message from decoded header values; errors become RemoteProtocolError."""
    cls = MESSAGE_CLASSES[mtype]
    names = _HEADER_NAMES[cls]
    if type(values) is not tuple or len(values) != len(names):
        raise RemoteProtocolError(f"{cls.__name__} frame header is not a {len(names)}-field array")
    kwargs = dict(zip(names, values, strict=True))
    field = PAYLOAD_FIELD.get(cls)
    if field is not None:
        kwargs[field] = payload
    elif payload:
        raise RemoteProtocolError(f"{cls.__name__} frame carries a payload")
    try:
        if cls is Hello:
            volumes = kwargs["volumes"]
            if type(volumes) is not tuple or not all(
                type(v) is tuple and len(v) == 3 for v in volumes
            ):
                raise MessageError("Hello.volumes must be an array of [name, size, kind]")
            kwargs["volumes"] = tuple(VolumeInfo(*v) for v in volumes)
        return cls(**kwargs)
    except (MessageError, TypeError) as exc:
        raise RemoteProtocolError(f"invalid {cls.__name__} from peer: {exc}") from exc


# --- encoding -------------------------------------------------------------------------------


def _sample_compresses(payload: bytes | memoryview) -> bool:
    """Cheap guess whether lz4 can pay on a large payload, from evenly spread samples.

    Compressing a whole incompressible MiB costs a full output buffer and ~0.2-0.5 ms
    for nothing; the samples cost a few microseconds. Small payloads are just tried.
    """
    size = len(payload)
    if size < _SAMPLE_FROM:
        return True
    step = size // _SAMPLES
    with memoryview(payload) as view:
        packed = sum(
            len(lz4.block.compress(view[i * step : i * step + _SAMPLE_SIZE], store_size=False))
            for i in range(_SAMPLES)
        )
    return packed * 100 < _SAMPLES * _SAMPLE_SIZE * _SAMPLE_SKIP_PERCENT


def encode_frame(
    msg: Message,
    *,
    compress: bool = True,
    compress_threshold: int = COMPRESS_THRESHOLD,
    max_frame: int = DEFAULT_MAX_FRAME,
    level: int = 0,
    records_checked: bool = False,
) -> EncodedFrame:
    """Encode one message. Raises LocalProtocolError when it does not fit in a frame.

    ``level`` > 0 uses lz4's high-compression mode at that level (the same block format).
    ``records_checked``: a Records frame gets the RECORDS_CHECKED flag and a checksum
    without its payload (only for a peer whose Welcome allowed it; other types ignore it).
    """
    mtype = message_type(msg)
    flags = RECORDS_CHECKED if records_checked and mtype is MessageType.RECORDS else 0
    header = msgpack.packb(_header_values(msg), use_bin_type=True)
    field = PAYLOAD_FIELD.get(type(msg))
    payload: bytes | memoryview = getattr(msg, field) if field is not None else b""
    raw_len = len(payload)
    codec = Codec.RAW
    wire = payload
    lz4_ran = compress and raw_len >= compress_threshold and _sample_compresses(payload)
    if lz4_ran:
        if level > 0:
            packed = lz4.block.compress(
                payload, mode="high_compression", compression=level, store_size=False
            )
        else:
            packed = lz4.block.compress(payload, store_size=False)
        if len(packed) * _PAYS_DEN < raw_len * _PAYS_NUM:
            codec = Codec.LZ4
            wire = packed
    if len(header) > min(MAX_HEADER, max_frame - PREFIX_SIZE):
        raise LocalProtocolError(f"{type(msg).__name__} header of {len(header)} bytes is too big")
    size = PREFIX_SIZE + len(header) + max(raw_len, len(wire))
    if size > max_frame:
        raise LocalProtocolError(
            f"{type(msg).__name__} frame of {size} bytes exceeds the frame limit of {max_frame}"
        )
    fields = _FIELDS.pack(
        FRAME_MAGIC, FRAME_VERSION, mtype, codec, flags, len(header), len(wire), raw_len
    )
    digest = blake3.blake3(fields)
    digest.update(header)
    if not flags:
        digest.update(payload)
    head = b"".join((fields, digest.digest(CHECKSUM_SIZE), header))
    buffers: list[bytes | memoryview] = [head, wire] if wire else [head]
    return EncodedFrame(msg, buffers, len(head) + len(wire), raw_len, len(wire), codec, lz4_ran)


# --- decoding -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Prefix:
    mtype: MessageType
    codec: Codec
    header_len: int
    wire_len: int
    raw_len: int
    fields: bytes  # the checksummed 20 bytes
    checksum: bytes
    records_checked: bool  # the RECORDS_CHECKED flag: the checksum leaves the payload out

    @property
    def body_len(self) -> int:
        return self.header_len + self.wire_len


# What the next frame of one message type may announce: (header, payload, rule): at most
# `header` bytes of header and `payload` bytes of payload (the larger of wire and raw
# length); `rule` names the limit in the error message ("... allows at most ..."). A plain
# tuple: one is made for every Records frame, and a NamedTuple's __new__ is Python code.
FrameLimit: TypeAlias = tuple[int, int, str]


class FrameLimits(Protocol):
    """What tells a FrameDecoder the limit for each frame (a ProtocolConnection)."""

    def limit_for_next_frame(self, mtype: MessageType) -> FrameLimit:
        """The limit for the next frame, of type mtype; may raise RemoteProtocolError
        itself (a type that is out of turn is refused on its prefix)."""
        ...


@dataclass(frozen=True, slots=True)
class DecodedFrame:
    message: Message
    wire_size: int
    payload_raw: int
    payload_wire: int


NOT_A_PEER: Final = "not a replicator peer: "  # how a foreign stream's error starts


def _not_a_peer(head: bytes) -> RemoteProtocolError:
    hint = ""
    if head[:1] == b"\x16":
        hint = " (it seems to speak TLS: is TLS enabled on one side only?)"
    elif head[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ", b"HTTP"):
        hint = " (it speaks HTTP)"
    return RemoteProtocolError(
        f"{NOT_A_PEER}stream starts with {head[:8]!r}, expected {FRAME_MAGIC!r}{hint}"
    )


def parse_prefix(head: bytes | bytearray | memoryview, max_frame: int) -> _Prefix:
    """Validate a frame prefix (exactly PREFIX_SIZE bytes) against the limits."""
    magic, version, mtype, codec, flags, header_len, wire_len, raw_len, checksum = (
        PREFIX.unpack_from(head)
    )
    if magic != FRAME_MAGIC:
        raise _not_a_peer(bytes(head))
    if version != FRAME_VERSION:
        raise VersionMismatchError(version, FRAME_VERSION)
    if mtype not in MESSAGE_CLASSES:
        raise RemoteProtocolError(f"unknown message type {mtype}")
    if codec not in Codec._value2member_map_:
        raise RemoteProtocolError(f"unknown frame codec {codec}")
    if flags and not (flags == RECORDS_CHECKED and mtype == MessageType.RECORDS):
        raise RemoteProtocolError(f"unknown frame flags {flags:#x}")
    if header_len > min(MAX_HEADER, max_frame):
        raise RemoteProtocolError(f"frame header of {header_len} bytes exceeds {MAX_HEADER}")
    size = PREFIX_SIZE + header_len + max(wire_len, raw_len)
    if size > max_frame:
        raise RemoteProtocolError(
            f"peer announced a frame of {size} bytes; the limit is {max_frame}"
        )
    if codec == Codec.RAW and wire_len != raw_len:
        raise RemoteProtocolError(f"raw payload with wire length {wire_len} != {raw_len}")
    if codec == Codec.LZ4 and (raw_len == 0 or wire_len == 0):
        raise RemoteProtocolError("lz4 frame with an empty payload")
    return _Prefix(
        MessageType(mtype),
        Codec(codec),
        header_len,
        wire_len,
        raw_len,
        bytes(head[: _FIELDS.size]),
        bytes(checksum),
        bool(flags),
    )


def decode_body(prefix: _Prefix, body: memoryview, *, hand_over: bool = False) -> Message:
    """Check and decode a frame body (header + wire payload) whose prefix is parsed.

    ``hand_over``: ``body`` lies in a buffer nothing will write again, so a raw payload is
    kept as a read-only view of it instead of copied out (``FrameDecoder``'s own buffer of
    a large Records frame)."""
    header = body[: prefix.header_len]
    wire = body[prefix.header_len : prefix.body_len]
    checked: bytes | memoryview = wire  # what the checksum covers: the uncompressed payload
    if prefix.codec == Codec.LZ4:
        try:
            checked = lz4.block.decompress(wire, uncompressed_size=prefix.raw_len)
        except lz4.block.LZ4BlockError as exc:
            raise RemoteProtocolError(f"frame payload does not decompress: {exc}") from exc
        if len(checked) != prefix.raw_len:
            raise RemoteProtocolError(
                f"frame payload decompressed to {len(checked)} bytes, announced {prefix.raw_len}"
            )
    digest = blake3.blake3(prefix.fields)
    digest.update(header)
    if not prefix.records_checked:  # else each record's own checksum covers it
        digest.update(checked)
    if digest.digest(CHECKSUM_SIZE) != prefix.checksum:
        raise RemoteProtocolError(f"frame checksum mismatch ({prefix.mtype.name} frame)")
    payload: bytes | memoryview = checked
    if isinstance(checked, memoryview):
        payload = checked.toreadonly() if hand_over else checked.tobytes()
    try:
        values = msgpack.unpackb(header, use_list=False, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(
            f"{prefix.mtype.name} frame header is not msgpack: {exc}"
        ) from exc
    return _build(prefix.mtype, values, payload)


class FrameDecoder:
    """Incremental decoder: bytes in, decoded frames out, memory bounded by what is allowed.

    Small frames are parsed from a staging buffer; a frame whose body exceeds
    ``_BIG_FRAME`` gets an exactly-sized buffer once its prefix is known and allowed,
    and ``get_buffer`` then hands out the rest of that buffer, so a socket fills it
    directly. Buffers are never resized in place (a caller may still hold a view of
    them), and ``get_buffer``/``buffer_updated`` never raise: a bad prefix is kept and
    raised by ``next_frame`` (``ready()`` turns true so the caller comes to collect it).

    ``limits`` (see ``FrameLimits``) is asked about every prefix before anything is
    allocated for its frame; it is held weakly, since it is usually the decoder's owner
    (a strong reference back would make a cycle, which leaves both to the cyclic GC).
    A prefix is parsed only once the frame before it has been returned by
    ``next_frame``, so the limit is judged in the state that frame led to (a Credit
    right behind a Welcome is judged after the Welcome). ``readahead``: room
    ``get_buffer`` offers beyond what the current frame needs (0: none); a
    ``ProtocolConnection`` raises it once the peer has completed the handshake.
    """

    def __init__(
        self,
        max_frame: int = DEFAULT_MAX_FRAME,
        *,
        limits: FrameLimits | None = None,
        readahead: int = 0,
    ) -> None:
        if max_frame < MIN_MAX_FRAME:
            raise ValueError(f"max_frame must be at least {MIN_MAX_FRAME}")
        self.max_frame = max_frame
        self._limits = weakref.ref(limits) if limits is not None else None
        self.readahead = readahead
        self._buf = bytearray(_STAGING)
        self._start = 0  # unparsed staged data is _buf[_start:_end]
        self._end = 0
        self._head: _Prefix | None = None  # parsed prefix of the frame at _start
        self._big: memoryview | None = None  # body of the large frame being assembled
        self._big_backing: bytearray | mmap.mmap | None = None
        self._big_prefix: _Prefix | None = None
        self._big_filled = 0
        self._spare: bytearray | None = None  # a large-frame buffer kept for reuse
        self._failure: RemoteProtocolError | None = None
        self._eof = False
        self._released = False
        self.high_water = len(self._buf)  # the most `allocated` has been
        self.frames = 0  # frames decoded so far

    # -- input ------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take a chunk of the stream (copied; the caller may reuse its buffer)."""
        with memoryview(data) as source:
            view = source if source.format == "B" and source.ndim == 1 else source.cast("B")
            pos, total = 0, len(view)
            while pos < total:
                room = self.get_buffer(total - pos)
                n = min(len(room), total - pos)
                room[:n] = view[pos : pos + n]
                room.release()
                self.buffer_updated(n)
                pos += n

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable buffer for the next bytes of the stream (BufferedProtocol style).

        ``sizehint`` is ignored: the room offered follows what the current frame needs
        and ``readahead``, never what the caller would like to read.
        """
        self._parse_head()  # its turn may have come: it decides where the bytes go
        if self._big is not None and self._big_filled < len(self._big):
            return self._big[self._big_filled :]
        if self._failure is not None or self._released or self._eof:
            return memoryview(_SCRAP)  # nothing more will be decoded: drop the input
        want = self._room_wanted()
        if len(self._buf) - self._end < want:
            self._make_room(want)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the buffer get_buffer returned last."""
        if self._big is not None and self._big_filled < len(self._big):
            self._big_filled += nbytes
        elif self._failure is None and not self._released and not self._eof:
            self._end += nbytes
            self._parse_head()

    def eof(self) -> None:
        """The stream ended. A large frame still incomplete can never complete: its buffer
        goes at once (and ``next_frame`` raises); so does the spare buffer, and the staging
        buffer unless it still holds frames to return."""
        if self._eof:
            return
        self._eof = True
        self._spare = None
        if self._big is not None and self._big_filled < len(self._big):
            self._fail(self._cut_short())
        elif self.buffered == 0:
            self._drop_buffers()

    def release(self) -> None:
        """Drop every buffer: nothing more will be read or decoded (the connection is
        over). Input that still arrives is dropped, ``next_frame`` returns None."""
        self._released = True
        self._drop_buffers()

    # -- state ------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes held that have not been returned as frames."""
        big = PREFIX_SIZE + self._big_filled if self._big is not None else 0
        return big + self._end - self._start

    @property
    def allocated(self) -> int:
        """Bytes of buffers held (staging, large frame, spare): what the peer costs us."""
        return (
            len(self._buf)
            + (len(self._big_backing) if self._big_backing is not None else 0)
            + (len(self._spare) if self._spare is not None else 0)
        )

    def ready(self) -> bool:
        """True when next_frame() would return a frame or raise; cheap (it may parse the
        prefix of the next frame, never a body)."""
        complete = self._complete()  # first: parsing a prefix may record a failure
        if self._failure is not None or complete:
            return True
        return self._eof and self.buffered > 0  # a partial frame at EOF is an error

    def has_partial(self) -> bool:
        """True when bytes of an incomplete frame are held (an error at EOF)."""
        return self.buffered > 0 and not self._complete() and self._failure is None

    def _complete(self) -> bool:
        """A whole frame is held (parsing the next prefix if its turn has come)."""
        if self._big is not None:
            return self._big_filled == len(self._big)
        self._parse_head()
        head = self._head
        return head is not None and self._end - self._start >= PREFIX_SIZE + head.body_len

    # -- output -----------------------------------------------------------------------------

    def next_frame(self) -> DecodedFrame | None:
        """The next complete frame, or None when more bytes are needed.

        Raises RemoteProtocolError (or VersionMismatchError) on a bad frame, and on a
        partial frame after ``eof()``; the stream cannot be resynchronised after that,
        so every later call raises it again.
        """
        if self._failure is not None:
            raise detached(self._failure)
        try:
            return self._next_frame()
        except RemoteProtocolError as exc:
            self._fail(detached(exc))
            raise

    def _next_frame(self) -> DecodedFrame | None:
        if self._big is not None:
            if self._big_filled < len(self._big):
                if self._eof:  # its prefix was parsed after the stream ended
                    exc = self._cut_short()
                    self._fail(exc)
                    raise detached(exc)
                return None
            prefix, body, backing = self._big_prefix, self._big, self._big_backing
            assert prefix is not None and backing is not None
            self._big = self._big_backing = self._big_prefix = None
            self._big_filled = 0
            handed = _keeps_its_buffer(prefix)
            msg = decode_body(prefix, body, hand_over=handed)
            del body
            if (  # the message holds copies: the buffer serves the next large frame
                not handed
                and not self._eof
                and isinstance(backing, bytearray)
                and len(backing) <= _SPARE_MAX
                and (self._spare is None or len(backing) > len(self._spare))
            ):
                self._spare = backing
        else:
            self._parse_head()
            if self._failure is not None:
                raise detached(self._failure)
            prefix = self._head
            if prefix is None or self._end - self._start < PREFIX_SIZE + prefix.body_len:
                if self._eof and self.buffered:
                    raise self._cut_short()
                return None
            body_start = self._start + PREFIX_SIZE
            with memoryview(self._buf) as view:
                msg = decode_body(prefix, view[body_start : body_start + prefix.body_len])
            self._start = body_start + prefix.body_len
            self._head = None  # the next prefix is parsed when asked for: see the class doc
            if self._start == self._end:
                self._start = self._end = 0
                if len(self._buf) > self._staging_keep():
                    self._buf = bytearray(_STAGING)  # give back what a burst made us grow
        self.frames += 1
        return DecodedFrame(msg, PREFIX_SIZE + prefix.body_len, prefix.raw_len, prefix.wire_len)

    # -- internals --------------------------------------------------------------------------

    def _parse_head(self) -> None:
        """Parse and admit the prefix at the head of the staging buffer once it is all there.

        A large frame that is not complete yet moves into its own buffer. Errors are
        recorded, not raised (this runs inside buffer_updated).
        """
        if self._failure is not None or self._big is not None or self._head is not None:
            return
        avail = self._end - self._start
        if avail == 0:
            return
        try:
            if avail < PREFIX_SIZE:
                _check_magic(bytes(self._buf[self._start : min(self._end, self._start + 5)]))
                return
            with memoryview(self._buf) as view:
                head = parse_prefix(view[self._start : self._start + PREFIX_SIZE], self.max_frame)
            if self._limits is not None:
                _admit(head, self._limits())
        except RemoteProtocolError as exc:
            if isinstance(exc, VersionMismatchError) and self.frames:
                # a stream that already spoke our version does not change it: damage
                exc = RemoteProtocolError(
                    f"damaged frame: {exc} after {self.frames} frames of version "
                    f"{FRAME_VERSION} (a byte changed on the path?)"
                )
            self._fail(detached(exc))
            return
        if head.body_len <= _BIG_FRAME or avail >= PREFIX_SIZE + head.body_len:
            self._head = head
            return
        backing: bytearray | mmap.mmap
        spare = self._spare
        if spare is not None and len(spare) >= head.body_len and not _keeps_its_buffer(head):
            backing, self._spare = spare, None
        elif head.body_len > _LAZY_FRAME:
            backing = mmap.mmap(-1, head.body_len)  # committed as bytes arrive, see above
        else:  # exactly sized: a handed-over payload keeps all of its buffer alive
            backing = bytearray(head.body_len)
        self.high_water = max(self.high_water, len(backing) + len(self._buf))
        body = memoryview(backing)[: head.body_len]
        have = avail - PREFIX_SIZE
        body[:have] = self._buf[self._start + PREFIX_SIZE : self._end]
        self._big, self._big_backing, self._big_prefix = body, backing, head
        self._big_filled = have
        self._start = self._end = 0
        if len(self._buf) > self._staging_keep():
            self._buf = bytearray(_STAGING)

    def _room_wanted(self) -> int:
        """Free staging room get_buffer should offer: the rest of the current frame (its
        prefix, or its body once the prefix was allowed), but at most as much again as
        is already held, so the buffer doubles as bytes arrive; at least ``readahead``."""
        avail = self._end - self._start
        head = self._head
        need = PREFIX_SIZE + head.body_len - avail if head is not None else PREFIX_SIZE - avail
        return max(min(need, max(avail, _STAGING // 2)), self.readahead, 1)

    def _staging_keep(self) -> int:
        """The largest staging buffer kept once it empties (see _STAGING)."""
        return _STAGING + 2 * self.readahead

    def _make_room(self, want: int) -> None:
        avail = self._end - self._start
        size = avail + want
        if len(self._buf) < size or len(self._buf) > self._staging_keep():
            new = bytearray(-(-size // _STAGING) * _STAGING)  # whole pages
            new[:avail] = self._buf[self._start : self._end]
            self._buf = new
            self.high_water = max(self.high_water, self.allocated)
        else:
            # same-length slice assignment: allowed even while views of _buf exist
            self._buf[:avail] = self._buf[self._start : self._end]
        self._start, self._end = 0, avail

    def _cut_short(self) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"connection closed in the middle of a frame ({self.buffered} bytes of it received)"
        )

    def _fail(self, exc: RemoteProtocolError) -> None:
        """Record the failure and drop the buffers: the stream is over."""
        self._failure = exc
        self._drop_buffers()

    def _drop_buffers(self) -> None:
        self._buf = bytearray()
        self._start = self._end = 0
        self._head = None
        self._big = self._big_backing = self._big_prefix = None
        self._big_filled = 0
        self._spare = None


def _keeps_its_buffer(head: _Prefix) -> bool:
    """Whether a large frame's payload leaves in a view of its buffer, not a copy: raw
    Records (the bulk of replication: a copy per byte received was ~2% of a 2-vCPU
    machine's CPU in a 1 MiB replicating run). The records and the receive journal's
    staging then hold views of a buffer only they reference (``Record``'s docstring)."""
    return head.mtype == MessageType.RECORDS and head.codec == Codec.RAW


def _admit(head: _Prefix, limits: FrameLimits | None) -> None:
    """Refuse a frame whose prefix announces more than the limit for its type allows."""
    if limits is None:
        raise RemoteProtocolError("the connection these frames were for is gone")
    max_header, max_payload, rule = limits.limit_for_next_frame(head.mtype)
    payload = head.wire_len if head.wire_len > head.raw_len else head.raw_len
    if head.header_len > max_header or payload > max_payload:
        raise RemoteProtocolError(
            f"peer announced a {MESSAGE_CLASSES[head.mtype].__name__} frame with a "
            f"{head.header_len}-byte header and a {payload}-byte payload; {rule} "
            f"allows at most a {max_header}-byte header and a {max_payload}-byte payload"
        )


def _check_magic(head: bytes) -> None:
    """Reject a foreign stream as soon as its first bytes arrive (head: up to 5 bytes)."""
    if head[:4] != FRAME_MAGIC[: len(head[:4])]:
        raise _not_a_peer(head)
    if len(head) >= 5 and head[4] != FRAME_VERSION:
        raise VersionMismatchError(head[4], FRAME_VERSION)
