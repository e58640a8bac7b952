"""The files a disk image cannot be opened without, and whether a job's replicas have them.

A qcow2 overlay needs its backing file (and, with the external-data-file feature, its data
file, which holds every guest byte); a differencing VHD or VHDX needs its parent. The header
names them (``engine/image_formats.py``), relative to the image's folder unless absolute.
Replicating the overlay alone makes a faithful copy that no hypervisor can open on the
target: the kind of surprise an operator must hear about when it can still be fixed, at
``send`` (``unreplicated``), and again at ``failover`` (``missing_on_target``), before the VM
is started from it.

Replicas are named after the file name (DIR/JOB/NAME), so a replica finds the job's replica
of its backing file only when the header names it by its bare file name; an absolute or
``../other/`` name still points where it pointed on the source. Both checks say so.
Nothing here changes an image: rewriting a replica's header (``qemu-img rebase -u``) would
travel back to the source at failback.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from replicator.engine.image_formats import DiskFormat, ImageHeaderError, read_header_file
from replicator.engine.names import printable, tree_entries


@dataclass(frozen=True, slots=True)
class Dependency:
    """A file ``image`` needs. ``name`` is as the header writes it (None when the header
    does not name it: a VHDX parent, whose locator is not read); ``path`` is where it
    resolves on this machine (None for a name that is not a local file, or no name)."""

    image: Path
    role: str  # "backing file", "data file" or "parent"
    name: str | None
    path: Path | None
    format: str | None = None  # the backing format the header names, if it does

    @property
    def bare(self) -> bool:
        """Named by its file name alone, so it resolves beside the image (and beside the
        replica, where replicas are named after the file name)."""
        return self.name is not None and "/" not in self.name and "\\" not in self.name


def dependencies(image: Path) -> list[Dependency]:
    """What ``image`` needs besides itself; [] for a file that is not an image with any,
    or whose header cannot be read (the replication itself reports unreadable files)."""
    try:
        header, _ = read_header_file(image)
    except (OSError, ImageHeaderError):
        return []
    named: list[tuple[str, str | None, str | None]] = []
    if header.backing_file is not None:
        named.append(("backing file", header.backing_file, header.backing_format))
    if header.data_file is not None:
        named.append(("data file", header.data_file, None))
    if header.format is DiskFormat.VHD and header.subformat == "differencing":
        named.append(("parent", header.parent, DiskFormat.VHD.value))
    if header.format is DiskFormat.VHDX and header.subformat == "differencing":
        named.append(("parent", None, DiskFormat.VHDX.value))
    return [Dependency(image, role, name, _resolve(image, name), fmt) for role, name, fmt in named]


def _resolve(image: Path, name: str | None) -> Path | None:
    if not name or name.startswith("json:") or "://" in name:
        return None
    return Path(os.path.normpath(image.parent / name))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _describe(dep: Dependency) -> str:
    return (
        f"{printable(dep.image)}'s {dep.role} {printable(dep.name)!r}"
        if dep.name
        else f"{printable(dep.image)} is a differencing disk; its parent"
    )


def unreplicated(images: Iterable[Path], *, tree: bool = False) -> list[str]:
    """Warnings for what the images among ``images`` (one job's volumes) need and the job
    does not replicate, or replicates where their replicas will not find it. ``tree``: the
    job replicates a folder as a tree (FUSE capture), so relative names keep resolving on
    the target; only absolute ones point elsewhere."""
    images = list(images)
    ours = {ident: p for p in images if (ident := _identity(p)) is not None}
    vhdx_volumes = sum(1 for p in images if p.suffix.lower() in (".vhdx", ".avhdx"))
    found: list[str] = []
    for image in images:
        for dep in dependencies(image):
            what = _describe(dep)
            if dep.name is None:  # a VHDX parent: its locator is not read
                if vhdx_volumes < 2:
                    found.append(
                        f"{what} must reach the target too: add it to this job's volumes "
                        "(the chain down to the base disk), or the replica cannot be opened"
                    )
                continue
            if dep.path is None:
                found.append(
                    f"{what} is not a local file: the target must reach it under the same "
                    "name, or the replica cannot be opened"
                )
                continue
            ident = _identity(dep.path)
            if ident not in ours:
                missing = "" if ident is not None else " (and it is not there on this side)"
                where = "" if str(dep.path) == dep.name else f" ({printable(dep.path)})"
                found.append(
                    f"{what}{where} is not replicated by this job{missing}: "
                    "the replica cannot be opened on the target without it. "
                    + (
                        "Move it into the replicated folder"
                        if tree
                        else "Add it to the volumes (`replicator discover` lists the whole chain)"
                    )
                    + (
                        " (it holds the disk's data)"
                        if dep.role == "data file"
                        else ", or copy it to the target once if it never changes"
                    )
                )
            elif not (dep.bare or (tree and not os.path.isabs(dep.name))):
                beside = dep.path.parent == Path(os.path.normpath(image.parent))
                found.append(
                    f"{what} is replicated, but the header names it by a path, not by its "
                    "file name: on the target the replica will look at that path, not at the "
                    "job's replica of it. "
                    + (
                        f"With the VM stopped, `qemu-img rebase -u -b {printable(dep.path.name)}"
                        f" {printable(image)}` names it by its file name (the replica follows)"
                        if beside
                        else "Keep the chain in one folder, named by file names, or point the "
                        "replica at the job's copy after failover (failover says how)"
                    )
                )
    return found


def missing_on_target(replica_dir: Path) -> list[str]:
    """Problems a VM started from the replicas in ``replica_dir`` would meet: a backing
    file, data file or parent that is not where a replica's header says it is, or that
    is another file than the job's replica of the same name. Read-only."""
    if not replica_dir.is_dir():
        return []
    found: list[str] = []
    for image in sorted(tree_entries(replica_dir)):
        if image.is_symlink() or not image.is_file():
            continue
        for dep in dependencies(image):
            if dep.name is None:
                continue  # a VHDX parent: not named, nothing to check against
            what = _describe(dep)
            if dep.path is None:
                found.append(f"{what} is not a local file: make sure this host reaches it")
                continue
            replica = image.parent / Path(dep.name.replace("\\", "/")).name
            exists = dep.path.is_file()
            if exists and (dep.bare or not replica.is_file()):
                continue
            if exists and _identity(dep.path) == _identity(replica):
                continue
            if replica.is_file():
                found.append(
                    f"{what} resolves to {printable(dep.path)}"
                    + ("" if exists else ", which does not exist here")
                    + f", not to this job's replica {printable(replica)}: point it there "
                    f"(`qemu-img rebase -u -b {printable(replica.name)}"
                    + (f" -F {dep.format}" if dep.format else "")
                    + f" {printable(image)}`; failback then carries that name back), "
                    "or put the right file at that path"
                )
            else:
                found.append(
                    f"{what} is not at {printable(dep.path)}: the VM cannot start from this "
                    "replica until it is there (copy it from the source or a backup)"
                )
    return found
