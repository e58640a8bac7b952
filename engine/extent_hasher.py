"""A differential scan that hashes the image in helper processes, beside the scan.

A scan with a basis (the previous cycle's manifest) needs the data of the few extents that
changed and only the digest of all the others. Hashing a GiB takes a core most of 0.2 s,
and threads of the sending process would share its lock with the event loop that ships. So
helper processes (``engine/hashing_helper.py``), two by default, hash the allocated extents
a read chunk (4 MiB) each in turn, each reading through a small buffer of its own, and
stream one digest per extent back on a pipe. The scan reads (``pread``) and hashes again
only the extents whose digest differs from the basis: the digest a manifest keeps is always
the one of the bytes shipped.

When a helper cannot start, dies (killed, out of memory) or more than a quarter of the
extents turn out changed (a first sync against a stale replica: reading them all in one
pass is cheaper), the rest of the volume is scanned by ``volumes.iter_runs``.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Final

import structlog

from replicator.engine import early_hashing, hashing_helper
from replicator.engine.read_plan import DEFAULT_EXTENT, HELPER_MIN_SIZE, HELPERS, helper_plan
from replicator.engine.volumes import (
    Extent,
    ExtentState,
    Holes,
    Unchanged,
    digest_runs,
    extent_digest,
    iter_runs,
    pread_all,
    zero_digest,
    zeros,
)
from replicator.transport.messages import DIGEST_SIZE

log = structlog.get_logger("replicator.scan")

# Digests a helper may send beyond what the scan took: 16,384 (1 GiB of 64 KiB extents),
# or the run the scan waits for when that is longer.
AHEAD: Final = 16_384 * DIGEST_SIZE
# More changed extents than this share (past the first CHANGED_MIN): leave the helpers.
CHANGED_MIN: Final = 64
CHANGED_SHARE: Final = 0.25
# Extents whose digests are compared at once inside a run that differs from its basis.
BLOCK: Final = 16
# The basis's digests of ``count`` extents from ``first`` (``ExtentManifest.slice``).
BasisSlice = Callable[[int, int], bytes]


class _HelperFailed(Exception):
    pass


class _Helper:
    """One helper process and the digests it has sent that the scan has not taken yet.

    A reader thread drains its pipe up to AHEAD bytes of digests beyond what the scan took
    (then the helper waits on the full pipe): memory stays bounded on any disk, and the
    shares are dealt out in turns (``read_plan.deal``), so every helper hashes near the scan.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        """Take over ``proc``, a helper started with its work (``hashing_helper.spawn``)."""
        assert proc.stdout is not None
        self.proc = proc
        self._out = proc.stdout.fileno()
        self._digests = bytearray()  # received and not taken yet
        self._wanted = 0  # bytes a take() waits for: the reader goes on until it has them
        self._ended = False
        self._closing = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="scan-hasher", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                with self._changed:
                    while len(self._digests) >= max(AHEAD, self._wanted) and not self._closing:
                        self._changed.wait()
                    if self._closing:
                        return
                chunk = os.read(self._out, 64 * 1024)
                if not chunk:
                    return
                with self._changed:
                    self._digests += chunk
                    self._changed.notify_all()
        except OSError:
            pass  # the helper is gone; take() says so
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def take(self, count: int) -> bytes:
        """The next ``count`` digests this helper sends, in the order of its runs (waits
        for them); one call per run, not per extent."""
        end = count * DIGEST_SIZE
        with self._changed:
            self._wanted = end
            self._changed.notify_all()
            while len(self._digests) < end and not self._ended:
                self._changed.wait()
            self._wanted = 0
            if len(self._digests) < end:
                raise _HelperFailed(f"the hashing helper ended early (status {self.proc.wait()})")
            digests = bytes(self._digests[:end])
            del self._digests[:end]  # bytearray drops a prefix without moving the rest
            self._changed.notify_all()  # room again for the reader
            return digests

    def close(self) -> None:
        """Kill the helper, and reap it in a thread of its own (``hashing_helper.stop``):
        the scan's last batch and the epoch's end do not wait for its exit."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        hashing_helper.stop(self.proc, self._reap)

    def _reap(self) -> None:
        self.proc.wait()
        self._reader.join()  # it sees EOF once the process is gone
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _changed_extent(fd: int, index: int, offset: int, length: int) -> Extent:
    """Read a changed extent; its digest is the one of the bytes read (what ships)."""
    data = pread_all(fd, length, offset)
    if len(data) < length:  # the file shrank: the rest reads as zeros
        data += zeros(length - len(data))
    if data == zeros(length):
        return Extent(index, offset, length, ExtentState.ZERO, zero_digest(length), None)
    return Extent(index, offset, length, ExtentState.DATA, extent_digest(data), memoryview(data))


def iter_extents_against(
    fd: int,
    size: int,
    basis: BasisSlice,
    extent_size: int = DEFAULT_EXTENT,
    *,
    helpers: int = HELPERS,
    min_size: int = HELPER_MIN_SIZE,
) -> Iterator[Extent | Unchanged | Holes]:
    """Every extent of ``fd`` up to ``size``, as ``volumes.iter_runs`` gives it, for a
    scan whose previous digests ``basis(first, count)`` gives (DIGEST_SIZE bytes per
    extent, shorter where they end: ``ExtentManifest.slice``).

    The differences: where helpers hash, extents whose digests equal the basis's come in
    runs (``Unchanged``), not one by one; where threads read, such a DATA extent comes
    without its data (``data`` is None). Every other DATA extent carries its data.
    """
    plan, shares = helper_plan(fd, size, extent_size, helpers) if size >= min_size else ([], [])
    if not shares:
        yield from iter_runs(fd, size, extent_size)
        return
    # started at the command's start (engine/early_hashing.py), when asked exactly this
    early = early_hashing.take(fd, size, extent_size, DIGEST_SIZE, shares)
    started = [_Helper(proc) for proc in early] if early is not None else []
    try:
        for share in shares[len(started) :]:
            request = hashing_helper.request(size, extent_size, DIGEST_SIZE, share)
            started.append(_Helper(hashing_helper.spawn(fd, request)))
    except OSError as exc:
        for helper in started:
            helper.close()
        log.info("scan.helpers_unavailable", error=str(exc))
        yield from iter_runs(fd, size, extent_size)
        return
    log.debug(
        "scan.hashing_in_helpers",
        helpers=len(started),
        early=early is not None,
        extents=sum(count for hand in shares for _, count in hand),
    )
    segments: list[tuple[int, int, _Helper | None]] = [
        (first, count, None) for read, first, count in plan if not read
    ]
    for helper, share in zip(started, shares, strict=True):
        segments += [(first, count, helper) for first, count in share]
    segments.sort(key=lambda segment: segment[0])
    try:
        resume_at = yield from _hashed(fd, size, extent_size, basis, segments)
    finally:
        for helper in started:
            helper.close()
    if resume_at is not None:
        yield from iter_runs(fd, size, extent_size, first=resume_at)


def _hashed(
    fd: int,
    size: int,
    extent_size: int,
    basis: BasisSlice,
    segments: list[tuple[int, int, _Helper | None]],
) -> Generator[Extent | Unchanged | Holes, None, int | None]:
    """The extents of ``segments`` (holes, or runs a helper hashes); returns where the
    threaded scan must take over, or None when done.

    A hole comes out as one ``Holes`` (the scan compares its digests). A hashed segment's
    digests are compared with the basis's at once, then a block of ``BLOCK`` at a time
    where they differ: only the extents that changed are visited one by one, and every
    run between them comes out as one ``Unchanged``."""
    seen = changed = 0
    for first, count, helper in segments:
        if helper is None:
            yield Holes(first, count)
            continue
        try:
            new = helper.take(count)
        except _HelperFailed as exc:
            log.info("scan.helper_failed", error=str(exc), extent=first)
            return first
        # shorter where the basis ends: an extent past it is UNKNOWN, never equal
        old = basis(first, count)
        for lo, hi, same in digest_runs(old, new, BLOCK):
            if same:
                yield Unchanged(first + lo, hi - lo, new[lo * DIGEST_SIZE : hi * DIGEST_SIZE])
                continue
            for k in range(lo, hi):
                # what ships, and its digest, come from reading it now (not the helper)
                idx = first + k
                off = idx * extent_size
                changed += 1
                yield _changed_extent(fd, idx, off, min(extent_size, size - off))
                if changed > CHANGED_MIN and changed > (seen + k + 1) * CHANGED_SHARE:
                    return idx + 1  # most of it changed: one reading pass is cheaper
        seen += count
    return None
