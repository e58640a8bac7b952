"""Run the FUSE filter in a child process (pyfuse3 allows one mount per process) and
check what its journal holds by replaying it into a copy of the folder's initial state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicator.engine.applier import Applier
from replicator.journal import Journal, Record
from tests.tools import b3

FILTER = [sys.executable, "-m", "replicator.engine.fuse"]
MOUNT_TIMEOUT = 20.0


def unmount_if_mounted(mnt: Path) -> None:
    """Teardown: get rid of a live or stale mount at ``mnt``, lazily if it is busy."""
    for cmd in (["fusermount3", "-u", "-z", str(mnt)], ["umount", "-l", str(mnt)]):
        # the mount table, not os.path.ismount: that says False for a stale mount (its
        # lstat fails with ENOTCONN), which a SIGKILLed filter leaves behind
        if not is_mounted(mnt):
            return
        subprocess.run(cmd, capture_output=True, timeout=30)


def is_mounted(mnt: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mnt) for line in f)


@dataclass
class FuseProc:
    """A `python -m replicator.engine.fuse` child serving ``source`` at ``mnt``."""

    source: Path
    mnt: Path
    journal: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _logf: Any = field(default=None, repr=False)

    def start(self) -> None:
        self.starts += 1
        self._logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*FILTER, str(self.source), str(self.mnt), str(self.journal)],
            stdout=subprocess.DEVNULL,
            stderr=self._logf,
        )
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not self.mounted_event_count() >= self.starts:
            if self.proc.poll() is not None:
                raise AssertionError(f"filter exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"filter did not mount:\n{self.logs()}")
            time.sleep(0.02)
        assert is_mounted(self.mnt), self.logs()

    def mounted_event_count(self) -> int:
        return sum(1 for e in self.events() if e.get("event") == "fuse.mounted")

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        if self._logf is not None:
            self._logf.close()
            self._logf = None
        return rc

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop(signal.SIGKILL)
        unmount_if_mounted(self.mnt)


def make_dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    src, mnt, jr = tmp_path / "src", tmp_path / "mnt", tmp_path / "journal"
    src.mkdir()
    mnt.mkdir()
    return src, mnt, jr


async def _read_journal(path: Path) -> list[Record]:
    async with await Journal.open(path) as journal:
        return [r async for r in journal.read_from(journal.first_lsn)]


def read_journal(path: Path) -> list[Record]:
    """Every record in the journal at ``path`` (the filter must not be running)."""
    return asyncio.run(_read_journal(path))


def replay(initial: Path, records: list[Record], into: Path) -> Path:
    """Copy ``initial`` to ``into`` and apply ``records`` there, as a receiver would."""
    shutil.copytree(initial, into, symlinks=True)
    applier = Applier(into)
    try:
        applier.apply_many(records)
        applier.barrier()
    finally:
        applier.close()
    return into


def tree(root: Path) -> dict[str, tuple[str, int, str]]:
    """path -> (kind, permission bits, content hash / link target) for a whole folder."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), f"{st.st_size}:{b3(p)}")
    return out


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert ta.keys() == tb.keys(), (sorted(ta.keys() ^ tb.keys()), a, b)
    diff = {k: (ta[k], tb[k]) for k in ta if ta[k] != tb[k]}
    assert not diff, diff
