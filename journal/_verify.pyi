def verified_prefix(buf: bytes | bytearray | memoryview, /) -> int: ...
def framed_run(
    buf: bytes | memoryview,
    start: int,
    end: int,
    prev_lsn: int | None,
    limit: int,
    max_name: int,
    max_data: int,
    versions: bytes,
    types: bytes,
    /,
) -> tuple[int, int, int, int, int]: ...
