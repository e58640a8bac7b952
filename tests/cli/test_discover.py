"""``replicator discover`` as an admin runs it: real images made by qemu-img, a libvirt VM,
a Hyper-V style folder and a loose image; the table, ``--json`` and the job file."""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from replicator.engine.errors import ExitCode
from replicator.engine.units import human_size
from tests.tools import ENV, REPLICATOR, qemu_img, replicator, send_once, start_receiver

pytestmark = pytest.mark.tools


def _info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(qemu_img("info", "--output=json", str(path)))
    return info


class Site:
    """/srv: a libvirt VM (qcow2 + dynamic VHD + XML, one disk missing), a Hyper-V style
    folder with a VHDX, and a loose raw image."""

    def __init__(self, root: Path) -> None:
        self.root = root
        images = root / "libvirt" / "images"
        images.mkdir(parents=True)
        self.qcow2 = images / "web01-os.qcow2"
        self.vhd = images / "web01-data.vhd"
        self.missing = images / "web01-gone.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(self.qcow2), "2G")
        qemu_img("create", "-q", "-f", "vpc", str(self.vhd), "100M")  # dynamic by default
        self.xml = root / "libvirt" / "qemu" / "web01.xml"
        self.xml.parent.mkdir()
        disks = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source file='{path}'/><target dev='{dev}' bus='virtio'/></disk>"
            for path, fmt, dev in (
                (self.qcow2, "qcow2", "vda"),
                (self.vhd, "vpc", "vdb"),
                (self.missing, "qcow2", "vdc"),
            )
        )
        self.xml.write_text(
            "<domain type='kvm'><name>web01</name><memory unit='MiB'>512</memory>"
            f"<os><type>hvm</type></os><devices>{disks}</devices></domain>\n"
        )
        hyperv = root / "hyperv" / "SQL01"
        self.vhdx = hyperv / "Virtual Hard Disks" / "SQL01.vhdx"
        self.vhdx.parent.mkdir(parents=True)
        qemu_img("create", "-q", "-f", "vhdx", str(self.vhdx), "300M")
        self.vmcx = hyperv / "Virtual Machines" / "5A1F0C2E-0000-4B1B-9C8D-1234567890AB.vmcx"
        self.vmcx.parent.mkdir()
        self.vmcx.write_bytes(os.urandom(4096))
        self.raw = root / "loose" / "scratch.img"
        self.raw.parent.mkdir()
        qemu_img("create", "-q", "-f", "raw", str(self.raw), "50M")

    @property
    def disks(self) -> dict[Path, str]:
        """Every image and the format discover names it by."""
        return {self.qcow2: "qcow2", self.vhd: "vhd", self.vhdx: "vhdx", self.raw: "raw"}


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "srv")


def replicator_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*REPLICATOR, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=ENV
    )


def _row(table: str, path: Path) -> str:
    [line] = [line for line in table.splitlines() if f" {path} " in line]
    return line


def test_table_and_job_file_name_every_file_with_format_and_size(
    site: Site, tmp_path: Path
) -> None:
    job_file = tmp_path / "job.toml"
    out = replicator("discover", str(site.root), "--out", str(job_file))
    assert out.returncode == 0, out.stderr
    for path, fmt in site.disks.items():
        row = _row(out.stdout, path)
        assert f" {fmt}" in row
        assert human_size(_info(path)["virtual-size"]) in row
    assert "vhd dynamic" in _row(out.stdout, site.vhd)
    assert "config" in _row(out.stdout, site.xml) and "config" in _row(out.stdout, site.vmcx)
    missing = _row(out.stdout, site.missing)
    assert "MISSING" in missing and str(site.xml) in missing
    assert f"wrote 3 job(s) to {job_file}" in out.stdout
    assert (
        f"replicator: warning: web01: disk {site.missing} (named by {site.xml}) is missing: "
        "not replicated" in out.stderr
    )

    text = job_file.read_text()
    jobs = tomllib.loads(text)["jobs"]
    assert jobs == {
        "web01": {
            "capture": "scan",
            "volumes": [str(site.qcow2), str(site.vhd)],
            "files": [str(site.xml)],
        },
        "SQL01": {"capture": "scan", "volumes": [str(site.vhdx)], "files": [str(site.vmcx)]},
        "scratch": {"capture": "scan", "volumes": [str(site.raw)], "files": []},
    }
    assert '# to = "HOST:PORT"' in text
    assert f"#   {site.missing}: missing (named by {site.xml})" in text


def test_json_gives_exact_sizes_from_the_headers(site: Site) -> None:
    out = replicator("discover", "--json", str(site.root / "libvirt"), str(site.root / "hyperv"))
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["paths"] == [str(site.root / "libvirt"), str(site.root / "hyperv")]
    assert answer["job_file"] is None
    vms = {vm["job"]: vm for vm in answer["vms"]}
    assert set(vms) == {"web01", "SQL01"}
    disks = {d["path"]: d for vm in vms.values() for d in vm["disks"]}
    for path in (site.qcow2, site.vhd, site.vhdx):
        info = _info(path)
        disk = disks[str(path)]
        assert disk["virtual_size"] == info["virtual-size"]
        assert disk["file_size"] == path.stat().st_size
        assert (disk["present"], disk["included"]) == (True, True)
    assert disks[str(site.vhd)]["subformat"] == "dynamic"
    gone = disks[str(site.missing)]
    assert (gone["present"], gone["included"], gone["problem"]) == (False, False, "missing")
    assert gone["named_by"] == str(site.xml)
    assert any("web01-gone.qcow2" in w for w in answer["warnings"])
    web01 = vms["web01"]
    assert web01["kind"] == "libvirt" and web01["source"] == str(site.xml)
    assert web01["volumes"] == [str(site.qcow2), str(site.vhd)]
    assert web01["config_files"] == [str(site.xml)]
    assert web01["total_bytes"] == sum(p.stat().st_size for p in (site.qcow2, site.vhd, site.xml))


def test_relative_paths_come_out_absolute(site: Site, tmp_path: Path) -> None:
    out = replicator_in(site.root / "loose", "discover", "--json", ".")
    assert out.returncode == 0, out.stderr
    [vm] = json.loads(out.stdout)["vms"]
    assert vm["volumes"] == [str(site.raw)]


def test_a_domain_xml_with_a_dtd_is_refused_not_parsed(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "1M")
    evil = tmp_path / "evil.xml"
    evil.write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>\n'
        f"<domain><name>&b;</name><devices><disk type='file'><source file='{image}'/>"
        "</disk></devices></domain>\n"
    )
    out = replicator("discover", "--json", str(tmp_path))
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    # the image is found on its own (loose), not as the disk of a domain named "aaaa..."
    assert [(vm["kind"], vm["name"]) for vm in answer["vms"]] == [("image", "disk")]
    assert f"replicator: warning: {evil} refused as a libvirt domain: it declares a " in out.stderr


def test_names_with_quotes_backslashes_and_unicode_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / 'VM "eins" \\ ü'
    folder.mkdir()
    image = folder / "Dïsk «1».qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "1M")
    xml = folder / "domain.xml"
    xml.write_text(
        "<domain><name>Überwachung \"prod\" \\ 1</name><devices><disk type='file'>"
        f"<source file='{image}'/></disk></devices></domain>",
        encoding="utf-8",
    )
    job_file = tmp_path / "jobs.toml"
    out = replicator("discover", str(folder), "--out", str(job_file))
    assert out.returncode == 0, out.stderr
    assert 'Überwachung "prod" \\ 1 (Uberwachung-prod-1)' in out.stdout
    jobs = tomllib.loads(job_file.read_text(encoding="utf-8"))["jobs"]
    assert jobs == {
        "Uberwachung-prod-1": {"capture": "scan", "volumes": [str(image)], "files": [str(xml)]}
    }


def test_a_path_that_does_not_exist_exits_3(tmp_path: Path) -> None:
    out = replicator("discover", str(tmp_path), str(tmp_path / "nope"))
    assert out.returncode == ExitCode.CONFIG
    assert f"replicator: error: {tmp_path / 'nope'} does not exist" in out.stderr
    assert out.stdout == ""


def test_nothing_found_exits_3_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a disk\n" * 100)
    out = replicator("discover", str(tmp_path), "--out", str(tmp_path / "job.toml"))
    assert out.returncode == ExitCode.CONFIG
    assert "no VM or disk image found under" in out.stderr
    assert not (tmp_path / "job.toml").exists()


def test_an_existing_job_file_is_kept_without_force(site: Site, tmp_path: Path) -> None:
    job_file = tmp_path / "job.toml"
    job_file.write_text("# edited by hand\n")
    out = replicator("discover", str(site.root / "loose"), "--out", str(job_file))
    assert out.returncode == ExitCode.CONFIG
    assert "exists" in out.stderr and "--force" in out.stderr
    assert job_file.read_text() == "# edited by hand\n"
    out = replicator("discover", str(site.root / "loose"), "--out", str(job_file), "--force")
    assert out.returncode == 0, out.stderr
    assert tomllib.loads(job_file.read_text())["jobs"]["scratch"]["volumes"] == [str(site.raw)]


def test_no_path_is_a_usage_error() -> None:
    out = replicator("discover")
    assert out.returncode == ExitCode.USAGE


def test_a_receivers_replica_folder_is_not_taken_for_vms(site: Site) -> None:
    """A host that is both a source and a target keeps replicas beside its VMs: the
    receiver's --dir (its state in DIR/.replicator) is left out with a warning, or
    `--out` would write jobs replicating the replicas again; DIR/JOB named as a PATH is
    still looked at."""
    replicas = site.root / "replicas"
    receiver = start_receiver(replicas)
    try:
        send_once(receiver, "web01", site.root.parent / "state", site.qcow2, site.xml)
    finally:
        assert receiver.stop() == 0
    out = replicator("discover", "--json", str(site.root))
    assert out.returncode == 0, out.stderr
    paths = {disk["path"] for vm in json.loads(out.stdout)["vms"] for disk in vm["disks"]}
    assert str(site.qcow2) in paths
    assert not [p for p in paths if p.startswith(f"{replicas}/")]
    assert (
        f"replicator: warning: not looking in {replicas}: a receiver keeps its replicas there"
        in out.stderr
    )
    named = replicator("discover", "--json", str(replicas / "web01"))
    assert named.returncode == 0, named.stderr
    named_paths = {d["path"] for vm in json.loads(named.stdout)["vms"] for d in vm["disks"]}
    assert str(replicas / "web01" / site.qcow2.name) in named_paths
