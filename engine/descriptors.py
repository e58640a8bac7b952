"""The receiver's file descriptors: how many one job may hold, how many the process may.

Each job a receiver keeps open holds descriptors (its journal, its replica folder, up to
``MAX_OPEN_FILES`` replica files in the applier and as many disk images in the replica
guard, duplicates of the dirty ones while a sync runs). Jobs were opened on the first
Hello naming them and kept until the receiver stopped, so a sender naming a new job per
connection (a buggy script, or a source with a valid certificate and bad intent) ran the
process out of descriptors: the journals of *other* jobs then failed to open their next
segment, and no connection could be accepted. ``Receiver`` now keeps at most
``jobs_within`` jobs open (what the limit covers at their worst), and more only while the
descriptors actually open leave room for two more at their worst; to open another past
that it closes idle jobs (no session) first, else refuses.
"""

from __future__ import annotations

import os
import resource

import structlog

from replicator.engine.applier import MAX_OPEN_FILES
from replicator.engine.imagelock import ReplicaGuard

log = structlog.get_logger()

# what one open job may come to hold at most: its applier's replica files, their
# duplicates while a barrier syncs them, its guard's images, the journal, folders, locks
JOB_DESCRIPTORS = 2 * MAX_OPEN_FILES + ReplicaGuard.MAX_FILES + 16
# kept for everything else: connections (accepted, in their handshake), the control
# socket, logs, threads' files, a verify's reads
RESERVED_DESCRIPTORS = 512
FEW_JOBS = 8  # fewer jobs open at once than this: the receiver warns at start


def raise_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (a systemd service
    starts at 1024 with a hard limit far above); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("receiver.nofile_limit", soft=soft, hard=hard, error=str(exc))
        return soft
    return hard


def limit() -> int:
    """The soft limit of open files of this process."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def open_now() -> int | None:
    """Descriptors this process has open (None where /proc cannot say)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def room_for_another_job() -> bool:
    """Whether the descriptors open now leave room for two more jobs at their worst (and
    the reserve): a job past ``jobs_within`` opens only then."""
    used = open_now()
    return used is not None and used + 2 * JOB_DESCRIPTORS + RESERVED_DESCRIPTORS <= limit()


def jobs_within(soft_limit: int) -> int:
    """How many jobs a receiver with ``soft_limit`` descriptors keeps open at once."""
    return max(1, (soft_limit - RESERVED_DESCRIPTORS) // JOB_DESCRIPTORS)
