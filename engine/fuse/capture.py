"""Mount a folder through the journaling filter and serve it until told to stop.

pyfuse3 keeps one session per process (module-global state), so one process runs at
most one :class:`FuseCapture` at a time.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Final

import pyfuse3
import pyfuse3.asyncio
import structlog

from replicator.engine.errors import ConfigError, ReplicatorError
from replicator.engine.folder_guard import FolderGuard
from replicator.engine.fuse.filter import JournalingFilter
from replicator.engine.fuse.mount import check_paths, prepare_mountpoint
from replicator.journal.journal import Journal

log = structlog.get_logger("replicator.fuse")

STOP_TIMEOUT: Final = 60.0  # for requests still running when a stop is asked for
MAX_TASKS: Final = 64  # concurrent requests (pyfuse3 worker tasks)
FUSE_DEVICE: Final = "/dev/fuse"
FUSE_CONF: Final = "/etc/fuse.conf"  # where libfuse reads user_allow_other


def mount_failure_hint(
    *,
    allow_other: bool,
    device: str = FUSE_DEVICE,
    fuse_conf: str = FUSE_CONF,
    root: bool | None = None,
) -> str:
    """What to do when the kernel refused the mount: libfuse only says it failed (and
    prints its reason to stderr, outside our log)."""
    if root is None:
        root = os.geteuid() == 0
    if not os.access(device, os.R_OK | os.W_OK):
        return f"this user cannot open {device}: run as root, or give it access to {device}"
    if allow_other and not root and not _allows_other(fuse_conf):
        return (
            "as a non-root user, a mount the VM's user may use (allow_other) needs the line "
            f"'user_allow_other' in {fuse_conf}; or run as root"
        )
    return "check that fuse3 is installed (fusermount3) and the mount point is an empty folder"


def _allows_other(fuse_conf: str) -> bool:
    try:
        with open(fuse_conf, encoding="utf-8", errors="replace") as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


class FuseCapture:
    """Serves ``source`` at ``mountpoint``; every change is journaled into ``journal``.

    The journal is the caller's: it is synced, not closed, when ``run`` returns.
    """

    def __init__(
        self,
        source: Path,
        mountpoint: Path,
        journal: Journal,
        *,
        allow_other: bool = True,
        max_tasks: int = MAX_TASKS,
        overflow: bool = False,
        stop_timeout: float = STOP_TIMEOUT,
        guard: FolderGuard | None = None,
    ) -> None:
        """``guard``: the locks on SOURCE_DIR's images, kept up to date by the filter
        (engine/folder_guard.py); its owner releases it."""
        self.source = check_paths(Path(source), Path(mountpoint), journal.path)
        self.mountpoint = Path(os.path.abspath(mountpoint))
        self.journal = journal
        self.allow_other = allow_other
        self.max_tasks = max_tasks
        self.stop_timeout = stop_timeout
        self.filter = JournalingFilter(self.source, journal, overflow=overflow, guard=guard)
        self.mounted = asyncio.Event()  # set once the mount is live
        self._active = False

    def options(self) -> set[str]:
        opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
        # libfuse splits the options at commas and takes a backslash as an escape: a VM
        # folder named "web,db" failed its mount ("fuse_session_new() failed")
        fsname = str(self.source).replace("\\", "\\\\").replace(",", "\\,")
        opts |= {f"fsname=replicator:{fsname}", "subtype=replicator"}
        if self.allow_other:
            opts.add("allow_other")  # the VM's user (e.g. libvirt-qemu) is not ours
        return opts

    async def run(self, stop: asyncio.Event) -> None:
        """Mount, serve until ``stop`` is set or the mount is unmounted, then clean up.

        Cleanup appends a FLUSH record, syncs the journal and unmounts, also on errors.
        """
        if self._active:
            raise ConfigError("this FuseCapture is already running")
        self._active = True
        prepare_mountpoint(self.mountpoint)
        pyfuse3.asyncio.enable()
        try:
            pyfuse3.init(self.filter, str(self.mountpoint), self.options())
        except RuntimeError as exc:
            raise ReplicatorError(
                f"cannot mount FUSE at {self.mountpoint}: {exc}",
                hint=mount_failure_hint(allow_other=self.allow_other),
            ) from exc
        log.info("fuse.mounted", source=str(self.source), mountpoint=str(self.mountpoint))
        if not hasattr(pyfuse3.Operations, "fallocate"):
            log.warning(
                "fuse.fallocate_unavailable",
                detail="this pyfuse3 has no fallocate handler: punched holes reach the source "
                "and the replica as written zeros",
                hint="install replicator with `make install`, which builds pyfuse3 with the "
                "fallocate handler (engine/fuse/pyfuse3.patch)",
            )
        self.mounted.set()
        main = asyncio.ensure_future(pyfuse3.main(min_tasks=1, max_tasks=self.max_tasks))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if main.done():
                log.warning("fuse.unmounted_externally", mountpoint=str(self.mountpoint))
        finally:
            stopper.cancel()
            try:
                await end_main_loop(main, self.stop_timeout)  # also when cancelled or failed
            finally:
                try:
                    await self.filter.aclose()
                finally:
                    pyfuse3.close(unmount=True)
                self.mounted.clear()
                stats = self.filter.stats
                log.info(
                    "fuse.unmounted",
                    mountpoint=str(self.mountpoint),
                    writes=stats.writes,
                    bytes_written=stats.bytes_written,
                    max_write=stats.max_write,
                    records=stats.records,
                    syncs=stats.syncs,
                    durable_lsn=self.journal.durable_lsn,
                    diverged=self.filter.diverged,
                )
        if not main.cancelled():
            main.result()  # the loop's own failure (e.g. reading /dev/fuse)


async def end_main_loop(main: asyncio.Future[None], timeout: float = STOP_TIMEOUT) -> None:
    """Stop pyfuse3's main loop and return only once it has ended, with all its workers.

    ``pyfuse3.close()`` sets the session to NULL; a worker that is still to resume then
    calls libfuse with it and the process dies of SIGSEGV (a sender did, at a planned
    failover under load). So ``close()`` waits for this, also when ``terminate()`` fails
    and when the caller is cancelled meanwhile: requests still running get ``timeout``
    seconds, then ``main`` is cancelled (the patched nursery cancels its workers
    and ends when none runs) and waited for; a cancellation is raised after that.
    """
    if main.done():
        return
    try:
        pyfuse3.terminate()
    except Exception as exc:  # whatever it was, the loop must still end before close()
        log.error("fuse.terminate_failed", error=repr(exc))
    interrupted: asyncio.CancelledError | None = None
    try:
        await asyncio.wait({main}, timeout=timeout)
    except asyncio.CancelledError as exc:
        interrupted = exc
    if not main.done():
        if interrupted is None:
            log.error("fuse.stop_timeout", seconds=timeout)
        main.cancel()
    while not main.done():
        try:
            await asyncio.wait({main})
        except asyncio.CancelledError as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted
