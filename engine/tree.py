"""A VM folder as a tree: what the FUSE capture's initial (and recovery) sync compares.

Regular files become volumes named by their path relative to the folder (disk images by
extent, small files whole); directories and symlinks become MKDIR/SYMLINK records; what
vanished since the last sync of the folder becomes UNLINK/RMDIR records (deepest first).
The last tree is kept in the sender's state folder.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from replicator.engine.errors import ConfigError
from replicator.engine.names import path_problem
from replicator.engine.volumes import VolumeSpec, classify
from replicator.journal import Record
from replicator.journal.durable import read_state, write_state


@dataclass(slots=True)
class Tree:
    files: dict[str, int] = field(default_factory=dict)  # path -> mode
    dirs: dict[str, int] = field(default_factory=dict)  # path -> mode
    links: dict[str, str] = field(default_factory=dict)  # path -> target

    def save(self, path: Path) -> None:
        write_state(path, {"files": self.files, "dirs": self.dirs, "links": self.links})

    @classmethod
    def load(cls, path: Path) -> Tree | None:
        state = read_state(path)
        if state is None:
            return None
        return cls(dict(state["files"]), dict(state["dirs"]), dict(state["links"]))


def walk(source: Path) -> Tree:
    """The folder's files, directories and symlinks (other node types are refused)."""
    tree = Tree()
    for root, dirnames, filenames in os.walk(source):
        rel_root = os.path.relpath(root, source)
        for name in [*dirnames, *filenames]:
            full = os.path.join(root, name)
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            problem = path_problem(rel)
            if problem is not None:
                raise ConfigError(f"cannot replicate {full}: {problem}")
            st = os.lstat(full)  # one stat per entry; os.walk does not descend into links
            if stat.S_ISLNK(st.st_mode):
                tree.links[rel] = os.readlink(full)
            elif stat.S_ISDIR(st.st_mode):
                tree.dirs[rel] = st.st_mode & 0o7777
            elif stat.S_ISREG(st.st_mode):
                tree.files[rel] = st.st_mode & 0o7777
            else:
                raise ConfigError(f"cannot replicate {full}: not a file, folder or symlink")
    return tree


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
