"""The rules of a replication session, without I/O: one core per side.

In the style of the wire protocol (``transport/protocol.py``): messages and facts go in,
*actions* come out, and nothing here awaits, reads a file or touches a socket. The asyncio
drivers (``engine/link.py`` for the sender, ``Session`` in ``engine/receiver.py``) only carry
the actions out. So every replication rule lives once, here, where tests (and hypothesis)
can drive it with any interleaving:

Sender (``SenderCore``):

* frame packing: records as stored, back to back, one Records frame of about
  ``FRAME_TARGET`` bytes, never more than the window the receiver granted can cover (a
  record larger than the target goes alone);
* what each Ack means: records up to ``applied`` may be trimmed (the receiver can ask again
  for anything it only *received*: see ``relieve_below`` for the exception), appenders
  waiting for room are woken, the frames in flight behind it are done (the lag);
* the lag: records not applied, bytes shipped and not applied, and the age of the oldest
  change not applied (the RPO);
* what the receiver's Error and Goodbye mean to the sender (``refusal_error``).

Receiver (``ReceiverCore``):

* a Records frame becomes records, each checked (a name that cannot be a path under the
  replica folder, a range past what a file can hold: refused);
* what was ingested but not synced; once synced: an Ack (received, applied) and Credit for
  exactly the payload bytes made durable, so the window bounds the receiver's memory;
* an Ack when the applied LSN moves.

Credit itself and the order of LSNs are the protocol's (``ProtocolConnection`` checks them
on both ends): the cores read its figures rather than keep counters of their own.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass

from replicator.engine import generations
from replicator.engine.errors import (
    BusyError,
    ConnectError,
    PeerProtocolError,
    RefusedError,
    ReplicatorError,
    TargetStorageError,
    version_refusal,
)
from replicator.engine.names import path_problem
from replicator.journal import EncodedRecord, Record, RecordError, RecordType, decode_records
from replicator.journal.journal import MAX_LSN
from replicator.journal.records import split_run
from replicator.transport import (
    Ack,
    Credit,
    Error,
    Goodbye,
    Handover,
    Manifest,
    Message,
    Ping,
    Pong,
    ReadData,
    Records,
    RemoteProtocolError,
    Tree,
    Welcome,
)

FRAME_TARGET = 2 * 1024 * 1024
# No file system holds more than 2^63 bytes in one file: a record reaching past it is
# malformed (refused on arrival), not a storage error to retry forever.
MAX_FILE_BYTES = 2**63 - 1
_RANGED = frozenset({RecordType.WRITE, RecordType.ZERO, RecordType.TRIM, RecordType.RESIZE})


# -- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send this message to the peer."""

    message: Message


@dataclass(frozen=True, slots=True)
class Trim:
    """Records below ``upto`` may go from the journal."""

    upto: int


@dataclass(frozen=True, slots=True)
class Woken:
    """Something waiters care about moved: credit, or (``room``) an ack, which may have
    freed journal space and moved the applied LSN."""

    room: bool


@dataclass(frozen=True, slots=True)
class Deliver:
    """An answer (part) to a request this side made (Manifest, Tree, ReadData)."""

    message: Manifest | Tree | ReadData


@dataclass(frozen=True, slots=True)
class HandoverStep:
    """The receiver took a step of a role change (engine/failback.py, docs/PROTOCOL.md)."""

    message: Handover


Action = Send | Trim | Woken | Deliver | HandoverStep


def refusal_error(code: str, message: str) -> ReplicatorError:
    """What the receiver's Refuse or Error means to the sender, as the user sees it."""
    if code == "version":
        return version_refusal(message)
    if code == "protocol":
        return PeerProtocolError(f"receiver reported a protocol error: {message}")
    if code == "diverged":
        return RefusedError(
            f"receiver refused (diverged): {message}; nothing was written",
            hint="the replica is not as replication left it (changed on the target, or its "
            "state there lost): run send again with --resync to compare with the replica as "
            "it is now and send what differs",
        )
    if code == "busy":
        return BusyError(f"receiver refused (busy): {message}")
    if code in ("promoted", "generation"):
        return generations.refusal_error(code, message)
    if code == "storage":
        return TargetStorageError(f"receiver refused (storage): {message}", hint=_STORAGE_HINT)
    if code == "unapplied":
        return RefusedError(
            f"receiver refused (unapplied): {message}; nothing was written",
            hint="let `replicator send` ship the job's next consistency point (a continuous "
            "sender stopped with SIGTERM applies everything it shipped), then verify again",
        )
    return RefusedError(f"receiver refused ({code}): {message}")


_STORAGE_HINT = (
    "the target could not write or sync the job's replicas or state: fix what the message "
    "names there (space, permissions, the disk; the receiver logs it as receiver.storage) and "
    "run send again (a continuous sender retries by itself, capturing meanwhile); nothing "
    "past the last durable point was acknowledged, so nothing is lost"
)


# -- the sender -----------------------------------------------------------------------------


class SenderCore:
    """A sending session's rules (see the module docstring). Starts from the Welcome."""

    def __init__(self, welcome: Welcome) -> None:
        self.window = welcome.window  # frames never exceed it (it grows: see ``receive``)
        self.capabilities = frozenset(welcome.capabilities)
        self.received_lsn = welcome.received_lsn
        self.applied_lsn = welcome.applied_lsn
        # (last lsn, source time of its first record, payload bytes, monotonic time its
        # first record was read from the journal) of frames not applied
        self._in_flight: collections.deque[tuple[int, int, int, float]] = collections.deque()
        self.oldest_queued_ts = 0  # source time of the oldest record read, not yet shipped
        self.oldest_queued_at = 0.0  # and the monotonic time it was read (0: none)

    # -- what the receiver says -----------------------------------------------------------
    def receive(self, msg: Message, *, credit: int = 0) -> list[Action]:
        """What to do about ``msg``; ``credit``: what the sender holds with it (the
        protocol counts Credit: ``FramedConnection.credit``)."""
        if isinstance(msg, Ack):
            return self._ack(msg)
        if isinstance(msg, Credit):
            # frames may grow to the most credit held, which the receiver's window covers
            # again once it has synced what it took (a Welcome's credit is kept within a
            # small journal's room, so it may start low: frames capped there would all be
            # single records for the rest of the session)
            self.window = max(self.window, credit)
            return [Woken(room=False)]  # waiters look again
        if isinstance(msg, Manifest | Tree | ReadData):
            return [Deliver(msg)]
        if isinstance(msg, Handover):
            return [HandoverStep(msg)]
        if isinstance(msg, Ping):
            return [Send(Pong(msg.nonce, msg.ts_ns))]
        if isinstance(msg, Pong):
            return []
        if isinstance(msg, Error):
            raise refusal_error(msg.code, msg.message)
        if isinstance(msg, Goodbye):
            raise ConnectError(f"receiver closed the session: {msg.reason}")
        raise PeerProtocolError(f"unexpected {type(msg).__name__} from the receiver")

    def _ack(self, msg: Ack) -> list[Action]:
        self.received_lsn = max(self.received_lsn, msg.received_lsn)
        moved = msg.applied_lsn > self.applied_lsn
        self.applied_lsn = max(self.applied_lsn, msg.applied_lsn)
        while self._in_flight and self._in_flight[0][0] <= self.applied_lsn:
            self._in_flight.popleft()
        actions: list[Action] = [Woken(room=True)]
        if moved:
            actions.insert(0, Trim(self.applied_lsn + 1))
        return actions

    def relieve_below(self) -> int | None:
        """Our journal is full: the LSN below which records may go anyway (the receiver
        holds them durably), or None when that frees nothing beyond the applied ack."""
        return self.received_lsn + 1 if self.received_lsn > self.applied_lsn else None

    # -- what we send ---------------------------------------------------------------------
    def pack(self, pending: collections.deque[EncodedRecord]) -> Records:
        """Take records from the front of ``pending`` (not empty) into one Records frame
        of at most ``FRAME_TARGET`` bytes and the window (a single larger record goes
        alone); a run of records (``EncodedRecord.count``) is cut where the frame is full.

        Records that lie back to back in one read chunk (the journal's segments hold them
        so) go out as one slice of it, without a copy; others are joined.
        """
        limit = min(FRAME_TARGET, self.window)
        taken = split_run(pending.popleft(), limit, at_least_one=True)
        assert taken is not None  # at_least_one
        first, rest = taken
        if rest is not None:
            pending.appendleft(rest)
        last = first
        parts = [first.raw, first.payload]
        size = first.size
        count = first.count
        chunk = first.chunk
        while pending and size < limit:
            taken = split_run(pending[0], limit - size)
            if taken is None:
                break
            pending.popleft()
            last, rest = taken
            if rest is not None:
                pending.appendleft(rest)
            parts += (last.raw, last.payload)
            if chunk is not None and (last.chunk is not chunk or last.at != first.at + size):
                chunk = None
            size += last.size
            count += last.count
        if chunk is not None:
            payload: bytes | memoryview = memoryview(chunk)[first.at : first.at + size]
        else:
            payload = b"".join(parts)
        return Records(first.lsn, last.last_lsn, count, first.ts_ns, payload)

    def shipped(self, msg: Records, read_at: float | None = None) -> None:
        """``msg`` went; its first record was read from the journal at ``read_at``
        (``time.monotonic``; None: now)."""
        at = time.monotonic() if read_at is None else read_at
        self._in_flight.append((msg.last_lsn, msg.source_ts_ns, len(msg.payload), at))

    def lag(
        self, journal_last_lsn: int, now_ns: int | None = None, now_mono: float | None = None
    ) -> dict[str, float]:
        """What the receiver has not applied yet: records, bytes shipped, age in seconds
        (from the source time of the oldest record not applied, shipped or queued: the
        replica's RPO right now).

        The age is never less than the time since this process read that record from
        its journal (monotonic): records stamped before NTP stepped the source's clock
        back look as if they were written in the future, and their age read 0 (the RPO
        controller then slowed the link for a backlog it took for none)."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        now_mono = time.monotonic() if now_mono is None else now_mono
        if self._in_flight:
            _, oldest, _, read_at = self._in_flight[0]
        else:
            oldest, read_at = self.oldest_queued_ts, self.oldest_queued_at
        behind = journal_last_lsn > self.applied_lsn
        age = 0.0
        if behind and oldest:
            age = max(0.0, (now_ns - oldest) / 1e9)
        if behind and read_at:
            age = max(age, now_mono - read_at)
        return {
            "records": max(0, journal_last_lsn - self.applied_lsn),
            "bytes": sum(size for _, _, size, _ in self._in_flight),
            "seconds": round(age, 3),
        }


# -- the receiver ---------------------------------------------------------------------------


class ReceiverCore:
    """A receiving session's rules (see the module docstring)."""

    def __init__(self, applied_lsn: int) -> None:
        """``applied_lsn``: what the Welcome announced (acks start from there)."""
        self._unsynced: list[Record] = []
        self._unsynced_bytes = 0
        self._acked_applied = applied_lsn
        # payload bytes of frames read and not yet ingested (the frame being written, the
        # next one read meanwhile): neither credit the sender holds nor unsynced
        self._held = 0
        self.barrier_read = 0  # the last barrier's LSN read off the wire
        self.frames_read = 0

    def records(self, msg: Records) -> list[Record]:
        """The records of a Records frame just read, each checked (RemoteProtocolError
        when one is malformed or names something that cannot be under a replica folder);
        held until ``ingested``."""
        try:  # count and LSN order were checked with the frame: see Records
            records = decode_records(msg.payload)
        except RecordError as exc:
            raise RemoteProtocolError(f"malformed record in Records: {exc}") from exc
        for record in records:  # one pass: each record is checked, the barriers noted
            check_record(record)
            if record.is_barrier:
                self.barrier_read = record.lsn
        self.frames_read += 1
        self._held += len(msg.payload)
        return records

    def ingested(self, records: list[Record], payload_bytes: int) -> None:
        """``records`` (a frame ``records`` returned) are in the journal, not yet synced."""
        self._held -= payload_bytes
        self._unsynced.extend(records)
        self._unsynced_bytes += payload_bytes

    @property
    def in_hand_bytes(self) -> int:
        """Payload bytes read off the wire and not synced yet: with the credit the sender
        holds, what may still reach the journal before the next sync."""
        return self._held + self._unsynced_bytes

    @property
    def unsynced(self) -> bool:
        return bool(self._unsynced or self._unsynced_bytes)

    @property
    def unsynced_bytes(self) -> int:
        """Payload bytes ingested and not yet taken by a sync."""
        return self._unsynced_bytes

    def take_unsynced(self) -> tuple[list[Record], int]:
        """What a sync about to start covers: the records, and the credit it may grant."""
        records, self._unsynced = self._unsynced, []
        granted, self._unsynced_bytes = self._unsynced_bytes, 0
        return records, granted

    def synced(self, received_lsn: int, applied_lsn: int, granted: int) -> list[Send]:
        """A sync covering ``granted`` payload bytes finished: acknowledge, grant again."""
        self._acked_applied = max(self._acked_applied, applied_lsn)
        out = [Send(Ack(received_lsn, applied_lsn))]
        if granted:
            out.append(Send(Credit(granted)))
        return out

    def applied(self, received_lsn: int, applied_lsn: int) -> list[Send]:
        """The applied LSN may have moved: acknowledge it (once per move)."""
        if applied_lsn == self._acked_applied:
            return []
        self._acked_applied = applied_lsn
        return [Send(Ack(received_lsn, applied_lsn))]

    @staticmethod
    def control(msg: Message) -> list[Send]:
        """Answers that need nothing but the message (heartbeats)."""
        if isinstance(msg, Ping):
            return [Send(Pong(msg.nonce, msg.ts_ns))]
        return []


def check_record(record: Record) -> None:
    """Refuse a record no sender of ours makes: a path outside the replica folder, a range
    past what a file can hold, an LSN past what a journal numbers (2^63-1: a sender's
    journal never gets there; it was taken for a storage error of the receiver's, which
    sent its operator looking for a disk problem). Raises RemoteProtocolError naming the
    record."""
    if record.lsn > MAX_LSN:
        raise RemoteProtocolError(
            f"refusing record lsn {record.lsn}: LSNs end at {MAX_LSN} (the sender's journal "
            "never numbers so far)"
        )
    for path in _paths(record):
        problem = path_problem(path)
        if problem is not None:
            raise RemoteProtocolError(f"refusing record lsn {record.lsn}: {problem}")
    if record.type in _RANGED and record.offset + max(record.length, len(record.data)) > (
        MAX_FILE_BYTES
    ):
        raise RemoteProtocolError(
            f"record lsn {record.lsn} ({record.type.name}) reaches past {MAX_FILE_BYTES} bytes"
        )


def _paths(record: Record) -> Iterable[str]:
    if record.volume:
        yield record.volume
    if record.type is RecordType.RENAME:
        yield record.target


__all__ = [
    "FRAME_TARGET",
    "Action",
    "Deliver",
    "HandoverStep",
    "ReceiverCore",
    "Send",
    "SenderCore",
    "Trim",
    "Woken",
    "check_record",
    "refusal_error",
]
