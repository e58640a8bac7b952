"""The namespace half of faultfs's power cut: entries no directory fsync has covered.

POSIX makes a new, removed or renamed directory entry durable only once the directory
holding it is fsynced (``journal/durable.py`` does so after every atomic write and every
new file). Once armed, every create, mkdir, symlink, mknod, unlink, rmdir and rename
through the mount is noted with the directories whose fsync makes it durable (a rename:
both), and ``cut`` takes back, newest first, every one that some of those directories have
not been fsynced since. What an unlink or a rename removes stays reachable through a hard
link in a stash folder beside the source (``SOURCE.stash``), so it can be put back.

This is stricter than ext4, where any fsync commits every earlier metadata change of the
whole file system, and is what the standard promises: code that passes it does not depend
on one file system's journal. The data of files is ``volatile.py``'s; the cut takes that
back first (by inode), then the names.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

_DirKey = tuple[int, int]  # (st_dev, st_ino) of a real directory

RENAME_EXCHANGE: Final = 2


@dataclass(slots=True)
class _Entry:
    kind: str  # create, mkdir, unlink, rmdir, rename, exchange
    path: str  # real path (rename, exchange: the new one)
    old: str = ""  # rename, exchange: the real old path
    stash: str = ""  # unlink, rename over a file: the hard link that keeps what it removed
    mode: int = 0  # rmdir: the folder's mode, to make it again
    waiting: set[_DirKey] = field(default_factory=set)  # folders still to be fsynced


def _parent_key(real: str) -> _DirKey:
    st = os.stat(os.path.dirname(real) or "/")
    return st.st_dev, st.st_ino


class VolatileNames:
    """The directory entries changed through the mount that no folder fsync covered."""

    def __init__(self, source: str, exchange: Callable[[str, str], None]) -> None:
        self.stash_dir = f"{source.rstrip('/')}.stash"
        self._exchange = exchange  # renameat2(a, b, RENAME_EXCHANGE)
        self.armed = False
        self._entries: list[_Entry] = []
        self._numbers = itertools.count()

    def arm(self) -> None:
        os.makedirs(self.stash_dir, exist_ok=True)
        self.armed = True

    def _note(self, entry: _Entry, *reals: str) -> None:
        entry.waiting = {_parent_key(real) for real in reals}
        self._entries.append(entry)

    def _stash(self, real: str) -> str:
        """A hard link to what ``real`` names now (a file or symlink), or "" if nothing."""
        if not os.path.lexists(real) or (os.path.isdir(real) and not os.path.islink(real)):
            return ""
        stash = os.path.join(self.stash_dir, str(next(self._numbers)))
        os.link(real, stash, follow_symlinks=False)
        return stash

    # -- before and after the operations ------------------------------------------------
    def created(self, real: str, *, folder: bool = False) -> None:
        """``real`` was just made (a file, symlink or node; a folder with ``folder``)."""
        if self.armed:
            self._note(_Entry("mkdir" if folder else "create", real), real)

    def before_unlink(self, real: str) -> str:
        return self._stash(real) if self.armed else ""

    def unlinked(self, real: str, stash: str) -> None:
        if self.armed:
            self._note(_Entry("unlink", real, stash=stash), real)

    def removed_folder(self, real: str, mode: int) -> None:
        if self.armed:
            self._note(_Entry("rmdir", real, mode=mode), real)

    def before_rename(self, new: str, flags: int) -> str:
        """Stash what a rename will replace at ``new`` (an exchange replaces nothing)."""
        return self._stash(new) if self.armed and flags != RENAME_EXCHANGE else ""

    def renamed(self, old: str, new: str, stash: str, flags: int) -> None:
        if self.armed:
            kind = "exchange" if flags == RENAME_EXCHANGE else "rename"
            self._note(_Entry(kind, new, old=old, stash=stash), old, new)

    def sync_starts(self) -> int:
        return len(self._entries)

    def folder_synced(self, real: str, mark: int) -> None:
        """Folder ``real`` was fsynced: entries made in it before ``mark`` are durable there."""
        if not self.armed:
            return
        st = os.stat(real)
        key = (st.st_dev, st.st_ino)
        keep: list[_Entry] = []
        for index, entry in enumerate(self._entries):
            if index < mark:
                entry.waiting.discard(key)
            if entry.waiting:
                keep.append(entry)
            elif entry.stash:
                os.unlink(entry.stash)  # what it removed is gone for good
        self._entries = keep

    # -- the cut ----------------------------------------------------------------------
    def cut(self, rng: random.Random | None = None) -> dict[str, int]:
        """Take back every entry not yet durable, newest first; with ``rng``, only those
        after a random one (metadata reaches the disk in order, as a file system's
        journal commits it)."""
        undone = 0
        entries = self._entries
        if rng is not None:
            entries = entries[rng.randrange(len(entries) + 1) :]
        for entry in reversed(entries):
            undone += 1
            if entry.kind == "create":
                if os.path.lexists(entry.path):
                    os.unlink(entry.path)
            elif entry.kind == "mkdir":
                shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.kind == "unlink":
                if entry.stash:
                    os.replace(entry.stash, entry.path)
            elif entry.kind == "rmdir":
                if not os.path.lexists(entry.path):
                    os.mkdir(entry.path, entry.mode)
            elif entry.kind == "rename":
                if os.path.lexists(entry.path):  # else a later, durable rename moved it on
                    os.rename(entry.path, entry.old)
                if entry.stash:
                    os.replace(entry.stash, entry.path)
            elif entry.kind == "exchange":
                self._exchange(entry.path, entry.old)
        self._entries.clear()
        shutil.rmtree(self.stash_dir, ignore_errors=True)
        self.armed = False
        return {"names_undone": undone}
