"""The FUSE capture's folder-layout prelude is kept until the initial sync made it durable."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import cast

from replicator.engine.live import FuseFolderCapture
from replicator.engine.sender import SenderState
from replicator.engine.tree import walk
from replicator.journal import Record


def _capture(source: Path, tmp_path: Path) -> FuseFolderCapture:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    return FuseFolderCapture(source, mnt, walk(source))


def test_prelude_records_survive_a_sync_that_did_not_finish(tmp_path: Path) -> None:
    source = tmp_path / "vm"
    (source / "old").mkdir(parents=True)
    (source / "gone.xml").write_text("<x/>")
    state = cast(SenderState, SimpleNamespace(dir=tmp_path / "state"))
    state.dir.mkdir()
    first = _capture(source, tmp_path)
    first.prelude(state)
    first.prelude_durable(state)  # the first sync finished

    (source / "gone.xml").unlink()
    (source / "old").rmdir()
    (source / "new").mkdir()
    os.chmod(source / "new", 0o750)
    expected = [Record.unlink("gone.xml"), Record.rmdir("old"), Record.mkdir("new", 0o750)]
    interrupted = _capture(source, tmp_path)
    assert interrupted.prelude(state) == expected
    # the link broke (or the sender died) before the epoch was durable: nothing saved,
    # so the next start must journal the same changes again
    retried = _capture(source, tmp_path)
    assert retried.prelude(state) == expected
    retried.prelude_durable(state)
    assert _capture(source, tmp_path).prelude(state) == []
