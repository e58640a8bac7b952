"""``replicator discover``: the VMs under some folders, what belongs to each, as jobs.

Three kinds of VM are recognised while walking the given paths (symlinked folders are not
followed, so a link cannot make the walk loop or leave the tree; symlinked files are):

* **libvirt**: a ``*.xml`` file whose root element is ``<domain>``. Its disks are the
  ``<devices><disk type="file"><source file=...>`` entries, its files the XML itself and
  the UEFI variable store (``<os><nvram>``). CD-ROM media are listed but not replicated;
  block, network and pool disks are reported, not replicated. XML with a DOCTYPE or an
  ENTITY declaration is refused unread (nothing is expanded).
* **Hyper-V**: a folder holding ``Virtual Machines`` and/or ``Virtual Hard Disks``. Its
  files are the configurations (``*.vmcx``, ``*.vmrs``, ``*.vmgs``, ``*.xml``) in
  ``Virtual Machines`` and ``Snapshots``, its disks every image in ``Virtual Hard Disks``.
* **loose images**: any other file whose header is a disk image's, or named like one
  (``.img``, ``.raw``, ...) and not claimed by a VM above; one VM per image.

Formats and virtual sizes come from the headers (``engine/image_formats.py``), never from
names. A qcow2 image's backing file and external data file belong to its VM as well and
are followed. A disk a VM names but which is missing is reported, not dropped. Each VM
becomes one job, named after the VM (sanitised to a valid job name, de-duplicated).
``render_job_file`` writes the jobs as TOML that ``tomllib`` reads back; the schema is in
``docs/DISCOVERY.md``.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn
from xml.parsers import expat

from replicator.engine.at_rest import is_receiver_state
from replicator.engine.errors import ConfigError
from replicator.engine.image_formats import (
    SECTOR,
    DiskFormat,
    ImageHeader,
    ImageHeaderError,
    read_header_file,
)
from replicator.engine.names import (
    RECEIVER_STATE_NAME,
    check_job_name,
    is_reserved_job_name,
    printable,
    volume_name_problem,
)
from replicator.engine.units import human_size

XML_MAX_BYTES = 4 * 1024 * 1024  # a domain XML is a few KiB; larger ones are not read
BACKING_CHAIN_MAX = 16
# names that make a file a disk image even when its header says raw
IMAGE_SUFFIXES = {
    ".img": None,
    ".raw": None,
    ".qcow2": DiskFormat.QCOW2,
    ".qcow": DiskFormat.QCOW2,
    ".vhd": DiskFormat.VHD,
    ".avhd": DiskFormat.VHD,
    ".vhdx": DiskFormat.VHDX,
    ".avhdx": DiskFormat.VHDX,
    ".vmdk": DiskFormat.VMDK,
    ".vdi": DiskFormat.VDI,
}
HYPERV_VMS = "virtual machines"
HYPERV_DISKS = "virtual hard disks"
HYPERV_SNAPSHOTS = "snapshots"
HYPERV_CONFIG_SUFFIXES = (".vmcx", ".vmrs", ".vmgs", ".xml")
# how libvirt's <driver type=...> names the formats we detect
_LIBVIRT_FORMAT = {"vpc": DiskFormat.VHD}
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"  # <channel><target name=...> of a domain

Identity = tuple[int, int]


class VMKind(StrEnum):
    LIBVIRT = "libvirt"
    HYPERV = "hyper-v"
    IMAGE = "image"


@dataclass(slots=True)
class Disk:
    """One disk image of a VM. ``included`` says whether its job replicates it; when not,
    ``problem`` (or a note, for CD-ROM media) says why."""

    path: str
    role: str = "disk"  # disk, cdrom, backing file, data file
    resolved: str | None = None  # the real path, when ``path`` goes through a symlink
    present: bool = True
    format: str | None = None
    subformat: str | None = None
    virtual_size: int | None = None
    file_size: int | None = None
    allocated: int | None = None
    target: str | None = None  # libvirt's target device (vda, sdb)
    declared_format: str | None = None  # libvirt's <driver type=...>
    named_by: str | None = None  # the configuration (or image) that names this disk
    backing: str | None = None  # the absolute path of its backing file
    included: bool = True
    problem: str | None = None
    notes: list[str] = field(default_factory=list)
    header: ImageHeader | None = None
    identity: Identity | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "resolved": self.resolved,
            "role": self.role,
            "present": self.present,
            "included": self.included,
            "format": self.format,
            "subformat": self.subformat,
            "virtual_size": self.virtual_size,
            "file_size": self.file_size,
            "allocated": self.allocated,
            "target": self.target,
            "declared_format": self.declared_format,
            "named_by": self.named_by,
            "backing": self.backing,
            "problem": self.problem,
            "notes": list(self.notes),
        }


@dataclass(slots=True)
class ConfigFile:
    """A configuration file of a VM (replicated whole when small, see engine/volumes.py)."""

    path: str
    role: str
    resolved: str | None = None
    present: bool = True
    size: int | None = None
    named_by: str | None = None
    included: bool = True
    problem: str | None = None
    identity: Identity | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "resolved": self.resolved,
            "role": self.role,
            "present": self.present,
            "included": self.included,
            "size": self.size,
            "named_by": self.named_by,
            "problem": self.problem,
        }


@dataclass(slots=True)
class VM:
    name: str
    kind: VMKind
    source: str  # the domain XML, the Hyper-V folder or the loose image
    job: str = ""
    disks: list[Disk] = field(default_factory=list)
    files: list[ConfigFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # libvirt: the domain has a QEMU guest agent channel (what `virsh domfsfreeze` needs)
    guest_agent: bool = False

    @property
    def volumes(self) -> list[str]:
        return [d.path for d in self.disks if d.included]

    @property
    def config_files(self) -> list[str]:
        return [f.path for f in self.files if f.included]

    @property
    def total_bytes(self) -> int:
        """File bytes of what the job replicates (the apparent size of every file)."""
        return sum(d.file_size or 0 for d in self.disks if d.included) + sum(
            f.size or 0 for f in self.files if f.included
        )

    @property
    def allocated_bytes(self) -> int:
        return sum(d.allocated or 0 for d in self.disks if d.included)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "job": self.job,
            "kind": self.kind.value,
            "source": self.source,
            "disks": [d.to_json() for d in self.disks],
            "files": [f.to_json() for f in self.files],
            "volumes": self.volumes,
            "config_files": self.config_files,
            "total_bytes": self.total_bytes,
            "allocated_bytes": self.allocated_bytes,
            "guest_agent": self.guest_agent,
            "warnings": list(self.warnings),
        }


@dataclass(slots=True)
class Discovery:
    paths: list[str]
    vms: list[VM]
    warnings: list[str]  # every warning: the walk's, then each VM's (prefixed by its name)

    def to_json(self) -> dict[str, Any]:
        return {
            "paths": list(self.paths),
            "vms": [vm.to_json() for vm in self.vms],
            "total_bytes": sum(vm.total_bytes for vm in self.vms),
            "warnings": list(self.warnings),
        }


# -- XML, safely --------------------------------------------------------------------------


class XMLRefused(ValueError):
    """The XML declares a DOCTYPE or entities, is too large or is not well formed."""


def _refuse_dtd(*_: object) -> NoReturn:
    raise XMLRefused("it declares a DOCTYPE or ENTITY (refused: nothing in it is expanded)")


def parse_xml(data: bytes) -> ET.Element:
    """Parse ``data`` with ElementTree after making sure it declares no DTD or entities.

    A plain byte search refuses ``<!DOCTYPE``/``<!ENTITY`` in ASCII-compatible encodings; an
    expat pass with handlers that raise at the first DOCTYPE or entity declaration (before
    any content is read) catches the others (UTF-16). Without a DTD, expat expands nothing
    but the five predefined entities and character references.
    """
    upper = data.upper()
    if b"<!DOCTYPE" in upper or b"<!ENTITY" in upper:
        _refuse_dtd()
    checker = expat.ParserCreate()
    checker.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    checker.StartDoctypeDeclHandler = _refuse_dtd
    checker.EntityDeclHandler = _refuse_dtd
    checker.UnparsedEntityDeclHandler = _refuse_dtd
    checker.ExternalEntityRefHandler = _refuse_dtd
    try:
        checker.Parse(data, True)
        return ET.fromstring(data)
    except (expat.ExpatError, ET.ParseError) as exc:
        raise XMLRefused(f"not well-formed XML ({exc})") from None


def _looks_like_domain(data: bytes) -> bool:
    return any("<domain".encode(codec) in data for codec in ("ascii", "utf-16-le", "utf-16-be"))


# -- helpers --------------------------------------------------------------------------------


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino)


def _resolved(path: str) -> str | None:
    real = os.path.realpath(path)
    return real if real != os.path.normpath(path) else None


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def describe_format(disk: Disk) -> str:
    if disk.format is None:
        return "-"
    return f"{disk.format} {disk.subformat}" if disk.subformat else disk.format


# -- the walk -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Found:
    """Files met while walking, one per identity: its preferred path (not a symlink when
    both a link and the file itself were met) and whether a PATH argument named it."""

    path: str
    explicit: bool


class _Discoverer:
    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.files: dict[Identity, _Found] = {}
        self.hyperv: dict[Identity, tuple[str, dict[str, str]]] = {}
        self.seen_dirs: set[Identity] = set()
        self.vms: list[VM] = []
        self.claimed: set[Identity] = set()

    # walking

    def add_root(self, root: str) -> None:
        if os.path.isdir(root):
            self._walk(root)
        else:
            self._meet(root, explicit=True)

    def _walk(self, root: str) -> None:
        def failed(exc: OSError) -> None:
            self.warnings.append(f"cannot list folder {exc.filename}: {exc.strerror}")

        for dirpath, dirnames, filenames in os.walk(root, onerror=failed):
            st = _stat(dirpath)
            if st is None or _identity(st) in self.seen_dirs:
                dirnames[:] = []  # a folder met twice (a bind mount, nested PATHs)
                continue
            self.seen_dirs.add(_identity(st))
            if is_receiver_state(Path(dirpath, RECEIVER_STATE_NAME)):
                self.warnings.append(
                    f"not looking in {dirpath}: a receiver keeps its replicas there "
                    f"({os.path.join(dirpath, RECEIVER_STATE_NAME)} is its state), and a "
                    "replica is not a VM to replicate again (give DIR/JOB as a PATH to "
                    "include one)"
                )
                dirnames[:] = []
                continue
            keep: list[str] = []
            for name in dirnames:
                full = os.path.join(dirpath, name)
                if os.path.islink(full):
                    self.warnings.append(
                        f"not following symlinked folder {full} -> {os.path.realpath(full)} "
                        "(give the target as a PATH to include it)"
                    )
                else:
                    keep.append(name)
            special = {
                name.lower(): os.path.join(dirpath, name)
                for name in keep
                if name.lower() in (HYPERV_VMS, HYPERV_DISKS, HYPERV_SNAPSHOTS)
            }
            if HYPERV_VMS in special or HYPERV_DISKS in special:
                self.hyperv.setdefault(_identity(st), (dirpath, special))
                keep = [name for name in keep if name.lower() not in special]
            dirnames[:] = sorted(keep)
            for name in sorted(filenames):
                self._meet(os.path.join(dirpath, name), explicit=False)

    def _meet(self, path: str, *, explicit: bool) -> None:
        st = _stat(path)
        if st is None:  # a dangling symlink
            if explicit or _suffix(path) in IMAGE_SUFFIXES:
                self.warnings.append(f"{path} cannot be opened (a dangling symlink?): skipped")
            return
        if not stat.S_ISREG(st.st_mode):
            if explicit:
                self.warnings.append(f"{path} is not a regular file: skipped")
            return
        key = _identity(st)
        found = self.files.get(key)
        if found is None:
            self.files[key] = _Found(path, explicit)
            return
        found.explicit |= explicit
        if os.path.islink(found.path) and not os.path.islink(path):
            found.path = path

    # building VMs

    def build(self) -> list[VM]:
        loose: list[tuple[Disk, VM]] = []
        for key, found in sorted(self.files.items(), key=lambda item: item[1].path):
            if _suffix(found.path) == ".xml":
                vm = self._libvirt(found.path, explicit=found.explicit)
                if vm is not None:
                    self.claimed.add(key)
                    self.vms.append(vm)
                continue
            candidate = self._loose_candidate(found)
            if candidate is not None:
                loose.append(candidate)
        for folder, special in sorted(self.hyperv.values()):
            self.vms.append(self._hyperv(folder, special))
        for vm in self.vms:
            self._claim(vm)
        self._loose_vms([c for c in loose if c[0].identity not in self.claimed])
        self._check_shared()
        return self.vms

    def _claim(self, vm: VM) -> None:
        for disk in vm.disks:
            if disk.identity is not None:
                self.claimed.add(disk.identity)
        for config in vm.files:
            if config.identity is not None:
                self.claimed.add(config.identity)

    # disks

    def _disk(self, path: str, vm: VM, *, role: str = "disk", named_by: str | None) -> Disk:
        """A disk at ``path`` (absolute), probed, with problems told to ``vm``."""
        disk = Disk(path=path, role=role, named_by=named_by, resolved=_resolved(path))
        self._probe(disk, vm)
        return disk

    def _probe(self, disk: Disk, vm: VM | None) -> None:
        def warn(text: str) -> None:
            if vm is not None:
                vm.warnings.append(text)
            else:
                self.warnings.append(text)

        try:
            header, st = read_header_file(disk.path)
        except FileNotFoundError:
            disk.present = disk.included = False
            disk.problem = "missing"
            by = f" (named by {disk.named_by})" if disk.named_by else ""
            warn(f"{disk.role} {disk.path}{by} is missing: not replicated")
            return
        except ImageHeaderError as exc:
            # a damaged image is still the VM's disk: replicated byte for byte as it is
            disk.format = exc.format.value
            disk.problem = f"damaged {exc}"
            warn(f"{disk.path}: damaged {exc}; replicated as it is")
            st_or_none = _stat(disk.path)
            if st_or_none is not None:
                disk.file_size = st_or_none.st_size
                disk.allocated = st_or_none.st_blocks * 512
                disk.identity = _identity(st_or_none)
            return
        except OSError as exc:
            disk.included = False
            disk.problem = f"cannot read it: {exc.strerror}"
            warn(f"{disk.role} {disk.path}: {disk.problem}: not replicated")
            return
        disk.header = header
        disk.identity = _identity(st)
        disk.format = header.format.value
        disk.subformat = header.subformat
        disk.virtual_size = header.virtual_size
        disk.file_size, disk.allocated = st.st_size, st.st_blocks * 512
        disk.notes.extend(header.notes)
        expected = IMAGE_SUFFIXES.get(_suffix(disk.path))
        if expected is not None and header.format is not expected:
            disk.notes.append(
                f"named *{_suffix(disk.path)}, but its header says {header.format.value}"
            )
        if disk.declared_format is not None:
            declared = _LIBVIRT_FORMAT.get(disk.declared_format, disk.declared_format)
            if declared != header.format.value:
                disk.notes.append(
                    f"the XML says format {disk.declared_format!r}, "
                    f"the header says {header.format.value}"
                )

    def _chain(self, top: Disk, vm: VM, seen: set[Identity]) -> list[Disk]:
        """The backing and data files of ``top`` (qcow2), followed to their end; ``seen``
        holds the identities the VM already lists (and gains the new ones)."""
        found: list[Disk] = []
        own = {top.identity}
        queue = [top]
        while queue:
            disk = queue.pop(0)
            header = disk.header
            if header is None:
                continue
            for name, role in (
                (header.backing_file, "backing file"),
                (header.data_file, "data file"),
            ):
                if name is None:
                    continue
                if name.startswith("json:") or "://" in name:
                    disk.notes.append(f"its {role} {name!r} is not a local file: not followed")
                    vm.warnings.append(f"{disk.path}: {role} {name!r} is not a local file")
                    continue
                path = os.path.abspath(os.path.join(os.path.dirname(disk.path), name))
                if role == "backing file":
                    disk.backing = path
                if len(found) >= BACKING_CHAIN_MAX:
                    vm.warnings.append(
                        f"{top.path}: backing chain longer than {BACKING_CHAIN_MAX}: cut there"
                    )
                    return found
                child = self._disk(path, vm, role=role, named_by=disk.path)
                if child.identity in own:
                    vm.warnings.append(f"{disk.path}: its backing chain loops back to {path}")
                    continue
                if child.identity is not None:
                    if child.identity in seen:
                        continue  # the VM lists it already
                    seen.add(child.identity)
                    own.add(child.identity)
                found.append(child)
                queue.append(child)
        return found

    def _with_chains(self, vm: VM) -> None:
        seen = {d.identity for d in vm.disks if d.identity is not None}
        chained: list[Disk] = []
        for disk in vm.disks:
            chained.append(disk)
            chained.extend(self._chain(disk, vm, seen))
        vm.disks = chained

    # libvirt

    def _read_xml(self, path: str, *, explicit: bool, what: str) -> ET.Element | None:
        try:
            with open(path, "rb") as f:
                data = f.read(XML_MAX_BYTES + 1)
        except OSError as exc:
            self.warnings.append(f"cannot read {path}: {exc.strerror}")
            return None
        if len(data) > XML_MAX_BYTES:
            if explicit or _looks_like_domain(data[:4096]):
                self.warnings.append(
                    f"{path} is larger than {XML_MAX_BYTES >> 20} MiB: not read as {what}"
                )
            return None
        try:
            return parse_xml(data)
        except XMLRefused as exc:
            if explicit or _looks_like_domain(data):
                self.warnings.append(f"{path} refused as {what}: {exc}")
            return None

    def _libvirt(self, path: str, *, explicit: bool) -> VM | None:
        root = self._read_xml(path, explicit=explicit, what="a libvirt domain")
        if root is None:
            return None
        if root.tag != "domain":
            if explicit:
                self.warnings.append(
                    f"{path} is not a libvirt domain XML (root element <{root.tag}>): skipped"
                )
            return None
        stem = os.path.splitext(os.path.basename(path))[0]
        name = (root.findtext("name") or "").strip()
        vm = VM(name or stem, VMKind.LIBVIRT, source=path)
        if not name:
            vm.warnings.append(f"{path} has no <name>: named after the file")
        st = os.stat(path)
        vm.files.append(
            ConfigFile(
                path, "libvirt domain XML", _resolved(path), size=st.st_size, identity=_identity(st)
            )
        )
        folder = os.path.dirname(path)
        for element in root.iterfind("devices/disk"):
            self._libvirt_disk(vm, element, path, folder)
        vm.guest_agent = any(
            target.get("name") == GUEST_AGENT_CHANNEL
            for target in root.iterfind("devices/channel/target")
        )
        nvram = root.find("os/nvram")
        if nvram is not None:
            source = nvram.find("source")
            where = (nvram.text or "").strip() or (
                (source.get("file") or "") if source is not None else ""
            )
            if where:
                self._config(vm, self._absolute(where, folder, vm, path), "UEFI variables", path)
        self._with_chains(vm)
        return vm

    def _absolute(self, where: str, folder: str, vm: VM, named_by: str) -> str:
        if os.path.isabs(where):
            return where
        vm.warnings.append(
            f"{named_by} names {where!r} by a relative path: taken relative to {folder}"
        )
        return os.path.abspath(os.path.join(folder, where))

    def _libvirt_disk(self, vm: VM, element: ET.Element, xml_path: str, folder: str) -> None:
        kind = element.get("type", "file")
        device = element.get("device", "disk")
        target_el, driver, source = (element.find(tag) for tag in ("target", "driver", "source"))
        target = target_el.get("dev") if target_el is not None else None
        label = target or "(no target)"
        if kind == "file":
            where = source.get("file") if source is not None else None
            if not where:
                return  # an empty CD-ROM drive
            path = self._absolute(where, folder, vm, xml_path)
            disk = Disk(
                path=path,
                role="cdrom" if device == "cdrom" else "disk",
                resolved=_resolved(path),
                target=target,
                declared_format=driver.get("type") if driver is not None else None,
                named_by=xml_path,
            )
            self._probe(disk, vm)
            if device == "cdrom" and disk.included:
                disk.included = False
                disk.notes.append("read-only media: not replicated (copy it to the target once)")
            vm.disks.append(disk)
        elif kind == "block":
            where = (source.get("dev") if source is not None else None) or "(no source)"
            vm.disks.append(
                Disk(
                    path=where,
                    role=device,
                    target=target,
                    named_by=xml_path,
                    included=False,
                    present=os.path.exists(where),
                    problem="a block device: send replicates files only",
                )
            )
            vm.warnings.append(f"disk {label} is the block device {where}: not replicated")
        else:
            attrs = dict(source.attrib) if source is not None else {}
            vm.warnings.append(
                f"disk {label} is a {kind!r} disk {attrs}: not discovered (only file disks are)"
            )

    def _config(self, vm: VM, path: str, role: str, named_by: str | None) -> None:
        config = ConfigFile(path, role, _resolved(path), named_by=named_by)
        st = _stat(path)
        if st is None:
            config.present = config.included = False
            config.problem = "missing"
            by = f" (named by {named_by})" if named_by else ""
            vm.warnings.append(f"{role} {path}{by} is missing: not replicated")
        elif not stat.S_ISREG(st.st_mode):
            config.included = False
            config.problem = "not a regular file"
            vm.warnings.append(f"{role} {path} is not a regular file: not replicated")
        else:
            config.size, config.identity = st.st_size, _identity(st)
        vm.files.append(config)

    # Hyper-V

    def _hyperv(self, folder: str, special: dict[str, str]) -> VM:
        vm = VM(os.path.basename(folder.rstrip("/")) or folder, VMKind.HYPERV, source=folder)
        configs: list[str] = []
        for sub in (HYPERV_VMS, HYPERV_SNAPSHOTS):
            if sub in special:
                configs += [
                    p for p in self._list(special[sub], vm) if _suffix(p) in HYPERV_CONFIG_SUFFIXES
                ]
        for path in configs:
            role = "Hyper-V " + _suffix(path)[1:] + " file"
            self._config(vm, path, role, None)
        in_vms = [
            p
            for p in configs
            if os.path.dirname(p) == special.get(HYPERV_VMS) and _suffix(p) in (".vmcx", ".xml")
        ]
        stems = {os.path.splitext(os.path.basename(p))[0].lower() for p in in_vms}
        if not in_vms:
            vm.warnings.append(f"no configuration (.vmcx or .xml) under {folder}/Virtual Machines")
        elif len(stems) > 1:
            vm.warnings.append(
                f"{len(stems)} VM configurations in one folder: kept together as one job "
                "(which disk belongs to which cannot be told from .vmcx files)"
            )
        elif len(in_vms) == 1 and _suffix(in_vms[0]) == ".xml":
            root = self._read_xml(in_vms[0], explicit=True, what="a Hyper-V configuration")
            name = root.findtext("properties/name") if root is not None else None
            if root is not None and root.tag == "configuration" and name and name.strip():
                vm.name = name.strip()
        if HYPERV_DISKS in special:
            for path in self._list(special[HYPERV_DISKS], vm):
                disk = Disk(path=path, resolved=_resolved(path), named_by=folder)
                self._probe(disk, vm)
                if disk.format == DiskFormat.RAW and _suffix(path) not in IMAGE_SUFFIXES:
                    continue  # desktop.ini and the like
                vm.disks.append(disk)
        if not vm.disks:
            vm.warnings.append(f"no disk image under {folder}/Virtual Hard Disks")
        self._with_chains(vm)
        return vm

    def _list(self, folder: str, vm: VM) -> list[str]:
        """The regular files (symlinks to files too) directly in ``folder``, sorted."""
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            vm.warnings.append(f"cannot list folder {folder}: {exc.strerror}")
            return []
        out = []
        for name in names:
            path = os.path.join(folder, name)
            st = _stat(path)
            if st is not None and stat.S_ISREG(st.st_mode):
                out.append(path)
        return out

    # loose images

    def _loose_candidate(self, found: _Found) -> tuple[Disk, VM] | None:
        """A file that is a disk image (by its header, or by its name for raw images, or
        because a PATH named it), with the VM it makes when nothing else claims it."""
        path = found.path
        named = _suffix(path) in IMAGE_SUFFIXES
        st = _stat(path)
        if st is None or (st.st_size < SECTOR and not (found.explicit or named)):
            return None
        disk = Disk(path=path, resolved=_resolved(path))
        vm = VM(os.path.splitext(os.path.basename(path))[0], VMKind.IMAGE, source=path)
        self._probe(disk, vm)
        if disk.format in (None, DiskFormat.RAW) and not (found.explicit or named):
            return None
        if disk.format is None:  # unreadable
            self.warnings.extend(vm.warnings)
            return None
        return disk, vm

    def _loose_vms(self, loose: list[tuple[Disk, VM]]) -> None:
        """One VM per loose image, with its backing chain; an image that is only another
        loose image's backing (or data) file goes with that image."""
        chains: dict[Identity, list[Disk]] = {}
        below: set[Identity] = set()
        for disk, vm in loose:
            assert disk.identity is not None
            chain = self._chain(disk, vm, {disk.identity})
            chains[disk.identity] = chain
            below.update(d.identity for d in chain if d.identity is not None)
        done: set[Identity] = set()
        ordered = [p for p in loose if p[0].identity not in below]
        ordered += [p for p in loose if p[0].identity in below]  # loops: what no top took
        for disk, vm in ordered:
            assert disk.identity is not None
            if disk.identity in done:
                continue
            vm.disks = [disk, *chains[disk.identity]]
            done.update(d.identity for d in vm.disks if d.identity is not None)
            self.vms.append(vm)

    def _check_shared(self) -> None:
        owners: dict[Identity, list[tuple[VM, Disk]]] = {}
        for vm in self.vms:
            for disk in vm.disks:
                if disk.identity is not None and disk.included:
                    owners.setdefault(disk.identity, []).append((vm, disk))
        for pairs in owners.values():
            names = sorted({vm.name for vm, _ in pairs})
            if len(names) > 1:
                for vm, disk in pairs:
                    vm.warnings.append(
                        f"{disk.path} belongs to the VMs {', '.join(names)}: only one job at a "
                        "time can replicate it (each sender locks its images)"
                    )


# -- jobs -----------------------------------------------------------------------------------


def job_name_for(name: str, taken: set[str]) -> str:
    """A valid job name (engine/names.py) from a VM name, not in ``taken`` nor reserved
    (compared case-insensitively, as some receivers' file systems do); adds it to
    ``taken``. A VM named like a reserved name (``control.sock``) gets a suffix too."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    text = re.sub(r"\.{2,}", ".", text)
    text = re.sub(r"-{2,}", "-", text).lstrip("._-")[:64].rstrip("._-") or "vm"
    candidate, n = text, 2
    while candidate.casefold() in taken or is_reserved_job_name(candidate):
        suffix = f"-{n}"
        candidate = text[: 64 - len(suffix)].rstrip("._-") + suffix
        n += 1
    taken.add(candidate.casefold())
    return check_job_name(candidate)


def _assign_jobs(vms: list[VM]) -> None:
    taken: set[str] = set()
    for vm in vms:
        vm.job = job_name_for(vm.name, taken)


def _check_replica_names(vm: VM) -> None:
    """Replicas are named after the file name: two files of a job must not share one, and
    each must be a valid volume name that TOML can hold."""
    seen: dict[str, str] = {}
    items: list[Disk | ConfigFile] = [*vm.disks, *vm.files]
    for item in items:
        if not item.included:
            continue
        name = os.path.basename(item.path)
        try:
            item.path.encode()
            problem = volume_name_problem(name)
        except UnicodeEncodeError:
            problem = f"path '{printable(item.path)}' is not valid UTF-8"
        if problem is None and name in seen:
            problem = f"its replica name {name!r} is taken by {seen[name]} in the same job"
        if problem is not None:
            item.included = False
            item.problem = problem
            vm.warnings.append(f"{item.path}: {problem}: not replicated by this job")
        else:
            seen[name] = item.path


def discover(paths: Sequence[str | os.PathLike[str]]) -> Discovery:
    """Find the VMs under ``paths``; ConfigError when a path does not exist."""
    if not paths:
        raise ConfigError("no PATH given", hint="name folders or files to look in")
    roots = [os.path.abspath(os.fspath(p)) for p in paths]
    for root in roots:
        if not os.path.exists(root):
            raise ConfigError(f"{root} does not exist", hint="give existing folders or files")
    finder = _Discoverer()
    for root in roots:
        finder.add_root(root)
    vms = finder.build()
    order = list(VMKind)
    vms.sort(key=lambda vm: (order.index(vm.kind), vm.name.casefold(), vm.name, vm.source))
    _assign_jobs(vms)
    warnings = list(finder.warnings)
    for vm in vms:
        _check_replica_names(vm)
        warnings.extend(f"{vm.name}: {w}" for w in vm.warnings)
    return Discovery(roots, vms, warnings)


# -- the job file ---------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string. ValueError for lone surrogates (a file name that is
    not valid UTF-8), which no TOML string can hold."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"{text!r} is not valid Unicode (a lone surrogate)")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def _comment(text: str) -> str:
    return "# " + printable(text)


def _disk_comment(disk: Disk) -> str:
    parts = [p for p in (disk.target, disk.role if disk.role != "disk" else None) if p]
    parts.append(describe_format(disk))
    if disk.virtual_size is not None:
        parts.append(f"{human_size(disk.virtual_size)} virtual")
    return ", ".join(parts)


def _freeze_hooks(vm: VM) -> list[str]:
    """A libvirt VM's freeze and thaw, commented out: they fail (and no point is taken)
    unless the QEMU guest agent runs in the guest, which only its admin knows."""
    agent = (
        "its domain has the agent's channel"
        if vm.guest_agent
        else f"its domain needs a channel {GUEST_AGENT_CHANNEL} first"
    )
    return [
        f"# With the QEMU guest agent running in the VM ({agent}),",
        "# freeze its file systems around each scan (docs/OPERATIONS.md, 'Scan capture",
        "# and its quiesce hooks'):",
        f"# pre_hook = {toml_string('virsh domfsfreeze ' + shlex.quote(vm.name))}",
        f"# post_hook = {toml_string('virsh domfsthaw ' + shlex.quote(vm.name))}",
    ]


def render_job_file(discovery: Discovery, *, header: Iterable[str] = ()) -> str:
    """The jobs as a TOML job file (schema: docs/DISCOVERY.md)."""
    lines = [_comment(line) if line else "#" for line in header]
    lines += [
        "# One [jobs.NAME] table per VM. NAME is the job: the replica folder DIR/NAME on the",
        "# receiver. Keys are `replicator send` options (dashes as underscores): `volumes`",
        "# are the disk images and `files` the configuration files, both replicated. Set",
        "# `to` (the receiver, HOST:PORT) and `tls_dir` or `insecure` before using a job.",
        "# Schema: docs/DISCOVERY.md.",
    ]
    for vm in discovery.vms:
        lines += ["", f"[jobs.{toml_key(vm.job)}]"]
        lines.append(_comment(f"{vm.kind.value} VM {vm.name!r}, from {vm.source}"))
        lines += [
            '# to = "HOST:PORT"',
            '# tls_dir = "/etc/replicator/tls"',
            'capture = "scan"',
        ]
        if vm.kind is VMKind.LIBVIRT:
            lines += _freeze_hooks(vm)
        for key, items in (
            ("volumes", [(d.path, _disk_comment(d)) for d in vm.disks if d.included]),
            ("files", [(f.path, f.role) for f in vm.files if f.included]),
        ):
            if not items:
                lines.append(f"{key} = []")
                continue
            lines.append(f"{key} = [")
            lines += [f"    {toml_string(path)},  {_comment(note)}" for path, note in items]
            lines.append("]")
        left_out = [
            (item.path, item.problem or "; ".join(item.notes), item.named_by)
            for item in vm.disks
            if not item.included
        ]
        left_out += [
            (f.path, f.problem or "left out", f.named_by) for f in vm.files if not f.included
        ]
        if left_out:
            lines.append("# not included:")
            lines += [
                _comment(f"  {path}: {why}" + (f" (named by {by})" if by else ""))
                for path, why, by in left_out
            ]
    return "\n".join(lines) + "\n"
