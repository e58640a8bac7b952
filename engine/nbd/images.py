"""Disk-image header probing: which format a file is, and how large it can grow.

An NBD export has a fixed size, but a dynamic VHD or a qcow2 file grows as the guest
writes. The shim therefore exports such a file with headroom: the most the file can
reach, computed here from its header. The figures are upper bounds; exporting a few
clusters too many costs nothing (reads past the real end of the file return zeros),
exporting too few breaks the first allocating write with ENOSPC.

Formats (all header integers big endian):

* VHD (Microsoft Virtual Hard Disk spec): a 512-byte footer "conectix" at the end of
  the file, copied at offset 0 for dynamic and differencing disks. Fixed disks never
  grow. Dynamic disks have a "cxsparse" header and a block allocation table (BAT);
  QEMU appends each new block (sector bitmap + data) where the footer was and writes
  the footer after it, so the file ends at most at
  ``first free offset + unallocated blocks * (bitmap + block) + 512``.
* qcow2: "QFI\\xfb" header; clusters are allocated from the first free cluster, so the
  file can grow by at most every data cluster plus L2 tables plus refcount metadata.
* VHDX: "vhdxfile"; QEMU grows it by truncating the file, which an NBD client cannot
  do, so it is reported and refused by the export.
* VMDK (sparse, "KDMV") and VDI: growable, but their growth is not computed here; the
  caller must give an explicit export size.
* Anything else is raw: the export size is the file size.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass
from enum import StrEnum

from replicator.engine.errors import ConfigError

SECTOR = 512
VHD_COOKIE = b"conectix"
VHD_DYNAMIC_COOKIE = b"cxsparse"
QCOW2_MAGIC = b"QFI\xfb"
VHDX_MAGIC = b"vhdxfile"
VMDK_SPARSE_MAGIC = b"KDMV"
VDI_SIGNATURE = 0xBEDA107F  # little endian at offset 0x40
_VHD_UNALLOCATED = 0xFFFFFFFF
_MAX_BAT_ENTRIES = 1 << 24  # 32 TiB in 2 MiB blocks; more is a broken header

# footer: cookie, features, version, data offset, timestamp, creator app, creator
# version, creator os, original size, current size, geometry, disk type, checksum
_VHD_FOOTER = struct.Struct(">8sIIQI4sI4sQQIII")
# dynamic header: cookie, data offset, table offset, header version, max table
# entries, block size, checksum
_VHD_DYN = struct.Struct(">8sQQIIII")
# qcow2 v2 header fields up to snapshots_offset
_QCOW2 = struct.Struct(">4sIQIIQIIQQIIQ")


class ImageFormat(StrEnum):
    RAW = "raw"
    VHD_FIXED = "vhd-fixed"
    VHD_DYNAMIC = "vhd-dynamic"
    QCOW2 = "qcow2"
    VHDX = "vhdx"
    VMDK = "vmdk"
    VDI = "vdi"


class ImageError(ConfigError):
    """The file's header says it is an image we cannot serve (or it is broken)."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What probing found. ``max_size`` is None when the format's growth is unknown."""

    format: ImageFormat
    file_size: int
    virtual_size: int
    max_size: int | None

    @property
    def growable(self) -> bool:
        return self.format in (
            ImageFormat.VHD_DYNAMIC,
            ImageFormat.QCOW2,
            ImageFormat.VHDX,
            ImageFormat.VMDK,
            ImageFormat.VDI,
        )


def probe_path(path: str | os.PathLike[str]) -> ImageInfo:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return probe_fd(fd, name=os.fspath(path))
    finally:
        os.close(fd)


def probe_fd(fd: int, *, name: str = "<image>") -> ImageInfo:
    """Detect the format of the open file ``fd`` and compute its growth bound."""
    st = os.fstat(fd)
    size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
    head = os.pread(fd, SECTOR, 0)
    if head.startswith(VHDX_MAGIC):
        return ImageInfo(ImageFormat.VHDX, size, size, None)
    if head.startswith(QCOW2_MAGIC):
        return _probe_qcow2(fd, name, size)
    if head.startswith(VMDK_SPARSE_MAGIC):
        return ImageInfo(ImageFormat.VMDK, size, size, None)
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == VDI_SIGNATURE:
        return ImageInfo(ImageFormat.VDI, size, size, None)
    if head.startswith(VHD_COOKIE):
        return _probe_vhd(fd, name, size, head)
    if size >= SECTOR:
        tail = os.pread(fd, SECTOR, size - SECTOR)
        if tail.startswith(VHD_COOKIE):
            return _probe_vhd(fd, name, size, tail)
    return ImageInfo(ImageFormat.RAW, size, size, size)


def _probe_vhd(fd: int, name: str, size: int, footer: bytes) -> ImageInfo:
    if len(footer) < _VHD_FOOTER.size:
        raise ImageError(f"{name}: truncated VHD footer")
    fields = _VHD_FOOTER.unpack_from(footer)
    data_offset, current_size, disk_type = fields[3], fields[9], fields[11]
    if disk_type == 2:
        return ImageInfo(ImageFormat.VHD_FIXED, size, current_size, size)
    if disk_type not in (3, 4):
        raise ImageError(f"{name}: VHD footer has unknown disk type {disk_type}")
    dyn = os.pread(fd, _VHD_DYN.size, data_offset)
    if len(dyn) < _VHD_DYN.size or not dyn.startswith(VHD_DYNAMIC_COOKIE):
        raise ImageError(f"{name}: dynamic VHD header missing at offset {data_offset}")
    _, _, table_offset, _, entries, block_size, _ = _VHD_DYN.unpack(dyn)
    if not 0 < entries <= _MAX_BAT_ENTRIES or block_size < SECTOR or block_size % SECTOR:
        raise ImageError(
            f"{name}: dynamic VHD header is implausible ({entries} BAT entries, "
            f"block size {block_size})"
        )
    bat = os.pread(fd, 4 * entries, table_offset)
    if len(bat) != 4 * entries:
        raise ImageError(f"{name}: VHD block allocation table runs past the end of the file")
    bitmap = _round_up(block_size // SECTOR // 8, SECTOR)
    free = _round_up(table_offset + 4 * entries, SECTOR)
    unallocated = 0
    for (entry,) in struct.iter_unpack(">I", bat):
        if entry == _VHD_UNALLOCATED:
            unallocated += 1
        else:
            free = max(free, entry * SECTOR + bitmap + block_size)
    max_size = max(size, free + unallocated * (bitmap + block_size) + SECTOR)
    return ImageInfo(ImageFormat.VHD_DYNAMIC, size, current_size, max_size)


def _probe_qcow2(fd: int, name: str, size: int) -> ImageInfo:
    head = os.pread(fd, 104, 0)
    if len(head) < _QCOW2.size:
        raise ImageError(f"{name}: truncated qcow2 header")
    (_, version, _, _, cluster_bits, virtual, _, l1_size, _, _, _, _, _) = _QCOW2.unpack_from(head)
    if version not in (2, 3) or not 9 <= cluster_bits <= 21:
        raise ImageError(
            f"{name}: unsupported qcow2 header (version {version}, cluster bits {cluster_bits})"
        )
    refcount_bits, l2_entry = 16, 8
    if version == 3:
        if len(head) < 104:
            raise ImageError(f"{name}: truncated qcow2 v3 header")
        incompatible, _, _, refcount_order = struct.unpack_from(">QQQI", head, 72)
        if incompatible & (1 << 2):
            raise ImageError(
                f"{name}: this qcow2 image keeps its data in an external data file, which "
                "QEMU writes directly, bypassing the NBD export",
                hint="use --capture fuse or --capture scan for this volume",
            )
        if refcount_order > 6:
            raise ImageError(f"{name}: qcow2 refcount order {refcount_order} is invalid")
        refcount_bits = 1 << refcount_order
        if incompatible & (1 << 4):  # extended L2 entries
            l2_entry = 16
    cluster = 1 << cluster_bits
    data = math.ceil(virtual / cluster)
    l2 = math.ceil(data / (cluster // l2_entry))
    l1 = math.ceil(max(l1_size, l2) * 8 / cluster)
    # Clusters the file can gain: every data cluster, every L2 table, a new L1, plus
    # refcount blocks covering the whole file and the refcount table, counted twice
    # because it is reallocated as it grows (the old copy is freed, maybe not reused).
    current = math.ceil(size / cluster)
    fixed = current + data + l2 + l1 + 2
    per_block = cluster * 8 // refcount_bits
    total = fixed
    for _ in range(16):  # refcount metadata also covers itself: iterate to a fixed point
        blocks = math.ceil(total / per_block)
        table = math.ceil(blocks * 8 / cluster)
        grown = fixed + blocks + 2 * table
        if grown == total:
            break
        total = grown
    return ImageInfo(ImageFormat.QCOW2, size, virtual, total * cluster)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def export_size_for(info: ImageInfo, name: str, override: int | None) -> int:
    """The size to advertise for an image, or ImageError saying why it cannot be served."""
    if info.format is ImageFormat.VHDX:
        raise ImageError(
            f"{name}: VHDX images cannot be captured over NBD: QEMU's VHDX driver grows "
            "the file by truncating it, which an NBD client cannot do",
            hint="use --capture fuse or --capture scan for this volume",
        )
    if override is not None:
        if override < info.file_size:
            raise ImageError(
                f"{name}: export size {override} is smaller than the file ({info.file_size} "
                "bytes); the end of the image would be invisible to the client"
            )
        return override
    if info.max_size is None:
        raise ImageError(
            f"{name}: {info.format.value} images grow as the guest writes and this build "
            "cannot compute how far",
            hint="give the export size explicitly (--nbd-size), or use --capture fuse/scan",
        )
    return info.max_size
