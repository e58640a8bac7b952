"""One owner per folder: an exclusive, non-blocking flock on the folder itself.

The kernel drops the lock when the descriptor closes or the process dies (SIGKILL too),
so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os


def lock_directory(directory: str | os.PathLike[str]) -> int | None:
    """The locked folder's descriptor (close it to release), or None when another holds it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
