"""The write-order journal: records, segments, append with group commit, replay, trim."""

from replicator.journal.errors import JournalCorrupt, JournalError, JournalFull
from replicator.journal.journal import Journal
from replicator.journal.records import (
    HEADER_SIZE,
    MAX_DATA,
    EncodedRecord,
    Record,
    RecordError,
    RecordType,
    check_record,
    decode_record,
    decode_records,
    encode_record,
    peek_length,
)

__all__ = [
    "HEADER_SIZE",
    "MAX_DATA",
    "EncodedRecord",
    "Journal",
    "JournalCorrupt",
    "JournalError",
    "JournalFull",
    "Record",
    "RecordError",
    "RecordType",
    "check_record",
    "decode_record",
    "decode_records",
    "encode_record",
    "peek_length",
]
