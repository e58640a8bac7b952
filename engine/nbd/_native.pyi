"""The C batch path for small NBD WRITEs (``_native.c``; see ``native.py``)."""

def scan_writes(
    buf: bytes | bytearray | memoryview,
    pos: int,
    end: int,
    max_length: int,
    file_size: int,
    max_count: int,
    /,
) -> tuple[int, int, int]: ...
def encode_writes(
    batch: bytes | memoryview, count: int, name: bytes, lsn: int, ts_ns: int, /
) -> tuple[bytes, bytes]: ...
def pwrite_records(
    fd: int, records: bytes | memoryview, count: int, name_len: int, /
) -> list[tuple[int, int]]: ...
