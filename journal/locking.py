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


def held_elsewhere(fd: int) -> bool:
    """Whether another open file description holds an exclusive flock on ``fd``'s file
    (another process's ``lock_directory``, or another descriptor of this one): tested with
    a shared, non-blocking flock that is let go at once."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
