"""FUSE capture: a passthrough file system over a VM folder that journals every change.

``filter`` holds the pyfuse3 operations on file contents and attributes, ``tree_ops`` those
on names and directories (both journal first, through ``engine/journal_first.py``, then
change the real file, then reply), ``journaled`` the filter's side of that policy,
``view`` the inode/handle table and path resolution (over ``nodes``), ``replies`` the
error and attribute helpers, ``overflow`` what happens when the journal is full,
``mount`` the mount-point checks and stale-mount recovery, ``capture`` the
mount/serve/unmount life cycle. See ``docs/FUSE.md``.
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
