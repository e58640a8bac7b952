"""FUSE capture through the embedding API (``Sender(config, fuse=fuse_options(...))``,
engine/api.py, docs/EMBEDDING.md): a receiver and a FUSE-capturing sender in this one
process over loopback, with real qemu-img and qemu-io writing through the mount.

This loop serves the mount, so whatever touches it runs in a thread (qemu-io as a child
process, Python file calls via ``asyncio.to_thread``), and mounts are looked up in
/proc/mounts, never with a stat of the mount point."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from replicator.engine.api import (
    ConfigError,
    EventKind,
    Receiver,
    ReceiverConfig,
    Sender,
    SenderConfig,
    SplitBrainError,
    StatusEvent,
    fuse_options,
    nbd_options,
    resolve_volumes,
)
from tests.engine.test_embedding import WAIT, caught_up, until
from tests.tools import is_mounted, qemu_compare, qemu_img, require_tool

POLL = 0.05
XML = "<domain><name>vm1</name><memory>1024</memory></domain>\n"
XML2 = "<domain><name>vm1</name><memory>4096</memory><vcpu>2</vcpu></domain>\n"


def qemu_io(path: Path, *commands: str) -> str:
    """qemu-io on a qcow2 image; fails on any error or pattern mismatch (a thread's call:
    the image may be under this loop's mount)."""
    cmd = [require_tool("qemu-io"), "-f", "qcow2"]
    if all(command.startswith("read") for command in commands):
        cmd.append("-r")  # a replica the receiver keeps opens for reading only
    for command in commands:
        cmd += ["-c", command]
    out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "error" not in text.lower() and "failed" not in text.lower(), text
    return text


def command(*args: str) -> None:
    """A short root command (mount, umount) on paths this loop serves no mount under."""
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def unmount_if_mounted(mount: Path) -> None:
    """Teardown of a failed test: lazily, without asking a filter that may be gone."""
    if is_mounted(mount):
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=60)


async def eventually(what: str, check: Callable[[], bool]) -> None:
    for _ in range(int(WAIT / POLL)):
        if check():
            return
        await asyncio.sleep(POLL)
    raise AssertionError(f"{what}: not within {WAIT} s")


def stopped(event: StatusEvent) -> bool:
    return event.kind is EventKind.STOPPED


@dataclass
class Folder:
    tmp: Path
    source: Path
    mount: Path
    receiver: Receiver

    def config(self) -> SenderConfig:
        host, port = self.receiver.address
        return SenderConfig(host, port, "vm1", [], self.tmp / "sstate")

    def sender(self) -> Sender:
        return Sender(self.config(), fuse=fuse_options(self.source, self.mount))

    @property
    def replica(self) -> Path:
        return self.tmp / "replicas" / "vm1"

    async def mounted(self) -> None:
        await eventually("the mount", lambda: is_mounted(self.mount))

    def same_disk(self) -> bool:
        disk = "disk.qcow2"
        return qemu_compare("qcow2", self.source / disk, self.replica / disk).returncode == 0


def make_folder(tmp_path: Path) -> tuple[Path, Path]:
    """The VM folder (a qcow2 made by qemu-img, a small vm.xml) and an empty mount point."""
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing"
    source, mount = tmp_path / "vm", tmp_path / "mnt"
    source.mkdir()
    mount.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(source / "disk.qcow2"), "16M")
    (source / "vm.xml").write_text(XML)
    return source, mount


@pytest.fixture
async def folder(tmp_path: Path) -> AsyncIterator[Folder]:
    source, mount = make_folder(tmp_path)
    try:
        async with Receiver(ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate")) as rcv:
            yield Folder(tmp_path, source, mount, rcv)
    finally:
        unmount_if_mounted(mount)


async def test_writes_through_the_mount_reach_the_replica_and_stop_unmounts(
    folder: Folder,
) -> None:
    sender = folder.sender()
    events = sender.events()
    try:
        # the volumes are the folder's files, and the constructor mounted nothing
        assert sender.config.folder
        assert [v.name for v in sender.config.volumes] == ["disk.qcow2", "vm.xml"]
        assert (await sender.snapshot())["capture"] == "fuse"
        assert not is_mounted(folder.mount)
        with pytest.raises(RuntimeError, match="run_once"):
            await sender.run_once()

        await sender.start()
        first = await until(events, caught_up)  # the initial sync, before the mount
        await folder.mounted()
        assert folder.same_disk()
        # the VM's view: real qemu-io on the mounted image, the XML saved through the mount
        await asyncio.to_thread(qemu_io, folder.mount / "disk.qcow2", "write -P 0x5a 0 1M")
        await asyncio.to_thread((folder.mount / "vm.xml").write_text, XML2)
        await asyncio.to_thread((folder.mount / "nvram.bin").write_bytes, b"\1" * 8192)
        journaled = (await sender.snapshot())["lsn"]["journaled"]
        assert journaled > first.applied_lsn  # the writes were journaled, no scan ran
        applied = await until(events, lambda e: caught_up(e) and e.applied_lsn >= journaled)
        assert applied.snapshot["capture"] == "fuse" and applied.lag.records == 0
        assert (folder.replica / "vm.xml").read_text() == XML2  # applied while mounted

        with pytest.raises(RuntimeError, match="FUSE mount"):
            await sender.verify()  # it would unmount the folder the VM uses
        other = folder.tmp / "other"
        other.mkdir()
        with pytest.raises(ConfigError, match="one FUSE mount per process"):
            Sender(folder.config(), fuse=fuse_options(folder.source, other))

        await sender.stop()
        assert (await until(events, stopped)).error is None
        assert not is_mounted(folder.mount)
        assert folder.same_disk()
        qemu_io(folder.replica / "disk.qcow2", "read -P 0x5a 0 1M")
        assert (folder.replica / "vm.xml").read_bytes() == (folder.source / "vm.xml").read_bytes()
        assert (folder.source / "vm.xml").read_text() == XML2
        assert (folder.replica / "nvram.bin").read_bytes() == b"\1" * 8192
        assert (await sender.verify()).identical  # stopped: the files are ours to compare
        # the folder is walked as it is now (nvram.bin, made through the mount, is compared)
        # and its layout too: a file on the replica only is a difference, repaired away
        (folder.replica / "stray.txt").write_text("left over")
        found = await sender.verify()
        assert found.layout == ["stray.txt: a file on the replica only"]
        assert "nvram.bin" in [v.volume for v in found.volumes] and not found.identical
        assert (await sender.verify(repair=True)).identical
        assert not (folder.replica / "stray.txt").exists()

        # started again: the folder is walked again, so a file made through the last mount
        # is a volume now and the new initial sync keeps it on the replica
        await sender.start()
        await folder.mounted()
        assert "nvram.bin" in [v.name for v in sender.config.volumes]
        await asyncio.to_thread(qemu_io, folder.mount / "disk.qcow2", "write -P 0x6b 4M 1M")
        journaled = (await sender.snapshot())["lsn"]["journaled"]
        await until(events, lambda e: caught_up(e) and e.applied_lsn >= journaled)
    finally:
        await sender.aclose()  # while running: stops, drains, unmounts
    assert not is_mounted(folder.mount)
    assert folder.same_disk()
    qemu_io(folder.replica / "disk.qcow2", "read -P 0x5a 0 1M", "read -P 0x6b 4M 1M")
    assert (folder.replica / "nvram.bin").read_bytes() == b"\1" * 8192
    assert (folder.replica / "vm.xml").read_text() == XML2


async def test_a_bad_mount_point_or_folder_is_refused_before_any_connection(
    tmp_path: Path,
) -> None:
    connections = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    source = tmp_path / "vm"
    source.mkdir()
    (source / "vm.xml").write_text(XML)
    config = SenderConfig("127.0.0.1", port, "vm1", [], tmp_path / "sstate")
    full, bound, empty = tmp_path / "full", tmp_path / "tmpfs", tmp_path / "empty"
    same_fs, bind_source = tmp_path / "bind mount", tmp_path / "elsewhere"
    for made in (full, bound, empty, same_fs, bind_source):
        made.mkdir()
    (full / "leftover").write_text("x")
    command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(bound))
    # An empty folder of the same file system bound over another: same device as its
    # parent, so only the mount table shows it (os.path.ismount does not).
    command("mount", "--bind", str(bind_source), str(same_fs))
    try:
        cases = [
            (tmp_path / "missing", "mount point .* does not exist"),
            (full, "mount point .* is not empty"),
            (bound, "already a mount point"),
            (same_fs, "already a mount point"),
            (source / "mnt", "overlap"),
        ]
        for mount, message in cases:
            with pytest.raises(ConfigError, match=message):
                Sender(config, fuse=fuse_options(source, mount))
    finally:
        command("umount", str(bound))
        command("umount", str(same_fs))
    with pytest.raises(ConfigError, match=r"source folder .* does not exist"):
        fuse_options(tmp_path / "nothing", empty)
    with pytest.raises(ConfigError, match="mounts a folder"):
        fuse_options(source / "vm.xml", empty)
    with pytest.raises(ConfigError, match="volumes=\\[\\]"):
        xml = resolve_volumes([source / "vm.xml"])
        Sender(
            SenderConfig("127.0.0.1", port, "vm1", xml, tmp_path), fuse=fuse_options(source, empty)
        )
    with pytest.raises(ConfigError, match="give one"):
        Sender(config, fuse=fuse_options(source, empty), nbd=nbd_options(tmp_path / "n.sock"))
    await asyncio.sleep(0.2)
    server.close()
    await server.wait_closed()
    assert connections == 0
    assert not (tmp_path / "sstate").exists()  # no state folder claimed, no journal
    assert not any(empty.iterdir()) and not is_mounted(empty)


async def test_a_run_that_fails_leaves_no_mount(folder: Folder) -> None:
    """The receiver promotes the job while the sender serves the mount: its next session
    is refused (split brain), the run ends with that error, and the mount is gone, also
    when the error surfaces by leaving ``async with``."""
    with pytest.raises(SplitBrainError):
        async with folder.sender() as sender, sender.events() as events:
            await until(events, caught_up)
            await folder.mounted()
            await asyncio.to_thread(qemu_io, folder.mount / "disk.qcow2", "write -P 0x5a 0 1M")
            journaled = (await sender.snapshot())["lsn"]["journaled"]
            await until(events, lambda e: caught_up(e) and e.applied_lsn >= journaled)
            await folder.receiver.failover("vm1")
            ended = await until(events, stopped)
            assert isinstance(ended.error, SplitBrainError), ended.error
            assert not sender.running
            assert not is_mounted(folder.mount)  # before aclose(): the run unmounted
    assert not is_mounted(folder.mount)
    assert folder.same_disk()  # the promoted replica holds every acknowledged write
    # the mount point is free again: a new sender of the job is refused for the split
    # brain, not for the mount
    again = folder.sender()
    try:
        await again.start()
        with pytest.raises(SplitBrainError):
            await again.wait()
    finally:
        await again.aclose()
    assert not is_mounted(folder.mount)
