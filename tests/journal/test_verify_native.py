"""The C check of a RECORDS frame's checksums (journal/_verify.c, journal/native.py) vouches
only for whole, intact version 2 records, and ``decode_records`` with it decodes and refuses
exactly what the Python decoder alone does, naming each error the same way."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.journal import Record, RecordError, decode_records, encode_record, native, records
from tests.journal.strategies import RECORDS
from tests.journal.test_record_versions import _as_version_1

try:
    from replicator.journal import _verify
except ImportError:  # tested below: `make install` builds it
    _verify = None  # type: ignore[assignment]

# each record as written (version 2) or as version 1 wrote it (blake3: C leaves it to Python)
_STORED = st.tuples(RECORDS, st.booleans())


def _encoded(stored: list[tuple[Record, bool]]) -> list[bytes]:
    out = []
    for i, (record, old) in enumerate(stored):
        raw = encode_record(record.with_lsn(100 + i, 7))
        out.append(_as_version_1(raw) if old else raw)
    return out


def _decoded(buf: bytes, monkeypatch: pytest.MonkeyPatch, check: object) -> object:
    """What ``decode_records`` returns (as comparable tuples) or the error it raises."""
    with monkeypatch.context() as m:
        m.setattr(records, "verified_prefix", check)
        try:
            got = decode_records(buf)
        except RecordError as exc:
            return ("error", type(exc), str(exc))
    return [(r.type, r.volume, r.offset, r.length, bytes(r.data), r.lsn, r.ts_ns) for r in got]


def test_make_install_built_the_check() -> None:
    assert _verify is not None, (
        "journal/_verify.c was not built: run `make install` (it needs gcc, python3-dev and "
        "libxxhash-dev: `make sysdeps`); pip printed why it could not build it"
    )
    if not native.pure_python():
        assert native.verified_prefix is _verify.verified_prefix
        assert vars(records)["verified_prefix"] is _verify.verified_prefix  # what decodes


def test_the_environment_variable_leaves_the_check_to_python() -> None:
    probe = "from replicator.journal import records; assert records.verified_prefix is None"
    env = {**os.environ, native.PURE_PYTHON_ENV: "1"}
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=60)


@given(st.lists(_STORED, max_size=8))
def test_intact_records_are_vouched_for_up_to_the_first_version_1(
    stored: list[tuple[Record, bool]],
) -> None:
    assert _verify is not None
    parts = _encoded(stored)
    blob = b"".join(parts)
    first_old = next((i for i, (_, old) in enumerate(stored) if old), len(stored))
    assert _verify.verified_prefix(blob) == sum(len(p) for p in parts[:first_old])
    assert _verify.verified_prefix(bytearray(blob)) == _verify.verified_prefix(memoryview(blob))


@given(st.lists(RECORDS, min_size=1, max_size=6), st.data())
def test_no_changed_byte_is_vouched_for(records_: list[Record], data: st.DataObject) -> None:
    """Any one byte changed, or the frame cut anywhere: the C check stops at or before
    the record it lies in (what its checksum covers, its lengths and its magic)."""
    assert _verify is not None
    parts = _encoded([(r, False) for r in records_])
    blob = bytearray(b"".join(parts))
    at = data.draw(st.integers(0, len(blob) - 1), label="byte")
    blob[at] ^= data.draw(st.integers(1, 255), label="xor")
    starts = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]
    record_start = max(s for s in starts if s <= at)
    assert _verify.verified_prefix(blob) <= record_start
    cut = data.draw(st.integers(0, len(blob) - 1), label="cut")
    whole = max(s for s in [*starts, len(blob)] if s <= cut)
    assert _verify.verified_prefix(bytes(b"".join(parts))[:cut]) == whole


@given(st.lists(_STORED, min_size=1, max_size=6), st.data())
def test_decoding_with_the_check_finds_and_names_what_python_alone_does(
    stored: list[tuple[Record, bool]], data: st.DataObject
) -> None:
    assert _verify is not None
    blob = bytearray(b"".join(_encoded(stored)))
    damage = data.draw(st.sampled_from(["none", "flip", "cut"]), label="damage")
    if damage == "flip":
        at = data.draw(st.integers(0, len(blob) - 1), label="byte")
        blob[at] ^= data.draw(st.integers(1, 255), label="xor")
    elif damage == "cut":
        del blob[data.draw(st.integers(1, len(blob) - 1), label="cut") :]
    buf = bytes(blob)
    with pytest.MonkeyPatch.context() as monkeypatch:
        with_c = _decoded(buf, monkeypatch, _verify.verified_prefix)
        python_alone = _decoded(buf, monkeypatch, None)
    assert with_c == python_alone
    if damage == "none":
        assert isinstance(with_c, list) and len(with_c) == len(stored)
