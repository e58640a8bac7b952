"""Discovery in process: the image header parsers (against qemu-img, and arbitrary bytes),
safe XML, job names, TOML quoting, and the walk over libvirt, Hyper-V and loose images."""

from __future__ import annotations

import json
import os
import re
import shlex
import struct
import subprocess
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.engine.discover import (
    VMKind,
    XMLRefused,
    discover,
    job_name_for,
    parse_xml,
    render_job_file,
    toml_string,
)
from replicator.engine.errors import ConfigError
from replicator.engine.image_formats import (
    DiskFormat,
    ImageHeader,
    ImageHeaderError,
    crc32c,
    read_header_bytes,
    read_header_file,
    vhd_checksum,
)
from replicator.engine.names import check_job_name, printable
from tests.tools import qemu_img

MIB = 1 << 20


def _qemu_info(path: Path, fmt: str | None = None) -> dict[str, object]:
    args = ["info", "--output=json", *(["-f", fmt] if fmt else []), str(path)]
    info: dict[str, object] = json.loads(qemu_img(*args))
    return info


def _domain(
    name: str, disks: list[tuple[str, str]], *, extra: str = "", cdrom: str | None = None
) -> str:
    """A libvirt domain XML with file disks (source path, driver type)."""
    devices = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file='{src}'/><target dev='vd{chr(97 + i)}' bus='virtio'/></disk>"
        for i, (src, fmt) in enumerate(disks)
    )
    if cdrom is not None:
        devices += (
            f"<disk type='file' device='cdrom'><source file='{cdrom}'/><target dev='sda'/></disk>"
        )
    return (
        f"<domain type='kvm'><name>{name}</name><memory unit='KiB'>1024</memory>"
        f"<os><type arch='x86_64'>hvm</type></os><devices>{devices}{extra}</devices></domain>"
    )


# -- header parsers against qemu-img ------------------------------------------------------


@pytest.mark.tools
@pytest.mark.parametrize(
    ("fmt", "options", "size", "expected", "subformat", "info_fmt"),
    [
        ("qcow2", [], "1G", DiskFormat.QCOW2, None, None),
        ("qcow2", ["-o", "compat=0.10"], "3M", DiskFormat.QCOW2, None, None),
        ("vpc", [], "64M", DiskFormat.VHD, "dynamic", None),
        ("vpc", ["-o", "subformat=fixed"], "10M", DiskFormat.VHD, "fixed", "vpc"),
        ("vhdx", [], "100M", DiskFormat.VHDX, "dynamic", None),
        ("vhdx", ["-o", "subformat=fixed"], "8M", DiskFormat.VHDX, "fixed", None),
        ("vhdx", ["-o", "block_size=1M"], "3G", DiskFormat.VHDX, "dynamic", None),
        ("vmdk", [], "30M", DiskFormat.VMDK, "sparse", None),
        ("vdi", [], "40M", DiskFormat.VDI, None, None),
        ("raw", [], "5M", DiskFormat.RAW, None, None),
    ],
)
def test_headers_agree_with_qemu_img(
    tmp_path: Path,
    fmt: str,
    options: list[str],
    size: str,
    expected: DiskFormat,
    subformat: str | None,
    info_fmt: str | None,
) -> None:
    # the file name says nothing: formats come from the bytes
    image = tmp_path / "disk.bin"
    qemu_img("create", "-q", "-f", fmt, *options, str(image), size)
    header, st = read_header_file(image)
    assert header.format is expected
    assert header.subformat == subformat
    assert header.virtual_size == _qemu_info(image, info_fmt)["virtual-size"]
    assert st.st_size == image.stat().st_size
    assert header.notes == ()


@pytest.mark.tools
def test_qcow2_backing_file_and_data_file_are_read(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "8M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        str(tmp_path / "over.qcow2"),
    )  # fmt: skip
    over, _ = read_header_file(tmp_path / "over.qcow2")
    assert (over.backing_file, over.backing_format, over.virtual_size) == (
        "base.qcow2",
        "qcow2",
        8 * MIB,
    )
    # qemu-img makes a relative data file relative to its working folder
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=ext.raw", "ext.qcow2", "4M"],
        cwd=tmp_path,
        check=True,
        timeout=60,
    )
    assert (tmp_path / "ext.raw").exists()
    ext, _ = read_header_file(tmp_path / "ext.qcow2")
    assert ext.data_file == "ext.raw" and ext.backing_file is None


def _vhd_footer(current_size: int, disk_type: int, data_offset: int = 0xFFFFFFFFFFFFFFFF) -> bytes:
    footer = bytearray(512)
    footer[:8] = b"conectix"
    struct.pack_into(">IIQ", footer, 8, 2, 0x00010000, data_offset)
    struct.pack_into(">QQ", footer, 40, current_size, current_size)
    struct.pack_into(">I", footer, 60, disk_type)
    struct.pack_into(">I", footer, 64, vhd_checksum(bytes(footer)))
    return bytes(footer)


def test_fixed_vhd_footer_is_read_from_the_end() -> None:
    data = bytes(4096) + _vhd_footer(4096, 2)
    assert read_header_bytes(data) == ImageHeader(DiskFormat.VHD, 4096, subformat="fixed")


def test_vhd_footer_with_a_bad_checksum_is_used_with_a_note() -> None:
    footer = bytearray(_vhd_footer(4096, 2))
    footer[100] ^= 0xFF
    header = read_header_bytes(bytes(4096) + bytes(footer))
    assert header.virtual_size == 4096
    assert header.notes == ("the footer checksum does not match",)


def test_dynamic_vhd_whose_tail_is_damaged_uses_the_copy_at_offset_0() -> None:
    dynamic = bytearray(1024)
    dynamic[:8] = b"cxsparse"
    data = _vhd_footer(64 * MIB, 3, data_offset=512) + bytes(dynamic) + bytes(1024)
    header = read_header_bytes(data)
    assert (header.format, header.subformat, header.virtual_size) == (
        DiskFormat.VHD,
        "dynamic",
        64 * MIB,
    )
    assert any("copy at offset 0" in note for note in header.notes)


def test_differencing_vhd_names_its_parent() -> None:
    dynamic = bytearray(1024)
    dynamic[:8] = b"cxsparse"
    name = "base disk.vhd".encode("utf-16-be")
    dynamic[64 : 64 + len(name)] = name
    data = _vhd_footer(MIB, 4, data_offset=512) + bytes(dynamic) + _vhd_footer(MIB, 4, 512)
    header = read_header_bytes(data)
    assert (header.subformat, header.parent) == ("differencing", "base disk.vhd")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_vhd_footer(4096, 2) + bytes(1024), "fixed disk's footer is missing"),
        (bytes(512) + _vhd_footer(4096, 9), "unknown disk type 9"),
        (_vhd_footer(MIB, 3, data_offset=512) + bytes(2048), "dynamic disk header is missing"),
        (b"QFI\xfb" + bytes(20), "truncated header"),
        (b"QFI\xfb\0\0\0\x07" + bytes(100), "unsupported version 7"),
        (b"vhdxfile" + bytes(1000), "neither header is valid"),
        (b"KDMV" + bytes(10), "truncated sparse extent header"),
        (bytes(0x40) + struct.pack("<II", 0xBEDA107F, 0x00020000) + bytes(0x200), "version 2"),
    ],
)
def test_broken_headers_say_why(data: bytes, reason: str) -> None:
    with pytest.raises(ImageHeaderError, match=reason):
        read_header_bytes(data)


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value


@pytest.fixture(scope="module")
def vhdx_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("vhdx") / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(path), "100M")
    return path.read_bytes()[: 4 * MIB]  # headers, region tables, metadata


@pytest.mark.tools
def test_vhdx_falls_back_to_the_second_region_table(vhdx_bytes: bytes) -> None:
    data = bytearray(vhdx_bytes)
    data[192 * 1024 + 40] ^= 0x01  # the first region table's checksum no longer holds
    assert read_header_bytes(bytes(data)).virtual_size == 100 * MIB
    data[256 * 1024 + 40] ^= 0x01
    with pytest.raises(ImageHeaderError, match="neither region table is valid"):
        read_header_bytes(bytes(data))


@pytest.mark.tools
def test_vhdx_with_a_log_to_replay_says_so(vhdx_bytes: bytes) -> None:
    data = bytearray(vhdx_bytes)
    for at in (64 * 1024, 128 * 1024):
        data[at + 48 : at + 64] = b"\x01" * 16
        data[at + 4 : at + 8] = bytes(4)
        crc = crc32c(bytes(data[at : at + 4096]))
        data[at + 4 : at + 8] = struct.pack("<I", crc)
    header = read_header_bytes(bytes(data))
    assert any("log has not been replayed" in note for note in header.notes)


# -- arbitrary bytes ----------------------------------------------------------------------

MAGICS = [b"", b"vhdxfile", b"QFI\xfb", b"KDMV", b"conectix", b"QFI\xfb\0\0\0\x03"]


def _never_crashes(data: bytes) -> None:
    try:
        header = read_header_bytes(data)
    except ImageHeaderError as exc:
        assert exc.reason and isinstance(exc.format, DiskFormat)
        return
    assert isinstance(header.format, DiskFormat)
    assert header.virtual_size >= 0
    if header.format is DiskFormat.RAW:
        assert header.virtual_size == len(data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(MAGICS), st.binary(max_size=4096), st.sampled_from([b"", b"conectix"]))
def test_arbitrary_bytes_are_raw_or_a_clear_error(magic: bytes, body: bytes, tail: bytes) -> None:
    data = magic + body
    if tail and len(data) >= 512:
        data = data[:-512] + tail + data[len(data) - 504 :]
    _never_crashes(data)


@pytest.mark.tools
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.integers(0, 4 * MIB - 1), st.integers(0, 255)), max_size=8))
def test_damaged_vhdx_is_a_size_or_a_clear_error(
    vhdx_bytes: bytes, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(vhdx_bytes)
    for at, value in flips:
        data[at] = value
    _never_crashes(bytes(data))


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, ...]:
    """A qcow2 overlay with a backing file and a data file, and a dynamic VHD."""
    folder = tmp_path_factory.mktemp("small")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"data_file={folder / 'd.raw'}",
        "-b", "/b.qcow2", "-F", "qcow2", "-u", str(folder / "x.qcow2"), "16M",
    )  # fmt: skip
    qemu_img("create", "-q", "-f", "vpc", str(folder / "x.vhd"), "16M")
    return (folder / "x.qcow2").read_bytes(), (folder / "x.vhd").read_bytes()


@pytest.mark.tools
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), max_size=6))
def test_damaged_qcow2_and_vhd_headers_never_crash(
    small_images: tuple[bytes, ...], flips: list[tuple[int, int]]
) -> None:
    for data in small_images:
        damaged = bytearray(data)
        for at, value in flips:
            damaged[at] = value
            damaged[-512 + at % 512] = value
        _never_crashes(bytes(damaged))


def test_small_images_parse_undamaged(small_images: tuple[bytes, ...]) -> None:
    qcow2, vhd = (read_header_bytes(data) for data in small_images)
    assert (qcow2.backing_file, qcow2.virtual_size) == ("/b.qcow2", 16 * MIB)
    assert qcow2.data_file is not None and qcow2.data_file.endswith("/small0/d.raw")
    assert (vhd.format, vhd.subformat) == (DiskFormat.VHD, "dynamic")


# -- XML ------------------------------------------------------------------------------------


UTF16_DTD = (
    '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE d [<!ENTITY a "x">]><domain>&a;</domain>'
).encode("utf-16")


@pytest.mark.parametrize(
    "doc",
    [
        b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa">]><domain>&a;</domain>',
        b"<!doctype domain><domain/>",
        b'<!DOCTYPE d SYSTEM "file:///etc/passwd"><domain/>',
        # no DOCTYPE bytes to find: only the expat pass sees it
        UTF16_DTD,
    ],
)
def test_xml_with_a_dtd_is_refused_unread(doc: bytes) -> None:
    with pytest.raises(XMLRefused, match="DOCTYPE or ENTITY"):
        parse_xml(doc)


def test_plain_xml_parses_and_malformed_xml_is_refused() -> None:
    assert parse_xml(b"<domain><name>a &amp; b</name></domain>").findtext("name") == "a & b"
    assert parse_xml("<domain><name>é</name></domain>".encode("utf-16")).findtext("name") == "é"
    with pytest.raises(XMLRefused, match="not well-formed"):
        parse_xml(b"<domain><name>x</domain>")
    with pytest.raises(XMLRefused, match="not well-formed"):
        parse_xml(b"<domain>&undefined;</domain>")


# -- names and TOML -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("web01", "web01"),
        ("web 02", "web-02"),
        ("Café/Prod", "Cafe-Prod"),
        ("..hidden", "hidden"),
        ("a..b", "a.b"),
        ('q"uote\\back', "q-uote-back"),
        ("日本", "vm"),
        ("x" * 80, "x" * 64),
    ],
)
def test_job_names_are_sanitised(name: str, expected: str) -> None:
    assert job_name_for(name, set()) == expected


def test_job_names_are_deduplicated_case_insensitively() -> None:
    taken: set[str] = set()
    names = [job_name_for(n, taken) for n in ("web", "Web", "web", "w" * 64, "w" * 64)]
    assert names == ["web", "Web-2", "web-3", "w" * 64, "w" * 62 + "-2"]


def test_a_vm_named_like_a_receiver_file_gets_a_suffix() -> None:
    """Found by the property below: a VM named ``control.sock`` made discovery fail."""
    taken: set[str] = set()
    names = [job_name_for(n, taken) for n in ("control.sock", "Control.SOCK", "control.sock-2")]
    assert names == ["control.sock-2", "Control.SOCK-3", "control.sock-2-2"]


@given(
    st.lists(
        st.text(max_size=80) | st.sampled_from(["control.sock", "Control.Sock"]),
        min_size=1,
        max_size=8,
    )
)
def test_any_vm_names_give_distinct_valid_job_names(names: list[str]) -> None:
    taken: set[str] = set()
    jobs = [job_name_for(name, taken) for name in names]
    assert all(check_job_name(job) == job for job in jobs)
    assert len({job.casefold() for job in jobs}) == len(jobs)


_UNICODE = st.text(st.characters(blacklist_categories=["Cs"]), max_size=60)


@given(_UNICODE)
def test_toml_strings_round_trip(text: str) -> None:
    assert tomllib.loads(f"k = {toml_string(text)}")["k"] == text


def test_toml_string_refuses_lone_surrogates() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        toml_string("bad\udcff")


@given(_UNICODE)
def test_printable_text_is_a_valid_toml_comment(text: str) -> None:
    assert "\n" not in printable(text)
    assert tomllib.loads(f"# {printable(text)}\nk = 1") == {"k": 1}


# -- the walk -------------------------------------------------------------------------------


def _raw(path: Path, size: int = MIB) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _qcow2(path: Path, size: str = "16M", *options: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", *options, str(path), size)
    return path


@pytest.mark.tools
def test_a_libvirt_domain_takes_its_disks_and_reports_the_missing_one(tmp_path: Path) -> None:
    images = tmp_path / "images"
    disk = _qcow2(images / "web01.qcow2")
    data = _raw(images / "data.raw")
    nvram = _raw(tmp_path / "nvram" / "web01_VARS.fd", 128 * 1024)
    xml = tmp_path / "etc" / "web01.xml"
    xml.parent.mkdir()
    xml.write_text(
        _domain(
            "web01",
            [(str(disk), "qcow2"), (str(data), "qcow2"), (str(images / "gone.qcow2"), "qcow2")],
            cdrom=str(_raw(images / "install.iso")),
        ).replace("</os>", f"<nvram>{nvram}</nvram></os>")
    )
    found = discover([tmp_path])
    [vm] = found.vms  # nothing else: every image here belongs to web01
    assert (vm.name, vm.job, vm.kind, vm.source) == ("web01", "web01", VMKind.LIBVIRT, str(xml))
    assert vm.volumes == [str(disk), str(data)]
    assert vm.config_files == [str(xml), str(nvram)]
    by_path = {d.path: d for d in vm.disks}
    gone = by_path[str(images / "gone.qcow2")]
    assert (gone.present, gone.included, gone.problem, gone.named_by) == (
        False,
        False,
        "missing",
        str(xml),
    )
    assert any("gone.qcow2" in w and "missing" in w for w in found.warnings)
    iso = by_path[str(images / "install.iso")]
    assert (iso.role, iso.included, iso.format) == ("cdrom", False, "raw")
    assert by_path[str(data)].notes == ["the XML says format 'qcow2', the header says raw"]
    assert (by_path[str(disk)].target, by_path[str(disk)].virtual_size) == ("vda", 16 * MIB)


@pytest.mark.tools
def test_backing_chains_are_followed_and_loose_images_grouped(tmp_path: Path) -> None:
    base = _qcow2(tmp_path / "base.qcow2")
    mid = _qcow2(tmp_path / "sub" / "mid.qcow2", "16M", "-b", str(base), "-F", "qcow2")
    top = _qcow2(tmp_path / "top.qcow2", "16M", "-b", "sub/mid.qcow2", "-F", "qcow2")
    lonely = _raw(tmp_path / "lonely.img")
    _raw(tmp_path / "notes.txt", 4096)  # neither an image header nor an image name
    found = discover([tmp_path])
    assert [(vm.name, vm.volumes) for vm in found.vms] == [
        ("lonely", [str(lonely)]),
        ("top", [str(top), str(mid), str(base)]),
    ]
    roles = [d.role for d in found.vms[1].disks]
    assert roles == ["disk", "backing file", "backing file"]
    assert found.vms[1].disks[0].backing == str(mid)


@pytest.mark.tools
def test_a_hyperv_folder_is_one_vm(tmp_path: Path) -> None:
    folder = tmp_path / "Hyper-V" / "SQL Server"
    vhdx = folder / "Virtual Hard Disks" / "sql.vhdx"
    vhdx.parent.mkdir(parents=True)
    qemu_img("create", "-q", "-f", "vhdx", str(vhdx), "64M")
    (folder / "Virtual Hard Disks" / "desktop.ini").write_text("x" * 1000)
    config = folder / "Virtual Machines" / "0F1E-77.vmcx"
    config.parent.mkdir()
    config.write_bytes(os.urandom(2048))
    runtime = config.with_suffix(".vmrs")
    runtime.write_bytes(bytes(4096))
    found = discover([tmp_path])
    [vm] = found.vms
    assert (vm.name, vm.job, vm.kind) == ("SQL Server", "SQL-Server", VMKind.HYPERV)
    assert vm.volumes == [str(vhdx)]
    assert vm.config_files == [str(config), str(runtime)]
    assert vm.disks[0].format == "vhdx" and vm.disks[0].virtual_size == 64 * MIB
    assert found.warnings == []


def test_a_hyperv_xml_configuration_names_the_vm(tmp_path: Path) -> None:
    vms = tmp_path / "vm1" / "Virtual Machines"
    vms.mkdir(parents=True)
    (vms / "ABC.xml").write_text(
        '<?xml version="1.0" encoding="UTF-16"?>'
        '<configuration><properties><name type="string">Exchange 2013</name></properties>'
        "</configuration>",
        encoding="utf-16",
    )
    _raw(tmp_path / "vm1" / "Virtual Hard Disks" / "disk.vhd")
    found = discover([tmp_path])
    [vm] = found.vms
    assert (vm.name, vm.job) == ("Exchange 2013", "Exchange-2013")
    assert vm.disks[0].notes == ["named *.vhd, but its header says raw"]


def test_symlinked_folders_are_not_followed_and_symlinked_disks_are_resolved(
    tmp_path: Path,
) -> None:
    real = _raw(tmp_path / "store" / "real-disk.raw")
    vm_dir = tmp_path / "vms"
    vm_dir.mkdir()
    (vm_dir / "loop").symlink_to(tmp_path)  # would walk forever if followed
    (vm_dir / "disk.img").symlink_to(real)
    xml = vm_dir / "a.xml"
    xml.write_text(_domain("a", [(str(vm_dir / "disk.img"), "raw")]))
    found = discover([vm_dir])
    [vm] = found.vms
    [disk] = vm.disks
    assert (disk.path, disk.resolved) == (str(vm_dir / "disk.img"), str(real))
    assert any("not following symlinked folder" in w for w in found.warnings)
    # the same image reached through a link and directly is one loose image, not two
    found = discover([tmp_path / "store", vm_dir / "disk.img"])
    assert [vm.volumes for vm in found.vms] == [[str(real)]]


def test_domain_xml_edge_cases(tmp_path: Path) -> None:
    _raw(tmp_path / "rel.img")
    (tmp_path / "a.xml").write_text(
        _domain(
            "a",
            [("rel.img", "raw")],
            extra="<disk type='block' device='disk'><source dev='/dev/sdz'/>"
            "<target dev='vdz'/></disk>"
            "<disk type='network' device='disk'><source protocol='rbd' name='pool/x'/>"
            "<target dev='vdy'/></disk>"
            "<disk type='file' device='cdrom'><target dev='sdc'/></disk>",
        )
    )
    (tmp_path / "b.xml").write_text("<network><name>default</name></network>")
    (tmp_path / "c.xml").write_text("<domain><devices/></domain>")
    found = discover([tmp_path])
    assert [(vm.name, vm.job) for vm in found.vms] == [("a", "a"), ("c", "c")]
    a = found.vms[0]
    assert a.volumes == [str(tmp_path / "rel.img")]
    assert [d.path for d in a.disks if not d.included] == ["/dev/sdz"]
    text = "\n".join(found.warnings)
    assert "by a relative path" in text
    assert "block device /dev/sdz" in text
    assert "'network' disk" in text
    assert "c.xml has no <name>" in text


def test_a_doctype_domain_is_refused_with_a_warning(tmp_path: Path) -> None:
    secret = tmp_path / "secret.img"
    _raw(secret)
    (tmp_path / "evil.xml").write_text(
        '<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY lol "lol">'
        '<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
        f"<domain><name>&lol2;</name><devices><disk type='file'><source file='{secret}'/>"
        "</disk></devices></domain>"
    )
    found = discover([tmp_path / "evil.xml"])
    assert found.vms == []
    assert found.warnings == [
        f"{tmp_path / 'evil.xml'} refused as a libvirt domain: it declares a DOCTYPE or "
        "ENTITY (refused: nothing in it is expanded)"
    ]


def test_shared_disks_and_replica_name_clashes_are_reported(tmp_path: Path) -> None:
    shared = _raw(tmp_path / "shared.img")
    one = _raw(tmp_path / "a" / "disk.img")
    two = _raw(tmp_path / "b" / "disk.img")
    (tmp_path / "x.xml").write_text(_domain("x", [(str(shared), "raw")]))
    (tmp_path / "y.xml").write_text(
        _domain("y", [(str(shared), "raw"), (str(one), "raw"), (str(two), "raw")])
    )
    found = discover([tmp_path])
    x, y = found.vms
    assert x.volumes == [str(shared)] and y.volumes == [str(shared), str(one)]
    assert "taken by" in (y.disks[2].problem or "")
    text = "\n".join(found.warnings)
    assert "belongs to the VMs x, y" in text
    assert "replica name 'disk.img' is taken" in text


def test_paths_that_do_not_exist_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as caught:
        discover([tmp_path, tmp_path / "nope"])
    assert caught.value.exit_code == 3


def test_job_file_round_trips_awkward_names(tmp_path: Path) -> None:
    folder = tmp_path / 'we"ird\\ dir ü'
    disks = [
        _raw(folder / 'a "quoted" disk.img'),
        _raw(folder / "ünïcødé 日本.img"),
    ]
    # names the receiver refuses as replica names (engine/names.py): left out, and said so
    bad = [
        _raw(folder / "tab\there.img"),
        _raw(folder / "new\nline.img"),
        _raw(folder / "back\\slash.img"),
    ]
    sources = [*disks, *bad]
    (folder / "vm.xml").write_text(
        _domain('My "VM" \\ ü', [(str(p), "raw") for p in sources])
        .replace("tab\there", "tab&#9;here")
        .replace("new\nline", "new&#10;line")
    )
    (folder / "db.prod.xml").write_text(_domain("db.prod", []))
    found = discover([folder])
    vm, db = sorted(found.vms, key=lambda vm: vm.job != "My-VM-u")
    assert (vm.name, vm.job, db.job) == ('My "VM" \\ ü', "My-VM-u", "db.prod")
    assert [d.path for d in vm.disks] == [str(p) for p in sources]
    text = render_job_file(found, header=["a header\nwith a newline"])
    jobs = tomllib.loads(text)["jobs"]
    assert jobs["My-VM-u"] == {
        "capture": "scan",
        "volumes": [str(p) for p in disks],
        "files": [str(folder / "vm.xml")],
    }
    assert jobs["db.prod"] == {
        "capture": "scan",
        "volumes": [],
        "files": [str(folder / "db.prod.xml")],
    }
    assert '[jobs."db.prod"]' in text
    for path in bad:
        assert f"#   {printable(str(path))}: path " in text
    assert sum("contains control characters" in w for w in found.warnings) == 2
    assert sum("contains a backslash" in w for w in found.warnings) == 1


def test_a_libvirt_job_suggests_its_freeze_hooks_quoted_for_the_shell(tmp_path: Path) -> None:
    """Commented out (they fail unless the guest agent runs); the channel is noted."""
    agent = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    (tmp_path / "a.xml").write_text(_domain("db prod's", [], extra=agent))
    (tmp_path / "b.xml").write_text(_domain("web01", []))
    found = discover([tmp_path])
    assert {vm.name: vm.guest_agent for vm in found.vms} == {"db prod's": True, "web01": False}
    text = render_job_file(found)
    assert "needs a channel org.qemu.guest_agent.0 first" in text
    uncommented = re.sub(r"(?m)^# ((pre|post)_hook = )", r"\1", text)
    jobs = tomllib.loads(uncommented)["jobs"]
    assert shlex.split(jobs["db-prod-s"]["pre_hook"]) == ["virsh", "domfsfreeze", "db prod's"]
    assert shlex.split(jobs["db-prod-s"]["post_hook"]) == ["virsh", "domfsthaw", "db prod's"]
    assert jobs["web01"]["pre_hook"] == "virsh domfsfreeze web01"
    assert "pre_hook" not in tomllib.loads(text)["jobs"]["web01"]  # off until enabled


def test_a_damaged_image_is_replicated_as_it_is_with_a_warning(tmp_path: Path) -> None:
    broken = tmp_path / "broken.vhdx"
    broken.write_bytes(b"vhdxfile" + bytes(300 * 1024))
    (tmp_path / "gone.img").symlink_to(tmp_path / "nowhere")
    found = discover([tmp_path])
    [vm] = found.vms
    [disk] = vm.disks
    assert (disk.format, disk.included, disk.virtual_size) == ("vhdx", True, None)
    assert disk.problem == "damaged vhdx header: neither header is valid (signature, checksum)"
    assert vm.volumes == [str(broken)]
    assert found.warnings == [
        f"{tmp_path / 'gone.img'} cannot be opened (a dangling symlink?): skipped",
        f"broken: {broken}: damaged vhdx header: neither header is valid (signature, "
        "checksum); replicated as it is",
    ]
