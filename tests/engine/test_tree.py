"""The FUSE mode's view of a VM folder: files, folders and symlinks, each stat'ed once."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from replicator.engine.errors import ConfigError
from replicator.engine.tree import Tree, fold, walk
from replicator.journal import Record


def test_walk_records_links_without_following_them(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    (vm / "disks").mkdir(parents=True)
    (vm / "disks" / "a.raw").write_bytes(b"x")
    os.chmod(vm / "disks" / "a.raw", 0o640)
    os.symlink("disks", vm / "current")  # a link to a folder: not walked into
    os.symlink("/nonexistent", vm / "dangling")
    tree = walk(vm)
    assert tree.files == {"disks/a.raw": 0o640}
    assert set(tree.dirs) == {"disks"}
    assert tree.links == {"current": "disks", "dangling": "/nonexistent"}


def test_walk_refuses_what_it_cannot_replicate(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    os.mkfifo(vm / "pipe")
    with pytest.raises(ConfigError, match="pipe: a FIFO, not a file, folder or symlink"):
        walk(vm)
    os.unlink(vm / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(vm / "qmp.sock"))  # a VM's monitor socket left in its folder
    sock.close()
    with pytest.raises(ConfigError, match=r"qmp\.sock: a socket") as caught:
        walk(vm)
    assert "move it out of the folder" in str(caught.value)


def test_a_name_that_is_not_utf8_is_shown_as_its_bytes_and_what_to_do(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "ok.xml").write_text("<domain/>")
    with open(os.fsencode(vm) + b"/\xe9t\xe9.cfg", "wb") as f:
        f.write(b"a name in latin-1")
    with pytest.raises(ConfigError) as caught:
        walk(vm)
    message = str(caught.value)
    assert f"cannot replicate {vm}/\\xe9t\\xe9.cfg: path" in message
    assert "is not valid UTF-8 (rename it, or move it out of the folder" in message


def test_files_are_known_with_the_mode_their_replicas_get(tmp_path: Path) -> None:
    """No set-id bits on a replica file (engine/names.py ``file_mode``): the source's walk
    and the fold of records say so too, or every reconnect would find the modes apart."""
    vm = tmp_path / "vm"
    (vm / "shared").mkdir(parents=True)
    os.chmod(vm / "shared", 0o2775)
    (vm / "tool").write_bytes(b"x")
    os.chmod(vm / "tool", 0o4755)
    tree = walk(vm)
    assert tree.files == {"tool": 0o755} and tree.dirs == {"shared": 0o2775}
    folded = Tree()
    for record in (Record.create("a", 0o6644), Record.file("b", b"", 0o2700)):
        fold(folded, record)
    fold(folded, Record.mkdir("d", 0o2770))
    fold(folded, Record.chmod("a", 0o4711))
    assert folded.files == {"a": 0o711, "b": 0o700} and folded.dirs == {"d": 0o2770}


def test_walk_refuses_two_names_of_one_file(tmp_path: Path) -> None:
    """A write through one name of a hard-linked pair changed both on the source but was
    journaled under that name only: the replica's other name kept the old bytes, at a
    consistency point, with nothing said. A link to a file outside the folder is fine."""
    vm = tmp_path / "vm"
    (vm / "snap").mkdir(parents=True)
    (vm / "disk.raw").write_bytes(b"x")
    (tmp_path / "outside").write_bytes(b"y")
    os.link(tmp_path / "outside", vm / "ok.raw")
    assert set(walk(vm).files) == {"disk.raw", "ok.raw"}
    os.link(vm / "disk.raw", vm / "snap" / "disk.raw")
    with pytest.raises(ConfigError, match="two names \\(hard links\\) of one file") as caught:
        walk(vm)
    names = {f"{vm}/disk.raw", f"{vm}/snap/disk.raw"}
    assert {w.rstrip(":") for w in str(caught.value).split()} >= names


def test_a_source_folder_deeper_than_the_recursion_limit_is_walked(tmp_path: Path) -> None:
    """`os.walk` recursed once a level: a VM folder 1100 folders deep (a FUSE folder job's
    source) raised RecursionError in the sender's walk, as the receiver's did (names.py
    ``tree_entries``, which both now use)."""
    source = tmp_path / "vm"
    deep = source
    try:
        for _ in range(1100):
            deep = deep / "d"
            deep.mkdir(parents=deep.parent == source)
        (deep / "disk.img").write_bytes(b"x")
        tree = walk(source)
        assert len(tree.dirs) == 1100 and list(tree.files) == ["d/" * 1100 + "disk.img"]
    finally:
        subprocess.run(["rm", "-rf", str(source)], check=True)  # rmtree recurses too
