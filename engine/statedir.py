"""A process's folders (a sender's state folder, a receiver's replica and state folders),
each locked so one process owns it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType

from replicator.engine.errors import ConfigError, cannot_use_folder, unwritable_folder
from replicator.journal.durable import makedirs_durable
from replicator.journal.locking import lock_directory

# Block rounding of the journal's files (up to MAX_SPARES spares, the sealed segments the
# acks have not trimmed yet, the active one) and the small state files' rewrites.
STATE_SLACK = 64 * 1024


def files_bytes(folder: Path) -> int:
    """The sizes of the regular files directly in ``folder`` (0 when it does not exist)."""
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        return sum(e.stat().st_size for e in entries if e.is_file(follow_symlinks=False))
    return 0


def free_bytes(folder: Path) -> int:
    """Bytes the file system holding ``folder`` still has for an unprivileged writer."""
    fs = os.statvfs(folder)
    return fs.f_bavail * fs.f_frsize


def state_reserve(state_dir: Path) -> int:
    """Free room a state folder's own files need beside its journal: each is replaced
    atomically (the old and the new side by side for a moment), so their sizes once more,
    plus ``STATE_SLACK``. A journal that took this room would meet ENOSPC, or make a
    state save meet it (the sender's journal cap, the receiver's credit keep it free)."""
    return files_bytes(state_dir) + STATE_SLACK


def default_state_dir(side: str, job: str) -> Path:
    """/var/lib/replicator/<side>/<job> as root, else under $XDG_STATE_HOME (~/.local/state)."""
    if os.geteuid() == 0:
        return Path("/var/lib/replicator") / side / job
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "replicator" / side / job


class StateDirLock:
    """A folder, locked for one process (see replicator.journal.locking).

    ``kind`` names the folder in errors, ``hint`` says what to do when another process
    holds it.
    """

    def __init__(
        self,
        path: Path,
        what: str,
        *,
        kind: str = "state folder",
        hint: str = "stop it first, or give this one its own --state-dir",
    ) -> None:
        self.path = path
        self.what = what
        self.kind = kind
        self.hint = hint
        self._fd: int | None = None

    def __enter__(self) -> StateDirLock:
        try:
            makedirs_durable(self.path)
            fd = lock_directory(self.path)
        except OSError as exc:
            raise cannot_use_folder(
                f"{self.kind} {self.path}",
                exc,
                hint="create it, fix its permissions, or pick another folder",
            ) from exc
        if fd is None:
            raise ConfigError(
                f"{self.what} already runs with {self.kind} {self.path}", hint=self.hint
            )
        error = unwritable_folder(self.path, f"{self.kind} {self.path}")
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


_SECOND_RECEIVER = (
    "stop it first; another receiver on this host needs a --dir of its own (and a "
    "--state-dir of its own, when one is given)"
)


def receiver_folder_locks(
    state_root: Path, replica_root: Path, *, hint: str = _SECOND_RECEIVER
) -> list[StateDirLock]:
    """The locks that make a receiver the only one on its folders: the state folder (the
    journals) and the replica folder (the replicas themselves: two receivers with state
    folders of their own would still write the same replicas). ``hint``: what to do when
    a receiver holds one."""
    locks = [StateDirLock(state_root, "a receiver", hint=hint)]
    if replica_root != state_root:
        locks.append(StateDirLock(replica_root, "a receiver", kind="replica folder", hint=hint))
    return locks
