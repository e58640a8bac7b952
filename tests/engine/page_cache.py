"""What the page cache holds of a file, whether a folder takes ``O_DIRECT``, and a disk
whose writes past the page cache fail: for the tests of ``engine/direct_writes.py`` and of
the applies that use it."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from pathlib import Path
from typing import Any

import pytest

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached_pages(path: Path) -> list[bool]:
    """Which pages of ``path`` the page cache holds (mincore(2) over a private mapping,
    which reads nothing in)."""
    length = path.stat().st_size
    with path.open("rb") as f:
        area = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_COPY)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(area))
        vector = (ctypes.c_ubyte * ((length + PAGE - 1) // PAGE))()
        if _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return [bool(v & 1) for v in vector]
    finally:
        area.close()


def takes_o_direct(folder: Path) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(folder / ".probe")
    return True


def fail_direct_write(monkeypatch: pytest.MonkeyPatch, err: int, nth: int) -> list[int]:
    """``os.pwrite`` raises ``err`` on the ``nth`` write through an O_DIRECT descriptor (a
    full or failing disk under the replica); every other write goes through. Returns the
    offsets of the direct writes asked for."""
    real = os.pwrite
    asked: list[int] = []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            return real(fd, data, offset)
        asked.append(offset)
        if len(asked) == nth:
            raise OSError(err, os.strerror(err))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return asked
