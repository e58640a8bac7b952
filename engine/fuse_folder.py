"""A VM folder as a FUSE-captured job: what ``replicator send --capture fuse`` and the
embedding API's ``Sender(config, fuse=fuse_options(...))`` both build.

The job's volumes are the folder's files as walked now (files made through the mount later
reach the replica as the filter's records), ``folder=True`` has the replica folder's
layout listed at every connect, and the capture (``engine/live.py``, ``FuseFolderCapture``)
checks the mount point now, so a bad one fails before any data moves. The mount itself is
made by the live sender after its initial sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from replicator.engine.errors import ConfigError
from replicator.engine.live import FuseFolderCapture
from replicator.engine.sender_state import SenderConfig
from replicator.engine.tree import Tree, volumes_of, walk


@dataclass(frozen=True, slots=True)
class FuseOptions:
    """FUSE capture's options: the VM folder, and where it is mounted through the filter
    (``--mount``) for the VM to use."""

    source: Path
    mount: Path


def folder_source(volumes: Sequence[Path], not_one_folder: str) -> Path:
    """The one VM folder among ``volumes``: ConfigError when it does not exist, and
    ``not_one_folder`` when there are several or it is not a folder."""
    if len(volumes) == 1 and not volumes[0].exists():
        raise ConfigError(f"source folder {volumes[0]} does not exist", hint="check the path")
    if len(volumes) != 1:
        raise ConfigError(f"{not_one_folder} (given {len(volumes)})")
    if not volumes[0].is_dir():
        raise ConfigError(
            f"{not_one_folder}: {volumes[0]} is a file",
            hint="give the folder that holds the VM's disks and configuration (single "
            "files replicate with scan or NBD capture)",
        )
    return volumes[0]


def fuse_folder_job(
    config: SenderConfig, options: FuseOptions
) -> tuple[SenderConfig, FuseFolderCapture]:
    """``config`` with the folder's files as its volumes (walked now) and ``folder=True``,
    and the capture that mounts the folder (its paths and mount point checked now:
    ConfigError). Call it again for each run: the folder's files change while mounted."""
    source, state = options.source.resolve(), config.state_dir.resolve()
    if state == source or source in state.parents:
        raise ConfigError(
            f"state folder {config.state_dir} is inside the VM folder {options.source}: FUSE "
            "capture would replicate the sender's own journal with the VM and show it to the "
            "VM through the mount",
            hint="give --state-dir a folder outside the VM folder (the default is "
            "/var/lib/replicator/send/JOB)",
        )
    config, tree = folder_job(config, options.source)
    return config, FuseFolderCapture(options.source, options.mount, tree)


def folder_job(config: SenderConfig, source: Path) -> tuple[SenderConfig, Tree]:
    """``config`` with folder ``source``'s files as its volumes and ``folder=True``, and
    the folder's tree, as walked now (ConfigError for what cannot be replicated)."""
    tree = walk(source)
    return replace(config, volumes=volumes_of(source, tree), folder=True), tree
