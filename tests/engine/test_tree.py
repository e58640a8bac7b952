"""The FUSE mode's view of a VM folder: files, folders and symlinks, each stat'ed once."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from replicator.engine.errors import ConfigError
from replicator.engine.tree import walk


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
