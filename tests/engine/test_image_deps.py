"""What a disk image needs besides itself (engine/image_deps.py), on images qemu-img made:
told at send when the job leaves it out, and at failover when the target lacks it."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from replicator.engine.image_deps import dependencies, missing_on_target, unreplicated
from replicator.engine.image_formats import vhd_checksum
from tests.tools import qemu_img


def _overlay(folder: Path, name: str, backing: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", str(folder / name))
    return folder / name


def _base(folder: Path, name: str = "base.qcow2") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", str(folder / name), "8M")
    return folder / name


def _opens(image: Path) -> bool:
    """Whether qemu-img can open ``image`` with its whole chain (what a VM needs)."""
    out = subprocess.run(
        ["qemu-img", "info", "--backing-chain", str(image)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return out.returncode == 0


def test_an_overlay_sent_without_its_backing_file_is_told(tmp_path: Path) -> None:
    base = _base(tmp_path)
    over = _overlay(tmp_path, "over.qcow2", "base.qcow2")
    (dep,) = dependencies(over)
    assert (dep.role, dep.name, dep.format) == ("backing file", "base.qcow2", "qcow2")
    assert dep.path == base
    (problem,) = unreplicated([over])
    assert f"backing file 'base.qcow2' ({base}) is not replicated by this job" in problem
    assert "replicator discover" in problem
    assert unreplicated([over, base]) == []
    assert unreplicated([base]) == []


def test_a_backing_file_named_by_an_absolute_path_is_told_with_the_fix(tmp_path: Path) -> None:
    base = _base(tmp_path)
    over = _overlay(tmp_path, "over.qcow2", str(base))
    (problem,) = unreplicated([over, base])
    assert "names it by a path" in problem
    assert f"`qemu-img rebase -u -b base.qcow2 {over}`" in problem
    # the fix it names works: the header then names the file, and the warning is gone
    subprocess.run(["qemu-img", "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", str(over)],
                   check=True, timeout=60)  # fmt: skip
    assert _opens(over) and unreplicated([over, base]) == []


def test_a_chain_across_folders_cannot_be_fixed_by_a_bare_name(tmp_path: Path) -> None:
    base = _base(tmp_path / "images")
    (tmp_path / "vm").mkdir()
    over = _overlay(tmp_path / "vm", "over.qcow2", "../images/base.qcow2")
    (problem,) = unreplicated([over, base])
    assert "Keep the chain in one folder" in problem and "rebase" not in problem


def test_an_external_data_file_left_out_is_told(tmp_path: Path) -> None:
    subprocess.run(  # qemu-img makes the data file relative to its working folder
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=ext.raw", "ext.qcow2", "4M"],
        cwd=tmp_path, check=True, timeout=60,
    )  # fmt: skip
    (problem,) = unreplicated([tmp_path / "ext.qcow2"])
    assert "data file 'ext.raw' (" in problem and "is not replicated" in problem
    assert "holds the disk's data" in problem and "copy it" not in problem
    assert unreplicated([tmp_path / "ext.qcow2", tmp_path / "ext.raw"]) == []


def _differencing_vhd(path: Path, parent: str) -> None:
    def footer() -> bytes:
        data = bytearray(512)
        data[:8] = b"conectix"
        struct.pack_into(">IIQ", data, 8, 2, 0x00010000, 512)
        struct.pack_into(">QQ", data, 40, 1 << 20, 1 << 20)
        struct.pack_into(">I", data, 60, 4)
        struct.pack_into(">I", data, 64, vhd_checksum(bytes(data)))
        return bytes(data)

    dynamic = bytearray(1024)
    dynamic[:8] = b"cxsparse"
    name = parent.encode("utf-16-be")
    dynamic[64 : 64 + len(name)] = name
    path.write_bytes(footer() + bytes(dynamic) + footer())


def test_a_differencing_vhd_without_its_parent_is_told(tmp_path: Path) -> None:
    child = tmp_path / "child.vhd"
    _differencing_vhd(child, "parent.vhd")
    (problem,) = unreplicated([child])
    assert "child.vhd's parent 'parent.vhd'" in problem
    assert "not there on this side" in problem
    parent = tmp_path / "parent.vhd"
    qemu_img("create", "-q", "-f", "vpc", str(parent), "1M")
    assert unreplicated([child, parent]) == []


def test_raw_images_and_files_need_nothing(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"QFI" + bytes(4096))
    conf = tmp_path / "vm.xml"
    conf.write_text("<domain/>")
    assert dependencies(raw) == dependencies(conf) == dependencies(tmp_path / "gone") == []
    assert unreplicated([raw, conf, tmp_path / "gone"]) == []


def test_failover_tells_a_replica_whose_backing_file_is_not_on_the_target(tmp_path: Path) -> None:
    source = tmp_path / "source"
    _base(source)
    over = _overlay(source, "over.qcow2", "base.qcow2")
    replicas = tmp_path / "target" / "vm1"
    replicas.mkdir(parents=True)
    shutil.copy(over, replicas / "over.qcow2")
    (problem,) = missing_on_target(replicas)
    assert f"is not at {replicas / 'base.qcow2'}" in problem
    assert not _opens(replicas / "over.qcow2")
    shutil.copy(source / "base.qcow2", replicas / "base.qcow2")
    assert missing_on_target(replicas) == []
    assert _opens(replicas / "over.qcow2")


def test_failover_tells_a_replica_that_points_at_the_sources_path(tmp_path: Path) -> None:
    source = tmp_path / "source"
    base = _base(source)
    over = _overlay(source, "over.qcow2", str(base))
    replicas = tmp_path / "target" / "vm1"
    replicas.mkdir(parents=True)
    for image in (over, base):
        shutil.copy(image, replicas / image.name)
    # the source's path exists here (one machine), yet it is not the job's replica
    (problem,) = missing_on_target(replicas)
    assert f"not to this job's replica {replicas / 'base.qcow2'}" in problem
    fix = f"qemu-img rebase -u -b base.qcow2 -F qcow2 {replicas / 'over.qcow2'}"
    assert f"`{fix}`" in problem
    subprocess.run(fix.split(), check=True, timeout=60)
    assert missing_on_target(replicas) == []
    assert _opens(replicas / "over.qcow2")
    # gone from the target entirely: said so
    base.unlink()
    (over_replica,) = [p for p in replicas.iterdir() if p.name == "over.qcow2"]
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(base), "-F", "qcow2",
                    str(over_replica)], check=True, timeout=60)  # fmt: skip
    (problem,) = missing_on_target(replicas)
    assert "which does not exist here" in problem


def test_a_folder_job_keeps_relative_names_but_not_absolute_ones(tmp_path: Path) -> None:
    """FUSE capture replicates the folder as a tree: ../images/base.qcow2 still resolves
    on the target; an absolute name does not."""
    base = _base(tmp_path / "images")
    (tmp_path / "vm").mkdir()
    relative = _overlay(tmp_path / "vm", "rel.qcow2", "../images/base.qcow2")
    absolute = _overlay(tmp_path / "vm", "abs.qcow2", str(base))
    (problem,) = unreplicated([relative, absolute, base], tree=True)
    assert problem.startswith(f"{absolute}'s backing file") and "names it by a path" in problem
    assert len(unreplicated([relative, absolute, base])) == 2
    (outside,) = unreplicated([relative], tree=True)  # the base is not in the folder
    assert "Move it into the replicated folder" in outside and "volumes" not in outside
