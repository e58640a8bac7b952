from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuse.helpers import FuseProc, make_dirs


def _fuse_available() -> None:
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing"
    assert shutil.which("fusermount3"), "fusermount3 is missing (Debian package fuse3)"


@pytest.fixture
def fuse(tmp_path: Path) -> Iterator[FuseProc]:
    """An unstarted filter over an empty ``src``; the test fills src, then calls start()."""
    _fuse_available()
    src, mnt, jr = make_dirs(tmp_path)
    proc = FuseProc(src, mnt, jr, tmp_path / "filter.log")
    try:
        yield proc
    finally:
        proc.close()
