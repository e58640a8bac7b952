"""Disk-image formats from their headers: which format a file holds and its virtual size.

Used by ``replicator discover`` to describe a VM's disks. Names are never trusted: a file
is a qcow2 image because its first bytes say so, not because it ends in ``.qcow2``. Every
parser here reads through a ``Reader`` (``read(offset, length)``, short at the end of the
file), so it works the same on an open file and on bytes in memory (the tests feed it
arbitrary bytes). A file is:

* **VHDX** (MS-VHDX) when it starts with ``vhdxfile``. Its headers (4 KiB at 64 and 128
  KiB, signature ``head``, CRC-32C) say whether a log waits to be replayed; the region table
  (64 KiB at 192 KiB, backup at 256 KiB, signature ``regi``, CRC-32C) locates the metadata
  region, whose table (signature ``metadata``) locates the Virtual Disk Size item (GUID
  2FA54224-CD1B-4876-B211-5DBED83BF4B8: a little-endian u64) and the File Parameters item
  (fixed, dynamic or differencing). All integers little endian.
* **qcow2** when it starts with ``QFI\\xfb``: the virtual size is the big-endian u64 at 24;
  the backing file name (offset at 8, length at 16) and the header extensions (backing
  format, external data file) are read too, since those files belong to the VM as well.
* **VMDK** (monolithic sparse / stream optimized) when it starts with ``KDMV``: capacity in
  sectors, little-endian u64 at 12.
* **VDI** when the u32 at 0x40 is 0xBEDA107F: the disk size is the u64 at 0x170.
* **VHD** when the last 512 bytes are a footer with the cookie ``conectix`` (or, for a
  dynamic or differencing disk whose tail is damaged, the footer's copy in the first 512
  bytes): the virtual size is the footer's *current size* (big-endian u64 at 48), the disk
  type (at 60) says fixed (2), dynamic (3) or differencing (4). QEMU computes the size from
  the CHS geometry for images made by Virtual PC; for its own and for Hyper-V's images that
  is the same figure.
* **raw** otherwise: the virtual size is the file size.

A header that names a format but is broken raises ``ImageHeaderError`` with the reason;
nothing else escapes the parsers, whatever the bytes.
"""

from __future__ import annotations

import os
import stat
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

Reader = Callable[[int, int], bytes]
"""``read(offset, length)``: up to ``length`` bytes at ``offset`` (fewer at the end)."""

SECTOR = 512
KIB = 1024
MIB = 1024 * KIB

VHDX_SIGNATURE = b"vhdxfile"
QCOW2_MAGIC = b"QFI\xfb"
VMDK_MAGIC = b"KDMV"
VDI_SIGNATURE = 0xBEDA107F
VHD_COOKIE = b"conectix"
VHD_DYNAMIC_COOKIE = b"cxsparse"

# VHDX (MS-VHDX 2.2, 2.6): GUIDs are stored in their little-endian binary form.
_VHDX_HEADER_OFFSETS = (64 * KIB, 128 * KIB)
_VHDX_HEADER_SIZE = 4 * KIB
_VHDX_REGION_OFFSETS = (192 * KIB, 256 * KIB)
_VHDX_TABLE_SIZE = 64 * KIB
_VHDX_MAX_ENTRIES = 2047
_VHDX_METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
_VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
_VHDX_VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
_VHDX_MAX_SIZE = 64 * (1 << 40)  # 64 TiB, the format's limit

# qcow2 header extensions
_QCOW2_EXT_END = 0
_QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
_QCOW2_EXT_DATA_FILE = 0x44415441
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_MAX_NAME = 1023  # QEMU's limit for a backing file name

_VHD_TYPES = {2: "fixed", 3: "dynamic", 4: "differencing"}


class DiskFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"
    VHD = "vhd"
    VHDX = "vhdx"
    VMDK = "vmdk"
    VDI = "vdi"


class ImageHeaderError(ValueError):
    """The file starts (or ends) like an image of ``format`` but its header is broken."""

    def __init__(self, format: DiskFormat, reason: str) -> None:
        self.format = format
        self.reason = reason
        super().__init__(f"{format.value} header: {reason}")


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What a header says. ``subformat`` is fixed/dynamic/differencing where the format has
    them; ``backing_file`` and ``data_file`` are names as written in a qcow2 header
    (relative to the image's folder unless absolute); ``parent`` is a differencing VHD's
    parent name; ``notes`` are things worth telling (a bad checksum, a log to replay)."""

    format: DiskFormat
    virtual_size: int
    subformat: str | None = None
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    parent: str | None = None
    notes: tuple[str, ...] = ()


def read_header(read: Reader, size: int) -> ImageHeader:
    """The format and virtual size of the image whose bytes ``read`` returns.

    ``size`` is the file's size. Raises ImageHeaderError for a recognised but broken
    header; anything unrecognised is raw.
    """
    head = read(0, SECTOR)
    if head.startswith(VHDX_SIGNATURE):
        return _vhdx(read)
    if head.startswith(QCOW2_MAGIC):
        return _qcow2(read, size)
    if head.startswith(VMDK_MAGIC):
        return _vmdk(head)
    if len(head) >= 0x48 and struct.unpack_from("<I", head, 0x40)[0] == VDI_SIGNATURE:
        return _vdi(read)
    if size >= SECTOR:
        tail = read(size - SECTOR, SECTOR)
        if tail.startswith(VHD_COOKIE) and len(tail) == SECTOR:
            return _vhd(read, tail, copy=False)
    if head.startswith(VHD_COOKIE) and len(head) == SECTOR:
        return _vhd(read, head, copy=True)
    return ImageHeader(DiskFormat.RAW, max(size, 0))


def read_header_bytes(data: bytes) -> ImageHeader:
    """``read_header`` over bytes in memory."""
    view = memoryview(data)

    def read(offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0:
            return b""
        return bytes(view[offset : offset + length])

    return read_header(read, len(data))


def read_header_file(path: str | os.PathLike[str]) -> tuple[ImageHeader, os.stat_result]:
    """``read_header`` of a regular file (symlinks followed), with its ``stat``.

    Raises OSError when the file cannot be opened or is not a regular file (ENODEV then,
    so a FIFO or a device is never read), ImageHeaderError for a broken header.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(19, "not a regular file", os.fspath(path))  # ENODEV

        def read(offset: int, length: int) -> bytes:
            if offset < 0 or length <= 0 or offset >= st.st_size:
                return b""
            return os.pread(fd, length, offset)

        return read_header(read, st.st_size), st
    finally:
        os.close(fd)


# -- VHD --------------------------------------------------------------------------------

# cookie, features, version, data offset, timestamp, creator app, creator version,
# creator OS, original size, current size, geometry, disk type, checksum
_VHD_FOOTER = struct.Struct(">8sIIQI4sI4sQQIII")
_VHD_CHECKSUM_AT = 64


def vhd_checksum(footer: bytes) -> int:
    """The one's complement of the byte sum, the checksum field counted as zero."""
    total = sum(footer[:_VHD_CHECKSUM_AT]) + sum(footer[_VHD_CHECKSUM_AT + 4 : SECTOR])
    return ~total & 0xFFFFFFFF


def _vhd(read: Reader, footer: bytes, *, copy: bool) -> ImageHeader:
    fields = _VHD_FOOTER.unpack_from(footer)
    data_offset, current_size, disk_type, checksum = fields[3], fields[9], fields[11], fields[12]
    subformat = _VHD_TYPES.get(disk_type)
    if subformat is None:
        raise ImageHeaderError(DiskFormat.VHD, f"unknown disk type {disk_type} in the footer")
    notes: list[str] = []
    if copy:
        if subformat == "fixed":
            raise ImageHeaderError(
                DiskFormat.VHD, "a fixed disk's footer is missing at the end of the file"
            )
        notes.append("the footer at the end of the file is missing; its copy at offset 0 used")
    if vhd_checksum(footer) != checksum:
        notes.append("the footer checksum does not match")
    parent = None
    if subformat != "fixed":
        dyn = read(data_offset, 1024) if 0 < data_offset < 1 << 62 else b""
        if len(dyn) < 1024 or not dyn.startswith(VHD_DYNAMIC_COOKIE):
            raise ImageHeaderError(
                DiskFormat.VHD, f"the dynamic disk header is missing at offset {data_offset}"
            )
        if subformat == "differencing":
            raw_name = dyn[64 : 64 + 512].decode("utf-16-be", "replace")
            parent = raw_name.split("\0", 1)[0] or None
            notes.append(
                "differencing disk: its parent "
                + (repr(parent) if parent else "(unnamed)")
                + " must be replicated too"
            )
    return ImageHeader(
        DiskFormat.VHD, current_size, subformat=subformat, parent=parent, notes=tuple(notes)
    )


# -- qcow2 ------------------------------------------------------------------------------

# magic, version, backing file offset, backing file size, cluster bits, size
_QCOW2 = struct.Struct(">4sIQIIQ")


def _qcow2(read: Reader, size: int) -> ImageHeader:
    head = read(0, 104)
    if len(head) < 72:
        raise ImageHeaderError(DiskFormat.QCOW2, "truncated header")
    _, version, backing_offset, backing_size, cluster_bits, virtual = _QCOW2.unpack_from(head)
    if version not in (2, 3):
        raise ImageHeaderError(DiskFormat.QCOW2, f"unsupported version {version}")
    if not 9 <= cluster_bits <= 21:
        raise ImageHeaderError(DiskFormat.QCOW2, f"invalid cluster bits {cluster_bits}")
    cluster = 1 << cluster_bits
    header_length, incompatible = 72, 0
    if version == 3:
        if len(head) < 104:
            raise ImageHeaderError(DiskFormat.QCOW2, "truncated version 3 header")
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        (header_length,) = struct.unpack_from(">I", head, 100)
        if not 104 <= header_length <= cluster or header_length % 8:
            raise ImageHeaderError(DiskFormat.QCOW2, f"invalid header length {header_length}")
    backing = None
    if backing_offset:
        if not 0 < backing_size <= _QCOW2_MAX_NAME or backing_offset + backing_size > cluster:
            raise ImageHeaderError(
                DiskFormat.QCOW2,
                f"backing file name at {backing_offset} ({backing_size} bytes) is out of bounds",
            )
        backing = _qcow2_name(read(backing_offset, backing_size), backing_size, "backing file")
    backing_format, data_file = _qcow2_extensions(read, header_length, cluster)
    notes: list[str] = []
    if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
        if data_file is None:
            notes.append("keeps its data in an external data file that the header does not name")
    else:
        data_file = None  # a name without the feature bit is ignored by QEMU too
    return ImageHeader(
        DiskFormat.QCOW2,
        virtual,
        backing_file=backing,
        backing_format=backing_format,
        data_file=data_file,
        notes=tuple(notes),
    )


def _qcow2_name(raw: bytes, length: int, what: str) -> str:
    if len(raw) != length:
        raise ImageHeaderError(DiskFormat.QCOW2, f"the {what} name runs past the end of the file")
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise ImageHeaderError(DiskFormat.QCOW2, f"the {what} name is not UTF-8") from None
    if "\0" in name:
        raise ImageHeaderError(DiskFormat.QCOW2, f"the {what} name contains a NUL byte")
    return name


def _qcow2_extensions(read: Reader, start: int, cluster: int) -> tuple[str | None, str | None]:
    """The backing format and data file names from the header extensions, if any."""
    area = read(start, cluster - start)
    backing_format = data_file = None
    pos = 0
    while pos + 8 <= len(area):
        kind, length = struct.unpack_from(">II", area, pos)
        if kind == _QCOW2_EXT_END:
            break
        end = pos + 8 + length
        if end > len(area):
            raise ImageHeaderError(DiskFormat.QCOW2, "a header extension runs past its cluster")
        if kind == _QCOW2_EXT_BACKING_FORMAT:
            backing_format = _qcow2_name(area[pos + 8 : end], length, "backing format")
        elif kind == _QCOW2_EXT_DATA_FILE:
            data_file = _qcow2_name(area[pos + 8 : end], length, "data file")
        pos = (end + 7) // 8 * 8
    return backing_format, data_file


# -- VMDK, VDI --------------------------------------------------------------------------


def _vmdk(head: bytes) -> ImageHeader:
    if len(head) < 20:
        raise ImageHeaderError(DiskFormat.VMDK, "truncated sparse extent header")
    (capacity,) = struct.unpack_from("<Q", head, 12)
    if capacity > (1 << 64) // SECTOR - 1:
        raise ImageHeaderError(DiskFormat.VMDK, f"implausible capacity {capacity} sectors")
    return ImageHeader(DiskFormat.VMDK, capacity * SECTOR, subformat="sparse")


def _vdi(read: Reader) -> ImageHeader:
    head = read(0, 0x178)
    if len(head) < 0x178:
        raise ImageHeaderError(DiskFormat.VDI, "truncated header")
    (version,) = struct.unpack_from("<I", head, 0x44)
    if version >> 16 != 1:
        raise ImageHeaderError(DiskFormat.VDI, f"unsupported version {version >> 16}")
    (disk_size,) = struct.unpack_from("<Q", head, 0x170)
    return ImageHeader(DiskFormat.VDI, disk_size)


# -- VHDX -------------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as VHDX checksums its headers and tables."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _vhdx_checked(block: bytes, signature: bytes, size: int) -> bool:
    """``block`` is ``size`` bytes starting with ``signature`` and its CRC-32C (at 4) holds."""
    if len(block) != size or not block.startswith(signature):
        return False
    stored: int = struct.unpack_from("<I", block, 4)[0]
    return crc32c(block[:4] + b"\0\0\0\0" + block[8:]) == stored


def _vhdx(read: Reader) -> ImageHeader:
    notes: list[str] = []
    headers = [read(offset, _VHDX_HEADER_SIZE) for offset in _VHDX_HEADER_OFFSETS]
    valid = [h for h in headers if _vhdx_checked(h, b"head", _VHDX_HEADER_SIZE)]
    if not valid:
        raise ImageHeaderError(DiskFormat.VHDX, "neither header is valid (signature, checksum)")
    current = max(valid, key=lambda h: struct.unpack_from("<Q", h, 8)[0])
    if current[48:64] != bytes(16):
        notes.append(
            "its log has not been replayed (the VM runs, or crashed): the size may change "
            "once the image is opened for writing"
        )
    if len(valid) < len(headers):
        notes.append("one of its two headers is damaged")
    tables = [read(offset, _VHDX_TABLE_SIZE) for offset in _VHDX_REGION_OFFSETS]
    regions = next((t for t in tables if _vhdx_checked(t, b"regi", _VHDX_TABLE_SIZE)), None)
    if regions is None:
        raise ImageHeaderError(
            DiskFormat.VHDX, "neither region table is valid (signature, checksum)"
        )
    (count,) = struct.unpack_from("<I", regions, 8)
    if count > _VHDX_MAX_ENTRIES:
        raise ImageHeaderError(DiskFormat.VHDX, f"the region table claims {count} entries")
    metadata_at = metadata_length = None
    for i in range(count):
        guid, offset, length, _ = struct.unpack_from("<16sQII", regions, 16 + 32 * i)
        if guid == _VHDX_METADATA_REGION:
            metadata_at, metadata_length = offset, length
            break
    if metadata_at is None or metadata_length is None:
        raise ImageHeaderError(DiskFormat.VHDX, "the region table has no metadata region")
    if metadata_at < MIB or metadata_length < _VHDX_TABLE_SIZE:
        raise ImageHeaderError(
            DiskFormat.VHDX,
            f"implausible metadata region at {metadata_at} ({metadata_length} bytes)",
        )
    table = read(metadata_at, _VHDX_TABLE_SIZE)
    if len(table) != _VHDX_TABLE_SIZE or not table.startswith(b"metadata"):
        raise ImageHeaderError(
            DiskFormat.VHDX, f"no metadata table at offset {metadata_at} (signature)"
        )
    (entries,) = struct.unpack_from("<H", table, 10)
    if entries > _VHDX_MAX_ENTRIES:
        raise ImageHeaderError(DiskFormat.VHDX, f"the metadata table claims {entries} entries")
    items: dict[bytes, bytes] = {}
    for i in range(entries):
        guid, offset, length, _ = struct.unpack_from("<16sIII", table, 32 + 32 * i)
        if guid in (_VHDX_VIRTUAL_DISK_SIZE, _VHDX_FILE_PARAMETERS) and guid not in items:
            if offset < _VHDX_TABLE_SIZE or offset + length > metadata_length or length < 8:
                raise ImageHeaderError(
                    DiskFormat.VHDX,
                    f"metadata item {uuid.UUID(bytes_le=guid)} is out of bounds",
                )
            items[guid] = read(metadata_at + offset, 8)
    size_item = items.get(_VHDX_VIRTUAL_DISK_SIZE)
    if size_item is None or len(size_item) != 8:
        raise ImageHeaderError(DiskFormat.VHDX, "the metadata has no virtual disk size")
    (virtual,) = struct.unpack("<Q", size_item)
    if virtual > _VHDX_MAX_SIZE:
        raise ImageHeaderError(DiskFormat.VHDX, f"implausible virtual disk size {virtual}")
    subformat = None
    params = items.get(_VHDX_FILE_PARAMETERS)
    if params is not None and len(params) == 8:
        (flags,) = struct.unpack_from("<I", params, 4)
        subformat = "differencing" if flags & 2 else "fixed" if flags & 1 else "dynamic"
        if flags & 2:
            notes.append("differencing disk: its parent must be replicated too")
    return ImageHeader(DiskFormat.VHDX, virtual, subformat=subformat, notes=tuple(notes))
