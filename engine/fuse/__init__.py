"""FUSE capture: a passthrough file system over a VM folder that journals every change.

``filter`` holds the pyfuse3 operations (journal first, then the real file, then the
reply), ``nodes`` the inode/path table, ``mount`` the mount-point checks and stale-mount
recovery, ``capture`` the mount/serve/unmount life cycle. See ``docs/FUSE.md``.
"""

from __future__ import annotations

from replicator.engine.fuse.capture import FuseCapture
from replicator.engine.fuse.filter import FilterStats, JournalingFilter
from replicator.engine.fuse.mount import check_paths, is_stale_mount, prepare_mountpoint

__all__ = [
    "FilterStats",
    "FuseCapture",
    "JournalingFilter",
    "check_paths",
    "is_stale_mount",
    "prepare_mountpoint",
]
