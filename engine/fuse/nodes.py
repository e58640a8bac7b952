"""The inode table of the FUSE filter: kernel inode numbers <-> relative paths.

The filter hands the kernel its own inode numbers, one per path it has looked up, so a
journal record can always name the file by its current relative path. A rename moves
the node (and, for a directory, every node below it) to the new path, so handles that
are open across a rename keep journaling under the right name. A node whose name went
away (unlink, or a rename over it) is *detached*: its path is ``None`` and writes through
its still-open handles change a file the namespace no longer reaches, so they are not
journaled. A node is dropped when the kernel has forgotten it and no handle is open.

Hard links are not replicated (no record type describes them): two names of one source
inode are two nodes here, and ``link`` is refused by the filter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROOT_INO = 1  # pyfuse3.ROOT_INODE


@dataclass(eq=False, slots=True)
class Node:
    ino: int
    path: str | None  # relative, "" for the root, None once detached
    lookups: int = 0
    fds: set[int] = field(default_factory=set)  # real fds of the open handles
    dirty: bool = False  # written since the last fsync/flush that synced it

    def child(self, name: str) -> str:
        if self.path is None:
            raise LookupError("parent directory is gone")
        return f"{self.path}/{name}" if self.path else name


class NodeTable:
    """Maps inode numbers to nodes and current paths to nodes. Not thread-safe (one loop)."""

    def __init__(self) -> None:
        root = Node(ROOT_INO, "", lookups=1)
        self._by_ino: dict[int, Node] = {ROOT_INO: root}
        self._by_path: dict[str, Node] = {"": root}
        self._next_ino = ROOT_INO + 1

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Node:
        """The node of ``ino``; KeyError when the kernel names an inode we never gave out."""
        return self._by_ino[ino]

    def at(self, path: str) -> Node | None:
        return self._by_path.get(path)

    def lookup(self, path: str) -> Node:
        """The node at ``path`` (created if needed), with its lookup count raised by one."""
        node = self._by_path.get(path)
        if node is None:
            node = Node(self._next_ino, path)
            self._next_ino += 1
            self._by_ino[node.ino] = node
            self._by_path[path] = node
        node.lookups += 1
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self._by_ino.get(ino)
        if node is None or node.ino == ROOT_INO:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def opened(self, node: Node, fd: int) -> None:
        node.fds.add(fd)

    def closed(self, node: Node, fd: int) -> None:
        node.fds.discard(fd)
        self._maybe_drop(node)

    def removed(self, path: str) -> None:
        """``path`` was unlinked or removed: its node (if any) is detached."""
        node = self._by_path.pop(path, None)
        if node is not None:
            node.path = None
            self._maybe_drop(node)

    def moved(self, old: str, new: str) -> None:
        """``old`` was renamed to ``new`` (replacing whatever was there)."""
        if old == new:
            return
        self.removed(new)
        prefix = old + "/"
        moving = [(p, n) for p, n in self._by_path.items() if p == old or p.startswith(prefix)]
        for p, _ in moving:
            del self._by_path[p]
        for p, n in moving:
            n.path = new + p[len(old) :]
            self._by_path[n.path] = n

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups or node.fds or node.ino == ROOT_INO:
            return
        self._by_ino.pop(node.ino, None)
        if node.path is not None and self._by_path.get(node.path) is node:
            del self._by_path[node.path]
