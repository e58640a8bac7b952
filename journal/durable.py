"""Durability primitives: the one module in the project that calls fsync.

Every other module that needs bytes on stable storage goes through here, so the
rules live in one place:

* data is durable only after ``fdatasync``/``fsync`` of the file returns;
* a new or renamed directory entry is durable only after ``fsync`` of the directory;
* small state is replaced atomically: write a temp file, fsync it, rename it over the
  old one, fsync the directory (a crash leaves the old or the new file, never a mix).

State files carry their own framing (see ``docs/FORMATS.md``, "state files"): magic,
version, length and a blake3 checksum around a msgpack body, so a torn or foreign file
is reported instead of being trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import blake3
import msgpack

from replicator.journal.errors import ExitCode, ReplicatorError

_P = ParamSpec("_P")
_T = TypeVar("_T")

STATE_MAGIC = b"RPST"
STATE_VERSION = 1
# magic, version, reserved, body length, blake3-128 of body
_STATE_HEADER = struct.Struct("<4sHHQ16s")
_PACK_BUFFER = 256 * 1024  # msgpack.Packer's own first buffer; a size hint adds to it


class StateFileError(ReplicatorError):
    """A state file exists but cannot be trusted (torn, foreign or from a newer version).

    Callers that can rebuild what the file held (from the journal, or by comparing with
    the replica) do so and log it; anywhere else it ends the command with exit code 8."""

    exit_code = ExitCode.JOURNAL


def fsync_fd(fd: int) -> None:
    """Flush a file's data and metadata to stable storage."""
    os.fsync(fd)


def fdatasync_fd(fd: int) -> None:
    """Flush a file's data (and the metadata needed to read it back) to stable storage."""
    os.fdatasync(fd)


def rewrite_durably(fd: int, end: int, chunk: int = 1 << 20) -> None:
    """Write the file's first ``end`` bytes over themselves, then fdatasync it.

    For data whose earlier fsync may have failed, in this process or a previous one:
    Linux then marks the pages it could not write clean (or drops them), and a later
    fdatasync succeeds without writing them ("fsyncgate"). Written again, the copy the
    page cache still holds is dirty and goes to the disk with this fdatasync; a page the
    kernel dropped reads back as what the disk holds, which the caller checked already.
    """
    offset = 0
    while offset < end:
        data = os.pread(fd, min(chunk, end - offset), offset)
        if not data:
            break  # shorter than ``end``: nothing past it to write back
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    os.fdatasync(fd)


def sync_dir(path: str | os.PathLike[str]) -> None:
    """Make creations, renames and unlinks inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str | os.PathLike[str]) -> None:
    """Create ``path`` and its parents, syncing each parent whose entries changed.

    Raises NotADirectoryError (its ``filename`` the culprit) when ``path`` or a parent
    exists as something other than a folder, instead of returning as if it were one.
    """
    p = Path(path)
    missing: list[Path] = []
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(p))
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
        sync_dir(d.parent)


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | memoryview,
    mode: int = 0o600,
    *,
    shared_folder: bool = False,
) -> None:
    """Replace ``path`` with ``data`` and permission bits ``mode``, atomically and durably.

    The temp file is ``.NAME.tmp`` beside it: in a folder of our own (state, keys), where
    that name is ours to remove first, even as a symlink someone planted. With
    ``shared_folder`` (a replica folder, whose names are the source's) it is a fresh short
    name made with O_EXCL instead: ``.NAME.tmp`` may be a file replicated there (it was
    deleted), and is 5 bytes longer than NAME (a name of 251 to 255 bytes could never be
    written). A crash may leave that temp file behind, as it may ``.NAME.tmp``.
    """
    _atomic_write_parts(path, (data,), mode, shared_folder)


def _atomic_write_parts(
    path: str | os.PathLike[str],
    parts: Sequence[bytes | memoryview],
    mode: int,
    shared_folder: bool,
) -> None:
    """``atomic_write`` of ``parts`` one after the other (never joined in memory first)."""
    target = Path(path)
    if shared_folder:
        while True:
            tmp = target.with_name(f".rtmp-{secrets.token_hex(6)}")
            try:
                fd = os.open(tmp, _NEW_FILE, 0o600)
                break
            except FileExistsError:
                continue  # a name in use (the source's, or a crash's leftover): another
    else:
        tmp = target.with_name(f".{target.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, _NEW_FILE, 0o600)
    try:
        # one writev for all the parts (a short write goes on from where it stopped): the
        # file is written in as many calls as one joined buffer would take
        views = [memoryview(part).cast("B") for part in parts if len(part)]
        while views:
            n = os.writev(fd, views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
        os.fchmod(fd, mode)  # before the fsync, so the mode is as durable as the bytes
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    sync_dir(target.parent)


def decode_state(raw: bytes, *, source: str = "<state>") -> dict[str, Any]:
    if len(raw) < _STATE_HEADER.size:
        raise StateFileError(f"{source}: state file is truncated ({len(raw)} bytes)")
    magic, version, _, length, digest = _STATE_HEADER.unpack_from(raw)
    if magic != STATE_MAGIC:
        raise StateFileError(f"{source}: not a replicator state file (magic {magic!r})")
    if version != STATE_VERSION:
        raise StateFileError(
            f"{source}: state file version {version} is not supported (this build reads "
            f"{STATE_VERSION}): written by a newer replicator (use a matching version), or "
            "damaged (the version is outside the checksum)"
        )
    body = memoryview(raw)[_STATE_HEADER.size : _STATE_HEADER.size + length]  # no copy
    if len(body) != length or blake3.blake3(body).digest(16) != digest:
        raise StateFileError(f"{source}: state file checksum mismatch (torn or corrupted)")
    value = msgpack.unpackb(body, raw=False)
    if not isinstance(value, dict):
        raise StateFileError(f"{source}: state file body is not a map")
    return value


def write_state(
    path: str | os.PathLike[str], state: Mapping[str, Any], *, size_hint: int = 0
) -> None:
    """Durably replace the state file at ``path`` (temp, fsync, rename, dir fsync).

    The file: the header (magic, version, the body's length and blake3-128), then the
    msgpack body, written from the packer's own buffer with the header beside it: ``packb``
    copies its buffer out, and a header joined to that is another copy (a dense raw disk's
    manifests are 256 MiB per TiB, held three more times while they were saved).
    ``size_hint``: about how many bytes the body takes, so the packer's buffer is made
    that large at once (grown as it packs, the buffer doubles: up to twice the body)."""
    make: Any = msgpack.Packer  # its typed signature is the pure-Python one's: no buf_size
    packer = make(use_bin_type=True, autoreset=False, buf_size=_PACK_BUFFER + max(0, size_hint))
    packer.pack(dict(state))
    with packer.getbuffer() as body:
        digest = blake3.blake3(body).digest(16)
        header = _STATE_HEADER.pack(STATE_MAGIC, STATE_VERSION, 0, len(body), digest)
        _atomic_write_parts(path, (header, body), 0o600, False)


def remove_state(path: Path) -> None:
    """Durably remove the state file at ``path`` (unlink, dir fsync). Gone already, the
    folder is still synced: an earlier removal whose sync failed is durable only then (a
    caller tries again after a failure; none removes files it does not believe are there).
    No folder: nothing to do."""
    try:
        path.unlink()
    except FileNotFoundError:
        if not path.parent.is_dir():
            return
    sync_dir(path.parent)


def read_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read a state file; ``None`` when it does not exist, StateFileError when untrustworthy."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return decode_state(raw, source=str(path))


async def settled(fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``fn(*args, **kwargs)`` in a worker thread that never outlives its caller.

    Cancelling a task that awaits ``asyncio.to_thread`` does not stop the thread: a state
    write would go on after the caller is gone, while a close, a retry or the next
    request writes the same file (through the same temporary name: a rename failed with
    ENOENT, or the older state landed last). Here a cancelled caller still waits for the
    thread to end (cancelled again meanwhile, it waits on), then the cancellation goes
    on. For writes, which end in an fsync: never for a call that may block for good."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller raises
        raise


async def write_state_async(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """``write_state`` in a worker thread, so the event loop never waits on fsync; settled
    (see ``settled``): a cancelled caller's write has ended when the cancellation goes on."""
    await settled(write_state, path, state)


async def fdatasync_async(fd: int) -> None:
    await asyncio.to_thread(os.fdatasync, fd)


async def fsync_async(fd: int) -> None:
    await asyncio.to_thread(os.fsync, fd)
