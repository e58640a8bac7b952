"""The FUSE mode's view of a VM folder: files, folders and symlinks, each stat'ed once."""

from __future__ import annotations

import os
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
    with pytest.raises(ConfigError, match="not a file, folder or symlink"):
        walk(vm)
