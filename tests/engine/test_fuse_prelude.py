"""The FUSE capture's layout prelude: the replica folder as listed, folded with the records
still on their way, compared with the source folder."""

from __future__ import annotations

import os
from pathlib import Path

from replicator.engine.live import FuseFolderCapture
from replicator.engine.receiver import replica_tree_parts
from replicator.engine.tree import Tree, fold, from_entries, walk
from replicator.journal import Record
from replicator.transport.messages import decode_tree


def _capture(source: Path, tmp_path: Path) -> FuseFolderCapture:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    return FuseFolderCapture(source, mnt, walk(source))


def _listed(replica: Path) -> Tree:
    return from_entries(e for part in replica_tree_parts(replica) for e in decode_tree(part))


def test_what_the_replica_has_and_the_source_not_is_removed(tmp_path: Path) -> None:
    """Files a lost state folder, a damaged journal or a killed filter left on the replica
    (the case a saved layout could not see) are found by listing the replica itself."""
    source, replica = tmp_path / "vm", tmp_path / "replica"
    (source / "keep").mkdir(parents=True)
    (source / "keep" / "disk.img").write_bytes(b"x")
    (replica / "keep").mkdir(parents=True)
    (replica / "keep" / "disk.img").write_bytes(b"y")
    (replica / "stale").mkdir()
    (replica / "stale" / "tmpfile").write_bytes(b"z")
    (replica / "old.xml").write_text("<x/>")
    (source / "new").mkdir()
    os.chmod(source / "new", 0o750)
    prelude = _capture(source, tmp_path).prelude(_listed(replica))
    assert prelude == [
        Record.unlink("old.xml"),
        Record.unlink("stale/tmpfile"),
        Record.rmdir("stale"),
        Record.mkdir("new", 0o750),
    ]


def test_records_on_their_way_are_folded_in(tmp_path: Path) -> None:
    """A file the journal will still create and then rename is not taken for a stale one."""
    source, replica = tmp_path / "vm", tmp_path / "replica"
    source.mkdir()
    replica.mkdir()
    (source / "b.img").write_bytes(b"1")
    (replica / "gone.img").write_bytes(b"2")
    layout = _listed(replica)
    for record in (
        Record.create("a.img", 0o644),
        Record.rename("a.img", "b.img"),
        Record.unlink("gone.img"),
    ):
        fold(layout, record)
    assert layout.files == {"b.img": 0o644}
    assert _capture(source, tmp_path).prelude(layout) == []


def test_symlinks_are_listed_not_followed(tmp_path: Path) -> None:
    replica = tmp_path / "replica"
    (replica / "dir").mkdir(parents=True)
    (replica / "link").symlink_to("/etc")
    tree = _listed(replica)
    assert tree.links == {"link": "/etc"} and set(tree.dirs) == {"dir"} and not tree.files
