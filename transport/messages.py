"""The messages of the replication protocol: frozen, slotted, validated on construction.

A message that exists is a valid message: every constructor checks types, ranges and
lengths, so the frame decoder builds messages from untrusted bytes with the same rules
the engine is held to when it builds them. Invalid fields raise ``MessageError`` (a
``ValueError``); the decoder turns that into ``RemoteProtocolError``.

Two fields are bulk payloads that travel outside the msgpack header of their frame
(``Records.payload``, ``Manifest.digests``); ``PAYLOAD_FIELD`` names them. Field
semantics and the wire layout are documented in ``docs/PROTOCOL.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, TypeAlias

import msgpack

from replicator.journal.records import (
    HEADER_SIZE,
    MAX_NAME,
    RecordError,
    framed_run,
    handed_over,
    peek_length,
    peek_lsn,
)

U64_MAX: Final = 2**64 - 1
I64_MIN: Final = -(2**63)
I64_MAX: Final = 2**63 - 1

MAX_JOB_NAME: Final = 255  # bytes of UTF-8
MAX_VOLUME_NAME: Final = MAX_NAME  # the journal's limit for a record's volume name
# Volumes a Hello may list. The list is a courtesy (early name checks; records are checked
# on arrival), and a Hello must fit in MAX_HELLO_FRAME (64 KiB, frames.py) with 4096-byte
# names: 12 such volumes make a 54,032-byte Hello. Senders list the first MAX_VOLUMES.
MAX_VOLUMES: Final = 12
MAX_TOKEN: Final = 64  # codes and capability names
MAX_CAPABILITIES: Final = 64
MAX_SESSION: Final = 128
MAX_TEXT: Final = 4096  # characters of a human-readable message; longer text is cut
MIN_EXTENT: Final = 512
MAX_EXTENT: Final = 1 << 30
DIGEST_SIZE: Final = 16  # blake3-128 per extent in a Manifest

VOLUME_KINDS: Final = frozenset({"disk", "file"})
REFUSE_CODES: Final = frozenset(
    {"version", "name", "busy", "storage", "auth", "config", "diverged", "promoted", "generation"}
)

_TOKEN = re.compile(r"[a-z0-9][a-z0-9_.\-]*\Z")


class MessageError(ValueError):
    """A message field is out of range or of the wrong type."""


class MessageType(IntEnum):
    """The type byte of a frame. Values are part of the wire format: never renumber."""

    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    RECORDS = 4
    ACK = 5
    CREDIT = 6
    MANIFEST_REQUEST = 7
    MANIFEST = 8
    PING = 9
    PONG = 10
    GOODBYE = 11
    ERROR = 12
    TREE_REQUEST = 13
    TREE = 14
    HANDOVER = 15
    READ_REQUEST = 16
    READ_DATA = 17
    POINT_FLOOR = 18


# --- field checks -------------------------------------------------------------------------


def _uint(owner: str, name: str, value: object, maximum: int = U64_MAX) -> None:
    if type(value) is not int:
        raise MessageError(f"{owner}.{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise MessageError(f"{owner}.{name} = {value} is outside 0..{maximum}")


def _int64(owner: str, name: str, value: object) -> None:
    if type(value) is not int:
        raise MessageError(f"{owner}.{name} must be an int, not {type(value).__name__}")
    if not I64_MIN <= value <= I64_MAX:
        raise MessageError(f"{owner}.{name} = {value} does not fit in 64 signed bits")


def _bool(owner: str, name: str, value: object) -> None:
    if type(value) is not bool:
        raise MessageError(f"{owner}.{name} must be a bool, not {type(value).__name__}")


def _name(owner: str, name: str, value: object, max_bytes: int) -> None:
    """A non-empty, printable, UTF-8-encodable identifier of bounded length."""
    if type(value) is not str:
        raise MessageError(f"{owner}.{name} must be a str, not {type(value).__name__}")
    if not value:
        raise MessageError(f"{owner}.{name} must not be empty")
    try:
        size = len(value.encode())
    except UnicodeEncodeError as exc:
        raise MessageError(f"{owner}.{name} is not valid Unicode") from exc
    if size > max_bytes:
        raise MessageError(f"{owner}.{name} is {size} bytes long; the limit is {max_bytes}")
    if not value.isprintable():
        raise MessageError(f"{owner}.{name} {value!r} contains control characters")


def _token(owner: str, name: str, value: object) -> None:
    _name(owner, name, value, MAX_TOKEN)
    assert isinstance(value, str)
    if not _TOKEN.match(value):
        raise MessageError(f"{owner}.{name} {value!r} must match [a-z0-9][a-z0-9_.-]*")


def _text(owner: str, name: str, value: object) -> str:
    """Human-readable text, made safe to print on one line: control characters become
    U+FFFD and text longer than MAX_TEXT is cut (so reporting an error never fails)."""
    if type(value) is not str:
        raise MessageError(f"{owner}.{name} must be a str, not {type(value).__name__}")
    if not value.isprintable():
        value = "".join(c if c.isprintable() else "\ufffd" for c in value)
    if len(value) > MAX_TEXT:
        value = value[: MAX_TEXT - 1] + "\u2026"
    return value


def _blob(owner: str, name: str, value: object) -> bytes:
    """Accept any contiguous byte buffer; store bytes (free when it already is bytes)."""
    if isinstance(value, bytes):
        return bytes(value) if type(value) is not bytes else value
    if isinstance(value, bytearray | memoryview):
        with memoryview(value) as view:
            return view.tobytes()
    raise MessageError(f"{owner}.{name} must be bytes, not {type(value).__name__}")


def _immutable_blob(owner: str, name: str, value: object) -> bytes | memoryview:
    """``_blob``, but a byte view nothing can change is kept as it is, not copied: a view
    of ``bytes`` (a Records payload sliced from a journal read chunk), or a read-only view
    (handed over: its buffer is never written again, as ``FrameDecoder`` does with a large
    Records frame's own buffer; the rule of ``journal.records.Record``)."""
    return value if handed_over(value) else _blob(owner, name, value)


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


# --- messages -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    """One volume of a job, as announced in Hello. ``kind`` is "disk" or "file"."""

    name: str
    size: int
    kind: str

    def __post_init__(self) -> None:
        _name("VolumeInfo", "name", self.name, MAX_VOLUME_NAME)
        _uint("VolumeInfo", "size", self.size)
        if self.kind not in VOLUME_KINDS:
            raise MessageError(
                f"VolumeInfo.kind {self.kind!r} must be one of {sorted(VOLUME_KINDS)}"
            )


@dataclass(frozen=True, slots=True)
class Hello:
    """Sender -> receiver, the first message of a connection."""

    protocol_version: int
    job: str
    volumes: tuple[VolumeInfo, ...]
    capabilities: tuple[str, ...]
    generation: int
    session: str

    def __post_init__(self) -> None:
        _uint("Hello", "protocol_version", self.protocol_version, 0xFFFF)
        _name("Hello", "job", self.job, MAX_JOB_NAME)
        if type(self.volumes) is not tuple:
            raise MessageError("Hello.volumes must be a tuple of VolumeInfo")
        if len(self.volumes) > MAX_VOLUMES:
            raise MessageError(f"Hello announces {len(self.volumes)} volumes; max {MAX_VOLUMES}")
        names: set[str] = set()
        for volume in self.volumes:
            if not isinstance(volume, VolumeInfo):
                raise MessageError("Hello.volumes must be a tuple of VolumeInfo")
            if volume.name in names:
                raise MessageError(f"Hello lists volume {volume.name!r} twice")
            names.add(volume.name)
        _capabilities("Hello", self.capabilities)
        _uint("Hello", "generation", self.generation)
        _name("Hello", "session", self.session, MAX_SESSION)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Receiver -> sender: the session is accepted.

    ``received_lsn`` is the highest LSN durable in the receiver's journal for the job
    (the sender resumes after it); ``window`` the payload bytes the sender may send
    before the first Credit.
    """

    protocol_version: int
    received_lsn: int
    applied_lsn: int
    window: int
    capabilities: tuple[str, ...]
    generation: int

    def __post_init__(self) -> None:
        _uint("Welcome", "protocol_version", self.protocol_version, 0xFFFF)
        _lsns("Welcome", self.received_lsn, self.applied_lsn)
        _uint("Welcome", "window", self.window, I64_MAX)
        _capabilities("Welcome", self.capabilities)
        _uint("Welcome", "generation", self.generation)


@dataclass(frozen=True, slots=True)
class Refuse:
    """Receiver -> sender instead of Welcome; the connection then closes."""

    code: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in REFUSE_CODES:
            raise MessageError(f"Refuse.code {self.code!r} must be one of {sorted(REFUSE_CODES)}")
        _set(self, "message", _text("Refuse", "message", self.message))


@dataclass(frozen=True, slots=True, repr=False)
class Records:
    """Sender -> receiver: journal records (``encode_record`` bytes) packed back to back.

    The constructor walks the record headers, not their checksums: the receiver checks
    each record's checksum when it takes the frame (``ReceiverCore.records``), and the
    frame checksum covers the payload too unless the frame is flagged RECORDS_CHECKED
    (frames.py). The payload must hold exactly ``count`` whole records with strictly
    increasing LSNs from ``first_lsn`` to ``last_lsn``. ``source_ts_ns`` is the timestamp
    of the oldest record.
    """

    first_lsn: int
    last_lsn: int
    count: int
    source_ts_ns: int
    payload: bytes | memoryview

    def __post_init__(self) -> None:
        _uint("Records", "first_lsn", self.first_lsn)
        _uint("Records", "last_lsn", self.last_lsn)
        _uint("Records", "count", self.count)
        _int64("Records", "source_ts_ns", self.source_ts_ns)
        _set(self, "payload", _immutable_blob("Records", "payload", self.payload))
        if self.first_lsn < 1:
            raise MessageError("Records.first_lsn must be >= 1 (LSN 0 means unassigned)")
        if self.last_lsn < self.first_lsn:
            raise MessageError(f"Records LSNs {self.first_lsn}..{self.last_lsn} run backwards")
        if not 1 <= self.count <= self.last_lsn - self.first_lsn + 1:
            raise MessageError(
                f"Records.count {self.count} impossible for LSNs {self.first_lsn}..{self.last_lsn}"
            )
        _check_packed_records(self)

    def __repr__(self) -> str:
        return (
            f"Records(first_lsn={self.first_lsn}, last_lsn={self.last_lsn}, count={self.count}, "
            f"source_ts_ns={self.source_ts_ns}, payload=<{len(self.payload)} bytes>)"
        )


@dataclass(frozen=True, slots=True)
class Ack:
    """Receiver -> sender: LSNs durable in the receive journal / applied to the replicas."""

    received_lsn: int
    applied_lsn: int

    def __post_init__(self) -> None:
        _lsns("Ack", self.received_lsn, self.applied_lsn)


@dataclass(frozen=True, slots=True)
class Credit:
    """Receiver -> sender: the sender may send ``window_bytes`` more payload bytes."""

    window_bytes: int

    def __post_init__(self) -> None:
        _uint("Credit", "window_bytes", self.window_bytes, I64_MAX)
        if self.window_bytes == 0:
            raise MessageError("Credit.window_bytes must be > 0")


@dataclass(frozen=True, slots=True)
class ManifestRequest:
    """Sender -> receiver: send the blake3 extent manifest of a replica volume."""

    request_id: int
    volume: str
    extent_size: int
    fresh: bool

    def __post_init__(self) -> None:
        _uint("ManifestRequest", "request_id", self.request_id)
        _name("ManifestRequest", "volume", self.volume, MAX_VOLUME_NAME)
        _extent_size("ManifestRequest", self.extent_size)
        _bool("ManifestRequest", "fresh", self.fresh)


@dataclass(frozen=True, slots=True, repr=False)
class Manifest:
    """Receiver -> sender: one part of the answer to a ManifestRequest.

    ``digests`` holds 16 bytes per extent, for extents ``first_extent`` onwards; the
    last part of an answer has ``done=True``. A missing replica is one part with
    ``exists=False``, ``size=0``, ``first_extent=0``, no digests and ``done=True``.
    """

    request_id: int
    volume: str
    exists: bool
    size: int
    extent_size: int
    first_extent: int
    digests: bytes
    done: bool

    def __post_init__(self) -> None:
        _uint("Manifest", "request_id", self.request_id)
        _name("Manifest", "volume", self.volume, MAX_VOLUME_NAME)
        _bool("Manifest", "exists", self.exists)
        _uint("Manifest", "size", self.size)
        _extent_size("Manifest", self.extent_size)
        _uint("Manifest", "first_extent", self.first_extent)
        _set(self, "digests", _blob("Manifest", "digests", self.digests))
        _bool("Manifest", "done", self.done)
        if len(self.digests) % DIGEST_SIZE:
            raise MessageError(
                f"Manifest.digests is {len(self.digests)} bytes, not a multiple of {DIGEST_SIZE}"
            )
        if not self.exists:
            if self.size or self.first_extent or self.digests or not self.done:
                raise MessageError(
                    "Manifest of a missing volume must have size 0, no digests and done=True"
                )
            return
        if self.end_extent > self.extent_count:
            raise MessageError(
                f"Manifest covers extents up to {self.end_extent}, but {self.size} bytes in "
                f"extents of {self.extent_size} make only {self.extent_count}"
            )
        if self.done and self.end_extent != self.extent_count:
            raise MessageError(
                f"last Manifest part ends at extent {self.end_extent} of {self.extent_count}"
            )

    @property
    def extent_count(self) -> int:
        """Extents in the whole volume (the last one may be short)."""
        return -(-self.size // self.extent_size)

    @property
    def end_extent(self) -> int:
        """One past the last extent this part covers."""
        return self.first_extent + len(self.digests) // DIGEST_SIZE

    def __repr__(self) -> str:
        return (
            f"Manifest(request_id={self.request_id}, volume={self.volume!r}, "
            f"exists={self.exists}, size={self.size}, extent_size={self.extent_size}, "
            f"first_extent={self.first_extent}, digests=<{len(self.digests) // DIGEST_SIZE} "
            f"extents>, done={self.done})"
        )


@dataclass(frozen=True, slots=True)
class Ping:
    """Either way; answered by a Pong with the same nonce and ts_ns."""

    nonce: int
    ts_ns: int

    def __post_init__(self) -> None:
        _uint("Ping", "nonce", self.nonce)
        _int64("Ping", "ts_ns", self.ts_ns)


@dataclass(frozen=True, slots=True)
class Pong:
    """Either way; the answer to a Ping."""

    nonce: int
    ts_ns: int

    def __post_init__(self) -> None:
        _uint("Pong", "nonce", self.nonce)
        _int64("Pong", "ts_ns", self.ts_ns)


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Either way, a clean close of the sender's direction: nothing follows it."""

    reason: str

    def __post_init__(self) -> None:
        _set(self, "reason", _text("Goodbye", "reason", self.reason))


@dataclass(frozen=True, slots=True)
class Error:
    """Either way, fatal: the sender explains why it is closing, then closes."""

    code: str
    message: str

    def __post_init__(self) -> None:
        _token("Error", "code", self.code)
        _set(self, "message", _text("Error", "message", self.message))


TREE_KINDS: Final = frozenset({"f", "d", "l"})  # regular file, directory, symlink
MAX_TREE_PART: Final = 1024 * 1024  # listing bytes in one Tree part


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One entry of a replica folder: ``kind`` "f" file, "d" directory, "l" symlink
    (``target`` is its link target); ``mode`` the permission bits."""

    path: str
    kind: str
    mode: int
    target: str

    def __post_init__(self) -> None:
        _name("TreeEntry", "path", self.path, MAX_VOLUME_NAME)
        if self.kind not in TREE_KINDS:
            raise MessageError(f"TreeEntry.kind {self.kind!r} must be one of f, d, l")
        _uint("TreeEntry", "mode", self.mode, 0o7777)
        if type(self.target) is not str or len(self.target.encode()) > MAX_VOLUME_NAME:
            raise MessageError("TreeEntry.target must be a str of at most 4096 bytes")
        if (self.kind == "l") != bool(self.target):
            raise MessageError("TreeEntry.target is set for symlinks, and only for them")


def encode_tree(entries: tuple[TreeEntry, ...] | list[TreeEntry]) -> bytes:
    """The listing payload of a Tree part: a msgpack array of [path, kind, mode, target]."""
    return bytes(msgpack.packb([(e.path, e.kind, e.mode, e.target) for e in entries]))


def decode_tree(listing: bytes) -> tuple[TreeEntry, ...]:
    try:
        rows = msgpack.unpackb(listing, use_list=False, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MessageError(f"Tree.listing is not msgpack: {exc}") from exc
    if type(rows) is not tuple or not all(type(r) is tuple and len(r) == 4 for r in rows):
        raise MessageError("Tree.listing must be an array of [path, kind, mode, target]")
    return tuple(TreeEntry(*row) for row in rows)


@dataclass(frozen=True, slots=True)
class TreeRequest:
    """Sender -> receiver: list the job's replica folder (after applying what it holds)."""

    request_id: int

    def __post_init__(self) -> None:
        _uint("TreeRequest", "request_id", self.request_id)


@dataclass(frozen=True, slots=True, repr=False)
class Tree:
    """Receiver -> sender: one part of the answer to a TreeRequest; ``done`` on the last.

    ``listing`` (the payload) is ``encode_tree`` of the part's entries, at most
    MAX_TREE_PART bytes; ``entries()`` decodes it (checked on construction)."""

    request_id: int
    done: bool
    listing: bytes

    def __post_init__(self) -> None:
        _uint("Tree", "request_id", self.request_id)
        _bool("Tree", "done", self.done)
        _set(self, "listing", _blob("Tree", "listing", self.listing))
        if len(self.listing) > MAX_TREE_PART:
            raise MessageError(f"Tree.listing of {len(self.listing)} bytes exceeds {MAX_TREE_PART}")
        decode_tree(self.listing)

    def entries(self) -> tuple[TreeEntry, ...]:
        return decode_tree(self.listing)

    def __repr__(self) -> str:
        return f"Tree(request_id={self.request_id}, done={self.done}, <{len(self.listing)} bytes>)"


# The steps of a role change, in the order they happen (docs/PROTOCOL.md, "Handover"):
# planned failover: "request" R->S, "final" S->R (lsn: the last record, a barrier),
# "promoted" R->S (generation: the promoted one), or "refused" S->R instead of "final" (no
# final point can be taken now; sent only to a receiver whose Welcome lists
# CAP_HANDOVER_REFUSAL); failback: "handback" S->R (lsn: where both histories continue),
# "demoted" R->S (generation: the one both sides follow).
HANDOVER_STEPS: Final = frozenset(
    {"request", "final", "refused", "promoted", "handback", "demoted"}
)
CAP_HANDOVER_REFUSAL: Final = "handover-refusal"  # the Welcome capability: "refused" is read
# the Hello capability: this sender's Pings carry its wall clock (Unix ns) in ``ts_ns``, from
# which the receiver estimates the source's clock offset (engine/source_clock.py); a Ping
# from a sender without it is answered as before and its ``ts_ns`` means nothing else
CAP_WALL_CLOCK: Final = "wall-clock"
MAX_READ: Final = 4 * 1024 * 1024  # bytes one ReadRequest may ask for


@dataclass(frozen=True, slots=True)
class Handover:
    """Either way: one step of a planned failover or of a failback's hand-back."""

    step: str
    lsn: int
    generation: int

    def __post_init__(self) -> None:
        if self.step not in HANDOVER_STEPS:
            raise MessageError(
                f"Handover.step {self.step!r} must be one of {sorted(HANDOVER_STEPS)}"
            )
        _uint("Handover", "lsn", self.lsn)
        _uint("Handover", "generation", self.generation)


@dataclass(frozen=True, slots=True)
class PointFloor:
    """Sender to receiver, before the records it applies to: no barrier below ``lsn`` ends
    a consistency point. The receiver lacks records the sender cannot send again (lost to
    a damaged journal, or trimmed here), so barriers the sender journaled after them would
    mark a replica without them consistent; the comparison that follows ends at a barrier
    at or above ``lsn``. Durable on the receiver before it takes the next frame."""

    lsn: int

    def __post_init__(self) -> None:
        _uint("PointFloor", "lsn", self.lsn)


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Sender -> receiver (failback sessions only): send ``length`` bytes of a replica
    volume from ``offset``."""

    request_id: int
    volume: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        _uint("ReadRequest", "request_id", self.request_id)
        _name("ReadRequest", "volume", self.volume, MAX_VOLUME_NAME)
        _uint("ReadRequest", "offset", self.offset, I64_MAX)
        _uint("ReadRequest", "length", self.length, MAX_READ)
        if self.length == 0:
            raise MessageError("ReadRequest.length must be > 0")


@dataclass(frozen=True, slots=True, repr=False)
class ReadData:
    """Receiver -> sender: the answer to a ReadRequest; ``data`` (the payload) is the
    bytes asked for, shorter only where the volume ends."""

    request_id: int
    offset: int
    data: bytes

    def __post_init__(self) -> None:
        _uint("ReadData", "request_id", self.request_id)
        _uint("ReadData", "offset", self.offset, I64_MAX)
        _set(self, "data", _blob("ReadData", "data", self.data))
        if len(self.data) > MAX_READ:
            raise MessageError(f"ReadData of {len(self.data)} bytes exceeds {MAX_READ}")

    def __repr__(self) -> str:
        size = len(self.data)
        return f"ReadData(request_id={self.request_id}, offset={self.offset}, <{size} bytes>)"


Message: TypeAlias = (
    Hello
    | Welcome
    | Refuse
    | Records
    | Ack
    | Credit
    | ManifestRequest
    | Manifest
    | Ping
    | Pong
    | Goodbye
    | Error
    | TreeRequest
    | Tree
    | Handover
    | PointFloor
    | ReadRequest
    | ReadData
)

MESSAGE_TYPES: Final[dict[type[Message], MessageType]] = {
    Hello: MessageType.HELLO,
    Welcome: MessageType.WELCOME,
    Refuse: MessageType.REFUSE,
    Records: MessageType.RECORDS,
    Ack: MessageType.ACK,
    Credit: MessageType.CREDIT,
    ManifestRequest: MessageType.MANIFEST_REQUEST,
    Manifest: MessageType.MANIFEST,
    Ping: MessageType.PING,
    Pong: MessageType.PONG,
    Goodbye: MessageType.GOODBYE,
    Error: MessageType.ERROR,
    TreeRequest: MessageType.TREE_REQUEST,
    Tree: MessageType.TREE,
    Handover: MessageType.HANDOVER,
    ReadRequest: MessageType.READ_REQUEST,
    ReadData: MessageType.READ_DATA,
    PointFloor: MessageType.POINT_FLOOR,
}
MESSAGE_CLASSES: Final[dict[MessageType, type[Message]]] = {v: k for k, v in MESSAGE_TYPES.items()}

# The bulk field of a message: sent after the msgpack header, never packed into it.
PAYLOAD_FIELD: Final[dict[type[Message], str]] = {
    Records: "payload",
    Manifest: "digests",
    Tree: "listing",
    ReadData: "data",
}


def message_type(msg: Message) -> MessageType:
    """The frame type byte of a message."""
    try:
        return MESSAGE_TYPES[type(msg)]
    except KeyError:
        raise MessageError(f"{type(msg).__name__} is not a protocol message") from None


# --- checks shared by several messages ----------------------------------------------------


def _lsns(owner: str, received: object, applied: object) -> None:
    _uint(owner, "received_lsn", received)
    _uint(owner, "applied_lsn", applied)
    assert isinstance(received, int) and isinstance(applied, int)
    if applied > received:
        raise MessageError(
            f"{owner}.applied_lsn {applied} > received_lsn {received}: "
            "a receiver cannot have applied records it has not received"
        )


def _capabilities(owner: str, value: object) -> None:
    if type(value) is not tuple:
        raise MessageError(f"{owner}.capabilities must be a tuple of str")
    if len(value) > MAX_CAPABILITIES:
        raise MessageError(f"{owner} lists {len(value)} capabilities; max {MAX_CAPABILITIES}")
    for cap in value:
        _token(owner, "capabilities", cap)
    if len(set(value)) != len(value):
        raise MessageError(f"{owner}.capabilities has duplicates")


def _extent_size(owner: str, value: object) -> None:
    _uint(owner, "extent_size", value, MAX_EXTENT)
    assert isinstance(value, int)
    if value < MIN_EXTENT or value % MIN_EXTENT:
        raise MessageError(
            f"{owner}.extent_size {value} must be a multiple of {MIN_EXTENT} up to {MAX_EXTENT}"
        )


def _check_packed_records(msg: Records) -> None:
    """Walk the record headers of a Records payload (see the class docstring): at once
    (``framed_run``) when they are right, record by record to name what is wrong."""
    payload = msg.payload
    end = len(payload)
    run = framed_run(payload, 0, end, None, end)
    if (
        run.end == end
        and run.records == msg.count
        and run.first_lsn == msg.first_lsn
        and run.last_lsn == msg.last_lsn
        and run.records
    ):
        return
    pos = 0
    n = 0
    prev = 0
    while pos < end:
        if end - pos < HEADER_SIZE:
            raise MessageError(f"Records payload ends with {end - pos} stray bytes")
        try:
            size = peek_length(payload, pos)
        except RecordError as exc:
            raise MessageError(f"Records payload, record {n + 1}: {exc}") from exc
        if size > end - pos:
            raise MessageError(f"Records payload cuts record {n + 1} short")
        lsn = peek_lsn(payload, pos)
        if n == 0 and lsn != msg.first_lsn:
            raise MessageError(f"Records.first_lsn {msg.first_lsn} but the first record is {lsn}")
        if n and lsn <= prev:
            raise MessageError(f"Records payload: lsn {lsn} follows {prev}")
        prev = lsn
        n += 1
        pos += size
    if n != msg.count:
        raise MessageError(f"Records.count {msg.count} but the payload holds {n} records")
    if prev != msg.last_lsn:
        raise MessageError(f"Records.last_lsn {msg.last_lsn} but the last record is {prev}")
