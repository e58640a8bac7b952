"""Which replica files replication wrote, as it left them: ``files.state``.

A replica file changed behind the receiver (someone booted the replica VM by hand, an
editor, a restore, a symlink planted in its place) must never be silently built upon:
the next records would land on bytes the sender knows nothing about, and every later
"durable" would be a lie. So after each apply the receiver stamps every regular file it
wrote with its inode number and ctime, and before it changes a file again (first touch
in an apply round) or starts a session, it compares. ctime changes with every data or
metadata change and cannot be set back by a user, so "same inode, same ctime" means
"exactly as replication left it". (A change within the same coarse clock tick as our own
last write keeps the ctime; that window is a few milliseconds.) A stamp is saved only once
the ctime it names is on disk (the barrier fsyncs, not fdatasyncs, every file it stamps,
a file that was only renamed too; adopting a file fsyncs it first): otherwise, after a
power cut, the receiver would refuse its own replica as changed, whenever nothing else
committed the replica file system's metadata (``--state-dir`` on another file system, a
``lazytime`` mount, a rename on btrfs). A folder's rename moves the stamps of the files
under it with their names (their ctimes do not change).

State file (``journal/durable.py`` framing), a msgpack map:

- ``files`` (map path -> [ino, ctime_ns]): every regular replica file replication wrote
  or adopted;
- ``diverged`` (map path -> text): files found changed outside replication; sessions are
  refused until a sender compares with the replica (``send --resync``);
- ``lost`` (text, absent when empty): why these stamps vouch for nothing before they
  were taken (the file before them was damaged or deleted); the replica is unknown while
  it is set (``replica_state.files_loss``), even with an older ``applied.state`` put
  back; cleared when a sender compares (``forget_all``);
- ``writing`` (list of paths, absent when empty): files a first sync writes straight from
  the wire (``JobReplica``'s direct path, which keeps no journal to tell what a round
  interrupted by a crash touched); recovery unstamps them, as it does the paths of the
  journal records it redoes.

Files nobody stamped yet (a seeded replica, the first session) are *adopted* when the
sender compares against them (a manifest request) or writes them whole. A file an apply
round changed before it failed or crashed has no trustworthy stamp any more (our own
writes are past it); it is adopted again when the round is redone, unless it is the one
found diverged.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from replicator.journal.durable import StateFileError, read_state, write_state

log = structlog.get_logger()

FILE_NAME = "files.state"


class ReplicaDiverged(Exception):
    """A replica file is not as replication left it; ``path`` is relative to the replica."""

    def __init__(self, path: str, why: str) -> None:
        self.path = path
        self.why = why
        super().__init__(f"replica file {path!r} {why}")


@dataclass(slots=True)
class ReplicaFiles:
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)
    diverged: dict[str, str] = field(default_factory=dict)
    writing: set[str] = field(default_factory=set)  # written straight from the wire
    dirty: bool = False  # changed since the last save
    # bumped when a path is stamped anew or at another inode, or forgotten: what the
    # receiver's replica guard (engine/imagelock.py) follows; not saved
    layout: int = 0
    damaged: str = ""  # why the file could not be read (load); not saved
    # the paths stamped in the file as last saved or loaded: the only ones a recovery's
    # unstamp of ``writing`` can change (``will_write``); not saved
    on_disk: frozenset[str] = field(default=frozenset(), compare=False)
    found: bool = True  # the file existed when loaded (or was saved since); not saved
    # why these stamps vouch for nothing before they were taken: the ones before them were
    # lost (damaged, deleted; replica_state.files_loss). Saved (``lost``), so that the
    # replica stays unknown when applied.state alone is put back from an older copy, until
    # a sender compares it (``forget_all``)
    lost: str = ""

    @classmethod
    def load(cls, state_dir: Path, job: str) -> ReplicaFiles:
        path = state_dir / FILE_NAME
        try:
            raw = read_state(path)
            if raw is None:
                return cls(found=False)
            stamps = {str(k): (int(v[0]), int(v[1])) for k, v in raw["files"].items()}
            diverged = {str(k): str(v) for k, v in raw.get("diverged", {}).items()}
            writing = {str(k) for k in raw.get("writing", ())}
            lost = raw.get("lost", "")
            if not isinstance(lost, str):
                raise ValueError(f"lost is {lost!r}, not a text")
        except (StateFileError, OSError, KeyError, TypeError, ValueError, IndexError) as exc:
            # without stamps (and the files found diverged) nothing says the replica is
            # as replication left it: the job's replica state becomes unknown until a
            # sender compares it (replica_state.files_lost)
            log.error("receiver.state_damaged", job=job, path=str(path), error=str(exc))
            return cls(dirty=True, damaged=f"{path} cannot be read: {exc}")
        return cls(stamps, diverged, writing, on_disk=frozenset(stamps), lost=lost)

    def save(self, state_dir: Path) -> None:
        """Durably replace the state file when stamps changed (blocking: worker thread)."""
        if not self.dirty:
            return
        state: dict[str, object] = {
            "files": {k: list(v) for k, v in self.stamps.items()},
            "diverged": self.diverged,
        }
        if self.writing:
            state["writing"] = sorted(self.writing)
        if self.lost:
            state["lost"] = self.lost
        write_state(state_dir / FILE_NAME, state)
        self.on_disk = frozenset(self.stamps)
        self.dirty = False
        self.found = True

    def check(self, path: str, st: os.stat_result | None) -> None:
        """Raise ReplicaDiverged when ``path`` (its lstat, or None when missing) is not as
        stamped. Unstamped files pass (they are adopted when stamped)."""
        stamp = self.stamps.get(path)
        if stamp is None:
            return
        if st is None:
            raise ReplicaDiverged(path, "was deleted outside replication")
        if not stat.S_ISREG(st.st_mode):
            raise ReplicaDiverged(path, "was replaced by something that is not a regular file")
        if st.st_ino != stamp[0]:
            raise ReplicaDiverged(path, "was replaced by another file outside replication")
        if st.st_ctime_ns != stamp[1]:
            raise ReplicaDiverged(path, "was changed outside replication (its ctime moved)")

    def changed(self, lstat: Callable[[str], os.stat_result | None]) -> dict[str, str]:
        """Every stamped file not as its stamp says: path -> what happened (``check``'s
        words); ``lstat`` looks a path up (None: missing). Blocking; nothing is marked."""
        found: dict[str, str] = {}
        for path in sorted(self.stamps):
            try:
                self.check(path, lstat(path))
            except ReplicaDiverged as exc:
                found[path] = exc.why
        return found

    def stamp(self, path: str, st: os.stat_result) -> None:
        value = (st.st_ino, st.st_ctime_ns)
        old = self.stamps.get(path)
        if old != value:
            if old is None or old[0] != st.st_ino:
                self.layout += 1
            self.stamps[path] = value
            self.dirty = True

    def forget(self, path: str) -> None:
        """``path`` and everything below it are gone (unlink, rmdir, renamed away)."""
        prefix = path + "/"
        for name in [n for n in self.stamps if n == path or n.startswith(prefix)]:
            del self.stamps[name]
            self.dirty = True
            self.layout += 1

    def move(self, old: str, new: str) -> None:
        """A rename: stamps travel with the names (the ctime changes: restamped later)."""
        self.forget(new)
        prefix = old + "/"
        for name in [n for n in self.stamps if n == old or n.startswith(prefix)]:
            self.stamps[new + name[len(old) :]] = self.stamps.pop(name)
            self.dirty = True
            self.layout += 1

    def unstamp(self, paths: Iterable[str]) -> None:
        """Forget the stamps of ``paths`` (written past them by a round that did not
        finish), except the diverged ones, which stay refused."""
        for path in list(paths):
            if path not in self.diverged and path in self.stamps:
                del self.stamps[path]
                self.dirty = True
                self.layout += 1

    def mark_diverged(self, path: str, why: str) -> None:
        if self.diverged.get(path) != why:
            self.diverged[path] = why
            self.dirty = True

    def will_write(self, paths: Iterable[str]) -> bool:
        """Note ``paths`` as written straight from the wire (see ``writing``); True when
        the state must be saved before they are written: when the file on disk stamps
        one of them. A path it does not stamp needs no unstamping after a crash, and any
        later save that stamps it names it in ``writing`` too; saving for it anyway cost
        a first sync of a folder of small files (one FILE record a frame) a rewrite of
        the whole state per file: 10,000 files, 10,000 rewrites of up to 400 KB."""
        new = set(paths) - self.writing
        if new:
            self.writing |= new
            self.dirty = True
        return not new.isdisjoint(self.on_disk)

    def written(self) -> None:
        """The direct writes are done and stamped: no redo will touch them any more."""
        if self.writing:
            self.writing.clear()
            self.dirty = True

    def forget_all(self) -> None:
        """Adopt the replica as it is now (``send --resync`` compares with it)."""
        if self.stamps or self.diverged or self.writing or self.lost:
            self.stamps.clear()
            self.diverged.clear()
            self.writing.clear()
            self.lost = ""
            self.dirty = True
            self.layout += 1
