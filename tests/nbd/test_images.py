"""Image header probing: format detection and the growth bound of growable images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from replicator.engine.errors import ConfigError
from replicator.engine.nbd.images import (
    ImageError,
    ImageFormat,
    export_size_for,
    probe_path,
)

pytestmark = pytest.mark.tools
MiB = 1024 * 1024


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def fill(path: Path, fmt: str, size: int) -> None:
    """Allocate every block of the image through its own format driver."""
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -P 0x5a 0 {size}", str(path)],
        check=True,
        capture_output=True,
    )


def test_raw_file(tmp_path: Path) -> None:
    p = tmp_path / "disk.img"
    p.write_bytes(b"\x01" * 12345)
    info = probe_path(p)
    assert (info.format, info.file_size, info.max_size) == (ImageFormat.RAW, 12345, 12345)
    assert not info.growable
    assert export_size_for(info, "disk.img", None) == 12345


def test_fixed_vhd_is_exported_at_file_size(tmp_path: Path) -> None:
    p = tmp_path / "fixed.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(p), "8M")
    info = probe_path(p)
    assert info.format is ImageFormat.VHD_FIXED
    assert info.max_size == info.file_size == p.stat().st_size


@pytest.mark.parametrize("size", [8 * MiB, 33 * MiB + 512 * 1024])
def test_dynamic_vhd_bound_holds_when_fully_allocated(tmp_path: Path, size: int) -> None:
    p = tmp_path / "dyn.vhd"
    qemu_img("create", "-q", "-f", "vpc", str(p), str(size))
    info = probe_path(p)
    assert info.format is ImageFormat.VHD_DYNAMIC and info.growable
    assert info.virtual_size >= size
    assert info.max_size is not None
    fill(p, "vpc", info.virtual_size)
    full = p.stat().st_size
    assert full <= info.max_size
    # the bound is tight: a few sectors of slack at most beyond the real maximum
    assert info.max_size - full < 4096
    again = probe_path(p)
    assert again.max_size == full  # nothing left to allocate


@pytest.mark.parametrize(
    "options",
    [
        "",
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "refcount_bits=64",
        "compat=0.10",
    ],
)
def test_qcow2_bound_holds_when_fully_allocated(tmp_path: Path, options: str) -> None:
    p = tmp_path / "disk.qcow2"
    size = 6 * MiB
    qemu_img(
        "create", "-q", "-f", "qcow2", *(["-o", options] if options else []), str(p), str(size)
    )
    info = probe_path(p)
    assert info.format is ImageFormat.QCOW2 and info.virtual_size == size
    assert info.max_size is not None
    measured = json.loads(
        qemu_img(
            "measure",
            "--output=json",
            "-O",
            "qcow2",
            *(["-o", options] if options else []),
            "--size",
            str(size),
        )
    )
    assert info.max_size >= measured["fully-allocated"]
    fill(p, "qcow2", size)
    assert p.stat().st_size <= info.max_size


def test_vhdx_is_refused_pointing_to_fuse_or_scan(tmp_path: Path) -> None:
    p = tmp_path / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(p), "16M")
    info = probe_path(p)
    assert info.format is ImageFormat.VHDX
    with pytest.raises(ImageError) as err:
        export_size_for(info, str(p), None)
    assert "VHDX" in str(err.value) and "--capture fuse" in str(err.value)
    assert "--capture scan" in str(err.value)
    assert isinstance(err.value, ConfigError)  # exit code 3, a configuration problem
    with pytest.raises(ImageError):
        export_size_for(info, str(p), 1 << 30)  # an explicit size does not make it work


def test_vmdk_needs_an_explicit_size(tmp_path: Path) -> None:
    p = tmp_path / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(p), "16M")
    info = probe_path(p)
    assert info.format is ImageFormat.VMDK and info.max_size is None
    with pytest.raises(ImageError, match="--nbd-size"):
        export_size_for(info, str(p), None)
    assert export_size_for(info, str(p), 32 * MiB) == 32 * MiB


def test_qcow2_with_external_data_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "meta.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(p), "4M"
    )
    with pytest.raises(ImageError, match="external data file"):
        probe_path(p)


def test_override_smaller_than_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(8192))
    info = probe_path(p)
    with pytest.raises(ImageError, match="smaller than the file"):
        export_size_for(info, "disk.img", 4096)
    assert export_size_for(info, "disk.img", 1 << 20) == 1 << 20


def test_broken_headers_are_reported(tmp_path: Path) -> None:
    p = tmp_path / "bad.qcow2"
    p.write_bytes(b"QFI\xfb" + b"\0\0\0\x07" + bytes(100))
    with pytest.raises(ImageError, match="qcow2"):
        probe_path(p)
    p = tmp_path / "bad.vhd"
    footer = bytearray(512)
    footer[:8] = b"conectix"
    footer[60:64] = (9).to_bytes(4, "big")  # disk type 9 does not exist
    p.write_bytes(bytes(4096) + footer)
    with pytest.raises(ImageError, match="disk type 9"):
        probe_path(p)
    footer[60:64] = (3).to_bytes(4, "big")  # dynamic, but no cxsparse header
    footer[16:24] = (512).to_bytes(8, "big")
    p.write_bytes(bytes(footer) + bytes(4096) + footer)
    with pytest.raises(ImageError, match="dynamic VHD header missing"):
        probe_path(p)
