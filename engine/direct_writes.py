"""Large writes to a replica go past the page cache (``O_DIRECT``).

A replica is written and then, until a failover, hardly read: keeping what it was written
with in the page cache only spends memory. On an ordinary machine that memory is cheap,
but on a VM that hands its free memory back to the host (virtio-balloon free page
reporting) each new page-cache page faults into the host when first written: there a
1 MiB ``pwrite`` into a new replica cost 7-10 ms of system CPU against 0.1-0.2 ms past the
page cache (bench/RESULTS.md, "2026-12-04"), and a receiver on a 1 Gbit/s link spent most
of a vCPU on it. DRBD writes its backing device and qemu with ``cache=none`` its images
the same way.

Only large, aligned writes go this way: ``DIRECT_MIN`` bytes or more, offset and length
multiples of ``ALIGN``. Small writes keep the page cache, which gathers them for the
barrier's ``fsync``. The caller says when (``past_cache`` in ``Applier.apply_many``):
the applies of journaled records always, since they run beside the session and a write
waiting for the device holds nobody up; a first sync's, applied as they arrive on the
receive path where the device's latency is the sender's wait, whenever the receiver
measures it faster than the page cache at the time (``engine/write_path.py``): on loopback
1 GiB took 2.1-2.4 s past the cache against 1.7-1.9 s through it on a machine whose memory
was all backed, and 1.9-2.0 s against 6-10 s on the same machine once it was not.

Durability does not change: the barrier still ``fsync``s every file written since the
last one, through its ordinary descriptor, and that covers writes through any descriptor
of the file (the data, the blocks they allocated, the device's write cache). The kernel
keeps the two kinds coherent: a direct write first writes back and then drops cached
pages of its range, so a later read or buffered write sees it.

A file system that refuses ``O_DIRECT`` (at open or at the first write: ``EINVAL``) is
remembered and written the ordinary way from then on.
"""

from __future__ import annotations

import errno
import mmap
import os

from replicator.engine.volumes import pwrite_all

DIRECT_MIN = 256 * 1024  # smaller writes stay in the page cache
ALIGN = 4096  # offset, length and buffer address of a direct write: any disk's sector
BOUNCE_BYTES = 1024 * 1024  # the aligned buffer records are copied through

# what a file system that cannot write past its page cache answers
_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})


def eligible(offset: int, length: int) -> bool:
    """Whether a write of ``length`` bytes at ``offset`` goes past the page cache."""
    return length >= DIRECT_MIN and offset % ALIGN == 0 and length % ALIGN == 0


class DirectWrites:
    """The ``O_DIRECT`` descriptors of one applier's files, and the buffer to write from.
    Blocking and not thread-safe, like the applier that owns it."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._refused: set[int] = set()  # st_dev of file systems without O_DIRECT
        self._bounce: mmap.mmap | None = None

    def write(self, path: str, fd: int, data: bytes | memoryview, offset: int) -> bool:
        """Write ``data`` at ``offset`` of ``path`` (open as ``fd``) past the page cache.
        False when it does not go that way (too small, unaligned, or the file system
        refuses): then nothing needs undoing, and the caller writes it through ``fd``."""
        if not eligible(offset, len(data)):
            return False
        direct = self._descriptor(path, fd)
        if direct is None:
            return False
        bounce = self._buffer()
        view = memoryview(data)
        done = 0
        while done < len(view):
            n = min(len(bounce), len(view) - done)
            bounce[:n] = view[done : done + n]
            try:
                wrote = os.pwrite(direct, memoryview(bounce)[:n], offset + done)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED or done:
                    raise
                self._refuse(path, fd)  # refused at the first write: ordinary from now on
                return False
            done += wrote
            if wrote < n:  # short (a full disk says so on the next write): finish as usual
                pwrite_all(fd, view[done:], offset + done)
                break
        return True

    def _descriptor(self, path: str, fd: int) -> int | None:
        direct = self._fds.get(path)
        if direct is not None:
            return direct
        if os.fstat(fd).st_dev in self._refused:
            return None
        try:  # the open file itself again, not its name: nothing to resolve, nothing raced
            direct = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self._refused.add(os.fstat(fd).st_dev)
            return None  # any other reason (no /proc, no descriptors left): this write only
        self._fds[path] = direct
        return direct

    def _refuse(self, path: str, fd: int) -> None:
        self._refused.add(os.fstat(fd).st_dev)
        self.close(path)

    def _buffer(self) -> mmap.mmap:
        if self._bounce is None:
            self._bounce = mmap.mmap(-1, BOUNCE_BYTES)  # page-aligned, so ALIGN-aligned
        return self._bounce

    def close(self, path: str) -> None:
        """Close the direct descriptor of ``path``, if there is one."""
        direct = self._fds.pop(path, None)
        if direct is not None:
            os.close(direct)

    def close_all(self) -> None:
        for path in list(self._fds):
            self.close(path)
        # dropped, not closed: a view of it may outlive a failed write (held by the frame of
        # a wrapped pwrite in the traceback), and mmap.close() would then raise BufferError
        # over the error being reported; the map goes with its last reference
        self._bounce = None
