"""The helper process of a differential scan (``engine/extent_hasher.py``): it reads runs of
extents from the file it inherits into one small buffer, hashes them there, and streams the
digests back on stdout, in the order asked for.

Run as ``python -m replicator.engine.hashing_helper FD``; it reads its work on stdin:
``<QQQQ`` (size, extent size, digest size, number of runs), then ``<QQ`` (first extent,
count) per run. Imports nothing but the standard library and blake3, to start quickly.

Why a buffer of ``READ`` bytes read over and over, and not a mapping of the file (which
these helpers used until 2026-12-04): the buffer stays in the core's own cache between the
``pread`` that fills it and the hash that reads it, and its pages are touched once. A
mapping copies nothing, but every 64 KiB of it costs a page fault on the way in and its
page tables must be torn down on the way out; on the EPYC host that made hashing a GiB
cost 210-230 ms of CPU against 165-180 ms through the buffer (bench/RESULTS.md, "2026-12-04,
late"). A file that shrinks under a read also just reads short (the rest is hashed as
zeros, as the scan's own reads treat it), where a mapping died of SIGBUS.

An extent of zeros is not hashed: its digest is the zero digest, computed once per length,
as the scan's own reads do (``volumes._read_chunk``); the check is a compare in place.
"""

from __future__ import annotations

import os
import struct
import sys

import blake3

TYPE_CHECKING = False  # what mypy reads as typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:  # (typing took a third of this process's start)
    import subprocess
    from collections.abc import Callable
    from typing import BinaryIO

COMMAND = [sys.executable, "-m", "replicator.engine.hashing_helper"]  # + the fd

RUN = struct.Struct("<QQ")  # (first extent, count)
HEAD = struct.Struct("<QQQQ")  # size, extent size, digest size, number of runs
# Bytes read at a time: a few extents of the default size, small enough to stay in a
# core's L2 cache between the read and the hash (256 KiB measured best of 256 KiB-4 MiB).
READ = 256 * 1024


def request(size: int, extent_size: int, digest_size: int, runs: list[tuple[int, int]]) -> bytes:
    """What the scan writes to a helper's stdin."""
    head = HEAD.pack(size, extent_size, digest_size, len(runs))
    return head + b"".join(RUN.pack(first, count) for first, count in runs)


def spawn(fd: int, request_bytes: bytes, *, pipe_bytes: int = 0) -> subprocess.Popen[bytes]:
    """A helper hashing ``fd`` as ``request_bytes`` asks; its digests come on its stdout.

    ``pipe_bytes`` widens that pipe (F_SETPIPE_SZ, best effort), so that a helper started
    before anyone reads it can run that far ahead. Raises OSError when it cannot start or
    dies before taking its work. (``subprocess`` is imported here: the helper process itself
    never needs it.)
    """
    import contextlib
    import fcntl
    import subprocess

    proc = subprocess.Popen(
        [*COMMAND, str(fd)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        pass_fds=(fd,),
        # not in the terminal's process group: a Ctrl-C is for the sender to handle (a
        # helper whose sender is gone dies at its next write, on the closed pipe)
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    if pipe_bytes:  # above /proc/sys/fs/pipe-max-size: the helper waits for a reader sooner
        with contextlib.suppress(OSError):
            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, pipe_bytes)
    try:
        proc.stdin.write(request_bytes)  # read whole before any digest is written
        proc.stdin.close()
    except OSError:  # it died at once
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise
    return proc


def stop(proc: subprocess.Popen[bytes], reap: Callable[[], None] | None = None) -> None:
    """Kill a helper and reap it in a daemon thread of its own: the caller does not wait
    for its exit (milliseconds; tens for a helper that had mapped a large image). SIGKILL
    cannot be refused, so nothing is left behind. ``reap`` replaces the default reaping
    (wait, then close its stdout) for a caller with more to do once the process is gone."""
    import contextlib
    import threading

    def default_reap() -> None:
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    threading.Thread(target=reap or default_reap, name="hashing-helper-reap", daemon=True).start()


def serve(fd: int, requests: BinaryIO, out: BinaryIO) -> None:
    """Answer one request: one digest per extent, each run flushed when hashed.

    Where the file ends before ``size`` the extent is hashed as if zero-filled, as the
    scan's own reads treat a file that shrank.
    """
    size, extent_size, digest_size, n_runs = HEAD.unpack(requests.read(HEAD.size))
    runs = [RUN.unpack(requests.read(RUN.size)) for _ in range(n_runs)]
    reader = _Reader(fd, size, extent_size, digest_size)
    for first, count in runs:
        if extent_size <= READ:
            digests = reader.small_extents(first, count)
        else:
            digests = reader.large_extents(first, count)
        out.write(digests)
        out.flush()


class _Reader:
    """One buffer, refilled by ``pread`` for each piece of the runs asked for."""

    def __init__(self, fd: int, size: int, extent_size: int, digest_size: int) -> None:
        self.fd, self.size, self.extent_size, self.digest_size = fd, size, extent_size, digest_size
        self.per_read = max(1, READ // extent_size)  # whole extents per read, when they fit
        self.buf = bytearray(min(READ, self.per_read * extent_size))
        self.view = memoryview(self.buf)

    def _read(self, offset: int, length: int) -> None:
        """Fill the buffer's first ``length`` bytes from ``offset``; zeros past the end."""
        got = 0
        while got < length:
            n = os.preadv(self.fd, [self.view[got:length]], offset + got)
            if n == 0:  # the file ends here (it shrank since the scan took its size)
                self.view[got:length] = _zero_bytes(length - got)
                return
            got += n

    def small_extents(self, first: int, count: int) -> bytes:
        """Digests of extents no larger than the buffer: several per read."""
        digests = bytearray()
        size, extent_size, digest_size = self.size, self.extent_size, self.digest_size
        end = first + count
        idx = first
        while idx < end:
            n = min(self.per_read, end - idx)
            base = idx * extent_size
            self._read(base, min(n * extent_size, size - base))
            for at in range(0, n * extent_size, extent_size):
                length = min(extent_size, size - base - at)
                if self.buf.startswith(_zero_bytes(length), at):  # memcmp in place
                    digests += _zero_digest(length, digest_size)
                else:
                    digests += blake3.blake3(self.view[at : at + length]).digest(digest_size)
            idx += n
        return bytes(digests)

    def large_extents(self, first: int, count: int) -> bytes:
        """Digests of extents larger than the buffer (an embedder may choose up to 1 GiB):
        each read a buffer at a time. Zeros at an extent's start are only counted; they are
        hashed (from the cached zeros) once a piece with data shows the extent has some."""
        digests = bytearray()
        for idx in range(first, first + count):
            base = idx * self.extent_size
            length = min(self.extent_size, self.size - base)
            hasher: blake3.blake3 | None = None
            leading_zeros = 0
            for at in range(0, length, len(self.buf)):
                n = min(len(self.buf), length - at)
                self._read(base + at, n)
                if hasher is None and self.buf.startswith(_zero_bytes(n)):
                    leading_zeros += n
                    continue
                if hasher is None:
                    hasher = blake3.blake3()
                    for z in range(0, leading_zeros, len(self.buf)):
                        hasher.update(_zero_bytes(min(len(self.buf), leading_zeros - z)))
                hasher.update(self.view[:n])
            if hasher is None:
                digests += _zero_digest(length, self.digest_size)
            else:
                digests += hasher.digest(self.digest_size)
        return bytes(digests)


# volumes.zeros and volumes.zero_digest, kept apart: importing engine/volumes.py brings in
# the protocol's messages and the engine's errors, which this process starts without
_zeros: dict[int, bytes] = {}
_zero_digests: dict[tuple[int, int], bytes] = {}


def _zero_bytes(length: int) -> bytes:
    zeros = _zeros.get(length)
    if zeros is None:
        zeros = _zeros[length] = bytes(length)
    return zeros


def _zero_digest(length: int, digest_size: int) -> bytes:
    """The digest of ``length`` zero bytes: hashed once per length, a buffer at a time."""
    digest = _zero_digests.get((length, digest_size))
    if digest is None:
        hasher = blake3.blake3()
        for at in range(0, length, READ):
            hasher.update(_zero_bytes(min(READ, length - at)))
        digest = _zero_digests[(length, digest_size)] = hasher.digest(digest_size)
    return digest


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.stdin.buffer, sys.stdout.buffer)
