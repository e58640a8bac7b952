"""Message constructors accept exactly the valid messages."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from replicator.journal.records import Record, encode_record
from replicator.transport import (
    PROTOCOL_VERSION,
    Ack,
    Credit,
    Error,
    Goodbye,
    Hello,
    Manifest,
    ManifestRequest,
    Message,
    MessageError,
    Ping,
    Records,
    Refuse,
    VolumeInfo,
    Welcome,
)
from replicator.transport.messages import MAX_TEXT

from .helpers import HELLO, pack_records


def _hello(**changes: object) -> Hello:
    return dataclasses.replace(HELLO, **changes)  # type: ignore[arg-type]


INVALID: dict[str, Callable[[], Message | VolumeInfo]] = {
    "negative size": lambda: VolumeInfo("a", -1, "disk"),
    "bool as int": lambda: VolumeInfo("a", True, "disk"),
    "float as int": lambda: Ping(1.0, 0),  # type: ignore[arg-type]
    "u64 overflow": lambda: Ping(2**64, 0),
    "i64 overflow": lambda: Ping(0, 2**63),
    "unknown kind": lambda: VolumeInfo("a", 1, "tape"),
    "empty volume name": lambda: VolumeInfo("", 1, "disk"),
    "newline in name": lambda: VolumeInfo("a\nb", 1, "disk"),
    "NUL in name": lambda: VolumeInfo("a\0b", 1, "disk"),
    "lone surrogate": lambda: VolumeInfo("a\ud800", 1, "disk"),
    "name too long": lambda: VolumeInfo("x" * 4097, 1, "disk"),
    "empty job": lambda: _hello(job=""),
    "job too long": lambda: _hello(job="j" * 256),
    "volumes as list": lambda: _hello(volumes=[VolumeInfo("a", 1, "disk")]),
    "duplicate volume": lambda: _hello(volumes=(VolumeInfo("a", 1, "disk"),) * 2),
    "too many volumes": lambda: _hello(
        volumes=tuple(VolumeInfo(f"v{i}", 1, "disk") for i in range(257))
    ),
    "capability not a token": lambda: _hello(capabilities=("LZ4",)),
    "duplicate capability": lambda: _hello(capabilities=("lz4", "lz4")),
    "empty session": lambda: _hello(session=""),
    "applied above received (Welcome)": lambda: Welcome(PROTOCOL_VERSION, 1, 2, 0, (), 0),
    "applied above received (Ack)": lambda: Ack(5, 6),
    "zero credit": lambda: Credit(0),
    "unknown refuse code": lambda: Refuse("nope", "x"),
    "error code not a token": lambda: Error("Bad Code", "x"),
    "extent size not a multiple of 512": lambda: ManifestRequest(1, "a", 1000, False),
    "extent size too large": lambda: ManifestRequest(1, "a", 2 << 30, False),
    "fresh not bool": lambda: ManifestRequest(1, "a", 4096, 1),  # type: ignore[arg-type]
    "digests not multiple of 16": lambda: Manifest(1, "a", True, 4096, 4096, 0, b"x" * 15, False),
    "digests beyond the volume": lambda: Manifest(1, "a", True, 4096, 4096, 0, b"x" * 32, False),
    "done before the end": lambda: Manifest(1, "a", True, 8192, 4096, 0, b"x" * 16, True),
    "missing volume with digests": lambda: Manifest(1, "a", False, 0, 4096, 0, b"x" * 16, True),
    "missing volume with size": lambda: Manifest(1, "a", False, 10, 4096, 0, b"", True),
    "missing volume not done": lambda: Manifest(1, "a", False, 0, 4096, 0, b"", False),
    "digests not bytes": lambda: Manifest(1, "a", True, 16, 4096, 0, "x" * 16, True),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_fields_are_rejected(case: str) -> None:
    with pytest.raises(MessageError):
        INVALID[case]()


def _payload(*lsns: int) -> bytes:
    return b"".join(encode_record(Record.write("v", 0, b"d").with_lsn(n)) for n in lsns)


RECORDS_INVALID: dict[str, tuple[int, int, int, bytes]] = {
    "lsn zero": (0, 0, 1, _payload(0)),
    "backwards": (3, 2, 1, _payload(3)),
    "count zero": (1, 1, 0, _payload(1)),
    "count beyond span": (1, 2, 3, _payload(1, 2)),
    "empty payload": (1, 1, 1, b""),
    "count mismatch": (1, 3, 2, _payload(1, 2, 3)),
    "first lsn mismatch": (1, 2, 2, _payload(2, 3)),
    "last lsn mismatch": (1, 5, 2, _payload(1, 2)),
    "lsns not increasing": (1, 3, 2, _payload(3, 3)),
    "lsns decreasing": (1, 3, 3, _payload(1, 3, 2)),
    "stray bytes": (1, 1, 1, _payload(1) + b"xx"),
    "cut record": (1, 1, 1, _payload(1)[:-1]),
    "not a record": (1, 1, 1, b"\0" * 80),
}


@pytest.mark.parametrize("case", sorted(RECORDS_INVALID))
def test_records_payload_must_match_its_header(case: str) -> None:
    first, last, count, payload = RECORDS_INVALID[case]
    with pytest.raises(MessageError):
        Records(first, last, count, 0, payload)


def test_valid_records_with_gaps_between_lsns() -> None:
    msg = Records(5, 9, 3, -1, _payload(5, 7, 9))
    assert msg.count == 3


def test_buffers_are_stored_as_bytes() -> None:
    payload = _payload(1)
    msg = Records(1, 1, 1, 0, bytearray(payload))  # type: ignore[arg-type]
    assert type(msg.payload) is bytes and msg.payload == payload
    manifest = Manifest(1, "a", True, 4096, 4096, 0, memoryview(b"d" * 16), True)  # type: ignore[arg-type]
    assert type(manifest.digests) is bytes and manifest.digests == b"d" * 16


def test_payload_is_not_copied_when_already_bytes() -> None:
    msg = pack_records(1, [b"abc" * 100])
    assert Records(1, 1, 1, 0, msg.payload).payload is msg.payload


def test_text_is_made_printable_and_bounded() -> None:
    msg = Error("internal", "line one\nline two\x1b[31m")
    assert msg.message == "line one\ufffdline two\ufffd[31m"
    long = Goodbye("x" * (MAX_TEXT + 10))
    assert len(long.reason) == MAX_TEXT and long.reason.endswith("\u2026")
    assert Refuse("busy", long.reason) == Refuse("busy", long.reason)  # idempotent


def test_repr_of_bulk_messages_is_short() -> None:
    msg = pack_records(1, [bytes(100_000)])
    assert "100" in repr(msg) and len(repr(msg)) < 200
    manifest = Manifest(1, "a", True, 4096 * 4, 4096, 0, b"d" * 64, True)
    assert "4 extents" in repr(manifest)


def test_messages_are_frozen() -> None:
    msg = Ack(2, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.received_lsn = 3  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        msg.extra = 1  # type: ignore[attr-defined]
