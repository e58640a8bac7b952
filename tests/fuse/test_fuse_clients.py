"""Real clients under the mount: qemu-img/qemu-io on growable images, fio with O_DIRECT,
and a SIGKILL of the filter while a writer fsyncs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.fuse.helpers import FuseProc, assert_same_tree, read_journal, replay
from tests.tools import qemu_compare, qemu_img, qemu_io, require_tool

pytestmark = pytest.mark.tools


@pytest.mark.parametrize("fmt", ["vhdx", "vpc", "qcow2"])
def test_qemu_growable_image(fuse: FuseProc, tmp_path: Path, fmt: str) -> None:
    initial = tmp_path / "initial"
    shutil.copytree(fuse.source, initial)
    fuse.start()
    image = fuse.mnt / f"disk.{fmt}"
    opts = ["-o", "subformat=dynamic"] if fmt == "vpc" else []
    qemu_img("create", "-f", fmt, *opts, str(image), "64M")
    qemu_io(fmt, image, "write -P 0x5a 0 1M", "write -P 0xa5 33M 2M", "flush")
    qemu_io(fmt, image, "write -P 0x33 60M 512k", "write -z 33M 64k", "flush")
    assert fuse.stop() == 0
    rep = replay(initial, read_journal(fuse.journal), tmp_path / "rep")
    src_image, rep_image = fuse.source / image.name, rep / image.name
    res = qemu_compare(fmt, src_image, rep_image)
    assert res.returncode == 0 and "identical" in res.stdout, res.stdout + res.stderr
    if fmt != "vpc":  # vpc has no consistency check
        qemu_img("check", "-f", fmt, str(rep_image))
    assert_same_tree(fuse.source, rep)


def test_fio_direct_random_writes_verify(fuse: FuseProc, tmp_path: Path) -> None:
    require_tool("fio")
    initial = tmp_path / "initial"
    shutil.copytree(fuse.source, initial)
    fuse.start()
    res = subprocess.run(
        [
            "fio",
            "--name=rand",
            f"--filename={fuse.mnt / 'fio.dat'}",
            "--size=16M",
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--fsync_on_close=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "verify:" not in res.stderr, res.stdout + res.stderr
    assert fuse.stop() == 0
    assert_same_tree(fuse.source, replay(initial, read_journal(fuse.journal), tmp_path / "rep"))


WRITER = textwrap.dedent(
    """
    import os, sys
    path, block = sys.argv[1], 4096
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    i = 0
    while True:
        data = (b"%08d" % i) * (block // 8)
        os.pwrite(fd, data, (i % 4096) * block)
        os.fsync(fd)
        print(i, flush=True)
        i += 1
    """
)


def test_sigkill_loses_nothing_fsynced_and_restart_recovers_the_mount(
    fuse: FuseProc, tmp_path: Path
) -> None:
    initial = tmp_path / "initial"
    shutil.copytree(fuse.source, initial)
    fuse.start()
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(fuse.mnt / "log.bin")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert writer.stdout is not None
    acked = -1
    try:
        deadline = time.monotonic() + 30
        while acked < 300 and time.monotonic() < deadline:
            acked = int(writer.stdout.readline())
        assert fuse.stop(signal.SIGKILL) == -signal.SIGKILL
        # whatever the writer still reports was fsynced before the kill
        for line in writer.stdout:
            acked = int(line)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert acked >= 300
    # the dead filter left a stale mount: a restart must recover it on its own
    with pytest.raises(OSError):
        os.stat(fuse.mnt / "log.bin")
    fuse.start()
    assert "fuse.stale_mount_unmounted" in [e["event"] for e in fuse.events()]
    assert fuse.stop() == 0
    rep = replay(initial, read_journal(fuse.journal), tmp_path / "rep")
    data = (rep / "log.bin").read_bytes()
    # each of the last 4095 acknowledged writes is the newest in its slot (the one slot
    # left out may hold a write that was journaled but not yet acknowledged)
    for i in range(max(0, acked - 4094), acked + 1):
        block = (i % 4096) * 4096
        assert data[block : block + 8] == b"%08d" % i, i
