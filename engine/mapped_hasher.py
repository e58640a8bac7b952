"""The helper process of a differential scan (``engine/extent_hasher.py``): it hashes runs
of extents through a read-only ``mmap`` of the file it inherits, and streams the digests
back on stdout, in the order asked for.

Run as ``python -m replicator.engine.mapped_hasher FD``; it reads its work on stdin:
``<QQQQ`` (size, extent size, digest size, number of runs), then ``<QQ`` (first extent,
count) per run. A file that shrinks under the mapping kills this process with SIGBUS,
which is the point of running it apart: the scan sees the pipe end early and reads the
rest itself. Imports nothing but the standard library and blake3, to start quickly.

An extent of zeros is not hashed: its digest is the zero digest, computed once per length,
as the scan's own reads do (``volumes._read_chunk``). A mapping has no in-place compare, so
the extent is copied out and compared, ``COMPARE`` bytes at a time, which costs a third of
hashing it; its first ``PROBE`` bytes are compared first, so an extent with data pays next
to nothing for the check. On the 1% bench's image (a quarter zeros) the helpers' CPU fell
by 20-25% (bench/RESULTS.md, "2026-12-04, night").
"""

from __future__ import annotations

import mmap
import os
import struct
import sys

import blake3

TYPE_CHECKING = False  # what mypy reads as typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:  # (typing took a third of this process's start)
    from typing import BinaryIO

RUN = struct.Struct("<QQ")  # (first extent, count)
PROBE = 64  # leading bytes of an extent compared before all of it is
COMPARE = 1024 * 1024  # bytes copied out per compare: bounded whatever the extent size
HEAD = struct.Struct("<QQQQ")  # size, extent size, digest size, number of runs


def request(size: int, extent_size: int, digest_size: int, runs: list[tuple[int, int]]) -> bytes:
    """What the scan writes to a helper's stdin."""
    head = HEAD.pack(size, extent_size, digest_size, len(runs))
    return head + b"".join(RUN.pack(first, count) for first, count in runs)


def serve(fd: int, requests: BinaryIO, out: BinaryIO) -> None:
    """Answer one request: one digest per extent, each run flushed when hashed.

    Where the file ends before ``size`` the extent is hashed as if zero-filled, as the
    scan's own reads treat a file that shrank.
    """
    size, extent_size, digest_size, n_runs = HEAD.unpack(requests.read(HEAD.size))
    runs = [RUN.unpack(requests.read(RUN.size)) for _ in range(n_runs)]
    mapped = min(size, os.fstat(fd).st_size)
    region = mmap.mmap(fd, mapped, prot=mmap.PROT_READ) if mapped else None
    view = memoryview(region) if region is not None else memoryview(b"")
    try:
        for first, count in runs:
            digests = bytearray()
            for idx in range(first, first + count):
                off = idx * extent_size
                length = min(extent_size, size - off)
                with view[off : off + length] as piece:  # shorter where the file ends early
                    if len(piece) < length:
                        padded = bytes(piece) + bytes(length - len(piece))
                        digests += blake3.blake3(padded).digest(digest_size)
                    elif region is not None and _all_zeros(region, off, length):
                        digests += _zero_digest(length, digest_size)
                    else:
                        digests += blake3.blake3(piece).digest(digest_size)
            out.write(digests)
            out.flush()
    finally:
        view.release()
        if region is not None:
            region.close()


# volumes.zeros and volumes.zero_digest, kept apart: importing engine/volumes.py brings in
# the protocol's messages and the engine's errors, which this process starts without
_zeros: dict[int, bytes] = {}
_zero_digests: dict[tuple[int, int], bytes] = {}


def _all_zeros(region: mmap.mmap, off: int, length: int) -> bool:
    """Whether ``length`` bytes at ``off`` are all zero: a few first, then the rest, at
    most ``COMPARE`` bytes at a time."""
    probe = min(PROBE, length)
    if region[off : off + probe] != _zero_bytes(probe):
        return False
    end = off + length
    off += probe  # compared already
    while off < end:
        n = min(COMPARE, end - off)
        if region[off : off + n] != _zero_bytes(n):
            return False
        off += n
    return True


def _zero_bytes(length: int) -> bytes:
    zeros = _zeros.get(length)
    if zeros is None:
        zeros = _zeros[length] = bytes(length)
    return zeros


def _zero_digest(length: int, digest_size: int) -> bytes:
    digest = _zero_digests.get((length, digest_size))
    if digest is None:
        digest = blake3.blake3(_zero_bytes(length)).digest(digest_size)
        _zero_digests[(length, digest_size)] = digest
    return digest


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.stdin.buffer, sys.stdout.buffer)
