"""A VM folder as a tree: what the FUSE capture's initial (and recovery) sync compares.

Regular files become volumes named by their path relative to the folder (disk images by
extent, small files whole); directories and symlinks become MKDIR/SYMLINK records; what
the replica holds that the folder does not becomes UNLINK/RMDIR records (deepest first).

What the replica holds is asked of the receiver at every (re)connect (a TreeRequest: the
replica folder as it is, after applying what the receiver has), then ``fold``ed with the
records still on their way from our journal. No layout is kept on the sender's side: a lost
or damaged state folder, a damaged journal or records a crash took along cannot leave
files on the replica that the folder no longer has.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from replicator.engine.errors import ConfigError
from replicator.engine.names import (
    RECEIVER_STATE_NAME,
    file_mode,
    node_kind,
    path_problem,
    printable,
    tree_entries,
)
from replicator.engine.volumes import VolumeSpec, classify
from replicator.journal import Record, RecordType
from replicator.transport.messages import TreeEntry

_V = TypeVar("_V")


@dataclass(slots=True)
class Tree:
    files: dict[str, int] = field(default_factory=dict)  # path -> mode
    dirs: dict[str, int] = field(default_factory=dict)  # path -> mode
    links: dict[str, str] = field(default_factory=dict)  # path -> target


def from_entries(entries: Iterable[TreeEntry]) -> Tree:
    tree = Tree()
    for entry in entries:
        if entry.kind == "f":
            tree.files[entry.path] = entry.mode
        elif entry.kind == "d":
            tree.dirs[entry.path] = entry.mode
        else:
            tree.links[entry.path] = entry.target
    return tree


def fold(tree: Tree, record: Record) -> None:
    """Update ``tree`` with what ``record`` will do to the replica's layout when applied."""
    path, kind = record.volume, record.type
    if not path:
        return
    if kind in (RecordType.CREATE, RecordType.FILE):
        tree.links.pop(path, None)
        tree.files[path] = file_mode(record.offset)
    elif kind in (RecordType.WRITE, RecordType.ZERO, RecordType.TRIM, RecordType.RESIZE):
        tree.files.setdefault(path, 0o600)  # the applier creates a file it writes to
    elif kind is RecordType.UNLINK:
        tree.files.pop(path, None)
        tree.links.pop(path, None)
    elif kind is RecordType.MKDIR:
        tree.dirs.setdefault(path, record.offset & 0o7777)
    elif kind is RecordType.RMDIR:
        tree.dirs.pop(path, None)
    elif kind is RecordType.SYMLINK:
        tree.files.pop(path, None)
        tree.links[path] = record.target
    elif kind is RecordType.CHMOD:
        if path in tree.files:
            tree.files[path] = file_mode(record.offset)
        if path in tree.dirs:
            tree.dirs[path] = record.offset & 0o7777
    elif kind is RecordType.RENAME:
        _move(tree.files, path, record.target)
        _move(tree.dirs, path, record.target)
        _move(tree.links, path, record.target)


def _move(table: dict[str, _V], old: str, new: str) -> None:
    """A rename in one table: ``new`` and what was below it go, ``old``'s entries move."""
    for name in [n for n in table if n == new or n.startswith(new + "/")]:
        del table[name]
    for name in [n for n in table if n == old or n.startswith(old + "/")]:
        table[new + name[len(old) :]] = table.pop(name)


def walk(source: Path) -> Tree:
    """The folder's files, directories and symlinks (other node types are refused, and so
    are two names of one file: see below)."""
    tree = Tree()
    linked: dict[tuple[int, int], str] = {}  # (dev, ino) -> path, for files with nlink > 1
    # tree_entries, not os.walk: a folder deeper than the recursion limit (names.py)
    for path in tree_entries(source):
        full, name, root = str(path), path.name, str(path.parent)
        rel = path.relative_to(source).as_posix()
        problem = path_problem(rel)
        if problem is not None:
            raise ConfigError(
                f"cannot replicate {printable(full)}: {problem}",
                hint="rename it, or move it out of the folder: replicas are named as the "
                "source's files are",
            )
        st = os.lstat(full)  # one stat per entry; the walk does not descend into links
        if name == RECEIVER_STATE_NAME and stat.S_ISDIR(st.st_mode):
            _refuse_receiver_folder(source, root, full)
        if stat.S_ISLNK(st.st_mode):
            tree.links[rel] = os.readlink(full)
        elif stat.S_ISDIR(st.st_mode):
            tree.dirs[rel] = st.st_mode & 0o7777
        elif stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1:
                _refuse_second_name(linked, st, rel, source)
            tree.files[rel] = file_mode(st.st_mode)  # as the replica will have it
        else:  # a socket, FIFO or device node holds no data to replicate
            raise ConfigError(
                f"cannot replicate {printable(full)}: a {node_kind(st.st_mode)}, not a "
                "file, folder or symlink",
                hint="move it out of the folder (a program that made it there, such as "
                "a QEMU monitor socket, can make it elsewhere): the FUSE filter "
                "replicates files, folders and symlinks only",
            )
    return tree


def _refuse_receiver_folder(source: Path, folder: str, state: str) -> None:
    """A receiver keeps its replicas in ``folder`` (``state`` is its state folder: a
    control socket or a job's state in it), inside the VM folder: replicating the folder
    would copy the replicas, and the receiver's journals, into themselves."""
    from replicator.engine.at_rest import is_receiver_state  # it imports much: on demand
    from replicator.engine.control import SOCKET_NAME

    state_path = Path(state)
    if not ((state_path / SOCKET_NAME).exists() or is_receiver_state(state_path)):
        return
    raise ConfigError(
        f"cannot replicate {printable(str(source))}: it holds a receiver's folder "
        f"{printable(folder)} ({printable(state)} is its state): the replicas, and the "
        "receiver's journals, would be replicated into themselves",
        hint="give `replicator receive` a --dir outside the VM folder",
    )


def _refuse_second_name(
    linked: dict[tuple[int, int], str], st: os.stat_result, rel: str, source: Path
) -> None:
    """Two names of one file (a hard link) in the folder: the filter journals a write
    under the name it came through, so the replica's other name, a file of its own
    there, would silently keep the old bytes while the source's changed."""
    other = linked.setdefault((st.st_dev, st.st_ino), rel)
    if other != rel:
        raise ConfigError(
            f"cannot replicate {printable(os.path.join(source, other))} and "
            f"{printable(os.path.join(source, rel))}: "
            "two names (hard links) of one file in the folder; a change through one name "
            "would reach the replica under that name only",
            hint="make one of them a copy of its own (cp --remove-destination A B) or a "
            "symlink, or move it out of the folder",
        )


def tree_records(old: Tree | None, new: Tree) -> list[Record]:
    """Records that turn the replica's tree (``old``) into ``new``, before file contents."""
    records: list[Record] = []
    old = old or Tree()
    gone = [p for p in old.files if p not in new.files] + [
        p for p in old.links if new.links.get(p) != old.links[p]
    ]
    records += [Record.unlink(p) for p in sorted(gone)]
    for path in sorted((p for p in old.dirs if p not in new.dirs), key=len, reverse=True):
        records.append(Record.rmdir(path))
    for path in sorted(new.dirs, key=len):
        if path not in old.dirs:
            records.append(Record.mkdir(path, new.dirs[path]))
        elif old.dirs[path] != new.dirs[path]:
            records.append(Record.chmod(path, new.dirs[path]))
    for path in sorted(new.links):
        if old.links.get(path) != new.links[path]:
            records.append(Record.symlink(path, new.links[path]))
    return records


def volumes_of(source: Path, tree: Tree) -> list[VolumeSpec]:
    return [VolumeSpec(source / rel, rel, classify(source / rel)) for rel in sorted(tree.files)]
