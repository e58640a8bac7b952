"""How the filter answers the kernel: entry attributes, and every failure as a FUSE reply.

pyfuse3 ends its main loop on any exception from a handler that is not a ``FUSEError``,
which would take the whole mount (and the VM's disks) down for one failed request. So
every handler is wrapped in :func:`fuse_errors`, which turns the failures the filter
expects (an OS error, a full or broken journal, an inode or handle number the kernel
should not have) into their errno, and anything else into EIO with a logged traceback.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar, cast

import pyfuse3
import structlog

from replicator.journal.errors import JournalError, JournalFull

log = structlog.get_logger("replicator.fuse")

ATTR_TIMEOUT: Final = 1.0  # only this process changes SOURCE_DIR, so attributes may be cached

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def fuse_errors(fn: _F) -> _F:
    """Turn every failure of a handler into a FUSE error reply (see the module docstring)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except JournalFull as exc:
            log.error("fuse.journal_full", op=fn.__name__, error=str(exc))
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except JournalError as exc:
            log.error("fuse.journal_failed", op=fn.__name__, error=str(exc))
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except KeyError:  # an inode or handle number we never gave out
            raise pyfuse3.FUSEError(errno.EBADF) from None
        except Exception:
            log.exception("fuse.handler_failed", op=fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(_F, wrapper)


def err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def entry_attributes(st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
    """The kernel's view of a source file: its real attributes under our inode number."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = pyfuse3.InodeT(ino)
    entry.generation = 0
    entry.entry_timeout = ATTR_TIMEOUT
    entry.attr_timeout = ATTR_TIMEOUT
    entry.st_mode = pyfuse3.ModeT(st.st_mode)
    entry.st_nlink = st.st_nlink
    entry.st_uid = st.st_uid
    entry.st_gid = st.st_gid
    entry.st_rdev = st.st_rdev
    entry.st_size = st.st_size
    entry.st_blksize = st.st_blksize
    entry.st_blocks = st.st_blocks
    entry.st_atime_ns = st.st_atime_ns
    entry.st_mtime_ns = st.st_mtime_ns
    entry.st_ctime_ns = st.st_ctime_ns
    return entry


def statfs_reply(sv: os.statvfs_result) -> pyfuse3.StatvfsData:
    """The source folder's file system figures, as the mount's."""
    out = pyfuse3.StatvfsData()
    out.f_bsize = sv.f_bsize
    out.f_frsize = sv.f_frsize
    out.f_blocks = sv.f_blocks
    out.f_bfree = sv.f_bfree
    out.f_bavail = sv.f_bavail
    out.f_files = sv.f_files
    out.f_ffree = sv.f_ffree
    out.f_favail = sv.f_favail
    out.f_namemax = sv.f_namemax
    return out
