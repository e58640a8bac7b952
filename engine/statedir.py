"""The sender's state folder: journal, manifests, and a lock so one process owns it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from replicator.engine.errors import ConfigError
from replicator.journal.durable import makedirs_durable


def default_state_dir(side: str, job: str) -> Path:
    """/var/lib/replicator/<side>/<job> as root, else under $XDG_STATE_HOME (~/.local/state)."""
    if os.geteuid() == 0:
        return Path("/var/lib/replicator") / side / job
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "replicator" / side / job


class StateDirLock:
    """An exclusive flock on ``DIR/lock``; released when the process dies, even by SIGKILL."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> StateDirLock:
        try:
            makedirs_durable(self.path)
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot use state folder {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{self.what} already runs with state folder {self.path}",
                hint="stop it first, or give this one its own --state-dir",
            ) from None
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
