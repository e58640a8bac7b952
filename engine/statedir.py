"""The sender's state folder: journal, manifests, and a lock so one process owns it."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from replicator.engine.errors import ConfigError, cannot_use_folder, unwritable_folder
from replicator.journal.durable import makedirs_durable
from replicator.journal.locking import lock_directory


def default_state_dir(side: str, job: str) -> Path:
    """/var/lib/replicator/<side>/<job> as root, else under $XDG_STATE_HOME (~/.local/state)."""
    if os.geteuid() == 0:
        return Path("/var/lib/replicator") / side / job
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "replicator" / side / job


class StateDirLock:
    """The state folder, locked for one process (see replicator.journal.locking)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> StateDirLock:
        try:
            makedirs_durable(self.path)
            fd = lock_directory(self.path)
        except OSError as exc:
            raise cannot_use_folder(
                f"state folder {self.path}",
                exc,
                hint="create it, fix its permissions, or pick another folder",
            ) from exc
        if fd is None:
            raise ConfigError(
                f"{self.what} already runs with state folder {self.path}",
                hint="stop it first, or give this one its own --state-dir",
            )
        error = unwritable_folder(self.path, f"state folder {self.path}")
        if error is not None:
            os.close(fd)
            raise error
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
