"""Real NBD clients (qemu-io, qemu-img, nbdcopy, fio) against journaled exports.

After each client run the journal is replayed into an independent copy of the
original file: the copy must equal the served file byte for byte (and for images,
``qemu-img compare``/``check`` must be clean).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from replicator.engine.nbd import JournaledFileExport
from replicator.engine.nbd.images import ImageError, ImageFormat, probe_path
from replicator.journal import Journal, RecordType
from tests.nbd.conftest import Served, ServeFactory
from tests.nbd.helpers import journal_records, loop_policy, nbdsh, replay, run, tool

pytestmark = pytest.mark.tools
MiB = 1024 * 1024


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    return loop_policy(request.param)


def create_image(path: Path, fmt: str, size: str) -> None:
    subprocess.run([tool("qemu-img"), "create", "-q", "-f", fmt, str(path), size], check=True)


def random_file(path: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    chunk = rng.randbytes(MiB)
    with path.open("wb") as f:
        for i in range(size // MiB):
            # mostly random data, some zero extents so clients use WRITE_ZEROES/holes
            f.write(bytes(MiB) if i % 4 == 3 else chunk[i:] + chunk[:i])
    return path


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


async def stop_and_replay(serve: ServeFactory, served: Served, path: Path, copy: Path) -> None:
    """Shut the server down (final flush), then replay the journal into ``copy``."""
    await serve.stop()
    await replay(served.journal, path.name, copy)
    assert same_bytes(copy, path)


async def test_qemu_io_raw_writes_reads_flush_and_exact_journal(
    tmp_path: Path, serve: ServeFactory
) -> None:
    path = tmp_path / "disk0.img"
    path.write_bytes(bytes(4 * MiB))
    s = await serve(path)
    out = await run(
        tool("qemu-io"),
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "write -P 0xcd 1M 4k",
        "-c",
        "flush",
        "-c",
        "read -P 0xcd 1M 4k",
        "-c",
        "read -P 0 64k 64k",
        s.uri("disk0.img"),
    )
    assert "Pattern verification failed" not in out
    records = await journal_records(s.journal)
    assert [(r.type, r.volume, r.offset, r.length) for r in records] == [
        (RecordType.WRITE, "disk0.img", 0, 65536),
        (RecordType.WRITE, "disk0.img", MiB, 4096),
        (RecordType.FLUSH, "", 0, 0),
    ]
    assert records[0].data == b"\xab" * 65536 and records[1].data == b"\xcd" * 4096
    assert s.journal.durable_lsn == records[-1].lsn  # the flush made all of it durable


@pytest.mark.parametrize(("fmt", "suffix"), [("vpc", "vhd"), ("qcow2", "qcow2")])
async def test_qemu_io_random_allocating_writes_on_a_growable_image(
    tmp_path: Path, serve: ServeFactory, fmt: str, suffix: str
) -> None:
    path = tmp_path / f"disk0.{suffix}"
    create_image(path, fmt, "64M")
    copy = tmp_path / f"replica.{suffix}"
    shutil.copyfile(path, copy)
    s = await serve(path)
    export = s.exports[path.name]
    assert export.size > export.file_size  # served with headroom
    rng = random.Random(1234)
    writes = []
    for i in range(60):
        length = rng.choice([512, 4096, 65536, 300 * 1024, MiB])
        offset = rng.randrange(0, 64 * MiB - length) // 512 * 512
        writes.append((offset, length, 1 + i % 250))
    cmds = []
    for offset, length, pattern in writes:
        cmds += ["-c", f"write -P {pattern} {offset} {length}"]
        if rng.random() < 0.2:
            cmds += ["-c", "flush"]
    # read back what survived (later writes may overlap earlier ones)
    survivors = [
        w
        for i, w in enumerate(writes)
        if not any(o < w[0] + w[1] and w[0] < o + n for o, n, _ in writes[i + 1 :])
    ]
    for offset, length, pattern in survivors:
        cmds += ["-c", f"read -P {pattern} {offset} {length}"]
    out = await run(tool("qemu-io"), "-f", fmt, *cmds, s.uri(path.name))
    assert "Pattern verification failed" not in out
    assert export.file_size == path.stat().st_size < export.size  # grown, never padded
    records = await journal_records(s.journal)
    assert any(r.type is RecordType.RESIZE for r in records)
    await stop_and_replay(serve, s, path, copy)
    assert probe_path(path).format in (ImageFormat.VHD_DYNAMIC, ImageFormat.QCOW2)
    await run(tool("qemu-img"), "compare", "-f", fmt, "-F", fmt, str(path), str(copy))
    if fmt == "qcow2":  # qemu-img check has no checker for vpc (exits 63)
        await run(tool("qemu-img"), "check", "-f", fmt, str(path))
        await run(tool("qemu-img"), "check", "-f", fmt, str(copy))
    # the source image reads back the data through its own driver, without NBD
    direct = []
    for offset, length, pattern in survivors[:10]:
        direct += ["-c", f"read -P {pattern} {offset} {length}"]
    out = await run(tool("qemu-io"), "-f", fmt, "-r", *direct, str(path))
    assert "Pattern verification failed" not in out


async def test_qemu_img_convert_into_raw_and_qcow2_exports(
    tmp_path: Path, serve: ServeFactory
) -> None:
    src = random_file(tmp_path / "src.raw", 16 * MiB, seed=1)
    raw = tmp_path / "target.img"
    raw.write_bytes(b"\xee" * 16 * MiB)  # stale content the zero extents must clear
    qcow = tmp_path / "target.qcow2"
    create_image(qcow, "qcow2", "16M")
    copies = {p: tmp_path / f"copy-{p.name}" for p in (raw, qcow)}
    for p, c in copies.items():
        shutil.copyfile(p, c)
    s = await serve(raw, qcow)
    for target, fmt in ((raw, "raw"), (qcow, "qcow2")):
        await run(
            tool("qemu-img"), "convert", "-n", "-f", "raw", "-O", fmt, str(src), s.uri(target.name)
        )
    await serve.stop()
    assert same_bytes(raw, src)
    for p, c in copies.items():
        await replay(s.journal, p.name, c)
        assert same_bytes(c, p)
    await run(tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(src), str(qcow))
    await run(tool("qemu-img"), "check", "-f", "qcow2", str(qcow))


async def test_nbdcopy_with_multiple_connections(tmp_path: Path, serve: ServeFactory) -> None:
    src = random_file(tmp_path / "src.raw", 24 * MiB, seed=2)
    target = tmp_path / "disk1.img"
    target.write_bytes(b"\x11" * 24 * MiB)
    copy = tmp_path / "copy.img"
    shutil.copyfile(target, copy)
    s = await serve(target)
    await run(tool("nbdcopy"), "--connections=4", "--flush", str(src), s.uri(target.name))
    assert same_bytes(target, src)
    await stop_and_replay(serve, s, target, copy)


async def test_libnbd_every_command_and_flag_as_the_spec_says(
    tmp_path: Path, serve: ServeFactory
) -> None:
    """libnbd, its own checks off, sends each command with each flag: what is advertised
    works, everything else gets the error the spec names, and the connection survives all
    of it; the journal then replays to the served file byte for byte."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4 * MiB))
    copy = tmp_path / "replica.img"
    shutil.copyfile(path, copy)
    s = await serve(path, max_request=MiB)
    out = await nbdsh(
        f"""
h.set_strict_mode(0)
h.connect_uri({s.uri(path.name)!r})
size = h.get_size()
print("can", [f for f in ("flush", "fua", "trim", "zero", "multi_conn", "fast_zero", "cache",
                          "df", "meta_context") if getattr(h, "can_" + f)(*(
                          ["base:allocation"] if f == "meta_context" else []))])
def run(name, call):
    try:
        call()
        print(name, "ok")
    except nbd.Error as exc:
        print(name, nbd_errno(exc))
run("write+fua", lambda: h.pwrite(b"a" * 65536, 0, nbd.CMD_FLAG_FUA))
run("write-unaligned", lambda: h.pwrite(b"b" * 3, 65537))
run("zero+no_hole", lambda: h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE))
run("zero+fua", lambda: h.zero(4096, 16384, nbd.CMD_FLAG_FUA))
run("zero+fast", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO))
run("zero-over-max", lambda: h.zero(2 * {MiB}, {MiB}))
run("trim+fua", lambda: h.trim(4096, 32768, nbd.CMD_FLAG_FUA))
run("trim-over-max", lambda: h.trim(2 * {MiB}, {MiB}))
run("flush", lambda: h.flush())
run("read+fua", lambda: h.pread(512, 0, nbd.CMD_FLAG_FUA))
run("read+df", lambda: h.pread(512, 0, nbd.CMD_FLAG_DF))
run("read-over-max", lambda: h.pread({MiB} + 1, 0))
run("write+no_hole", lambda: h.pwrite(b"c", 0, nbd.CMD_FLAG_NO_HOLE))
run("cache", lambda: h.cache(4096, 0))
run("block_status", lambda: h.block_status(4096, 0, lambda *args: 0))
run("read-past-end", lambda: h.pread(512, size - 256))
run("write-past-end", lambda: h.pwrite(b"d" * 512, size - 256))
run("zero-past-end", lambda: h.zero(512, size - 256))
run("trim-past-end", lambda: h.trim(512, size - 256))
run("read-offset-wraps", lambda: h.pread(4096, 2**64 - 512))
run("write-offset-wraps", lambda: h.pwrite(b"e" * 4096, 2**64 - 512))
run("read-empty", lambda: h.pread(0, 0))
run("write-empty", lambda: h.pwrite(b"", 0))
run("trim-empty", lambda: h.trim(0, 0))
run("zero-empty", lambda: h.zero(0, 0))
print("alive", h.pread(4, 0) == b"aaaa")
h.shutdown()
"""
    )
    lines = out.splitlines()
    assert lines[0] == "can ['flush', 'fua', 'trim', 'zero', 'multi_conn']", out
    assert dict(line.split() for line in lines[1:]) == {
        "write+fua": "ok",
        "write-unaligned": "ok",  # NBD_INFO_BLOCK_SIZE says minimum 1
        "zero+no_hole": "ok",
        "zero+fua": "ok",
        "zero+fast": "EINVAL",  # FAST_ZERO not advertised: EINVAL, never ENOTSUP
        "zero-over-max": "ok",  # no payload: the maximum does not apply
        "trim+fua": "ok",
        "trim-over-max": "ok",
        "flush": "ok",
        "read+fua": "ok",  # FUA is valid on every command once advertised
        "read+df": "EINVAL",  # no structured replies
        "read-over-max": "EINVAL",
        "write+no_hole": "EINVAL",
        "cache": "EINVAL",
        "block_status": "EINVAL",
        "read-past-end": "EINVAL",
        "write-past-end": "ENOSPC",
        "zero-past-end": "ENOSPC",
        "trim-past-end": "EINVAL",
        "read-offset-wraps": "EINVAL",
        "write-offset-wraps": "ENOSPC",
        "read-empty": "EINVAL",
        "write-empty": "EINVAL",
        "trim-empty": "EINVAL",
        "zero-empty": "EINVAL",
        "alive": "True",
    }, out
    await stop_and_replay(serve, s, path, copy)


async def test_libnbd_write_over_the_maximum_gets_einval_and_goes_on(
    tmp_path: Path, serve: ServeFactory
) -> None:
    """A client that ignores NBD_INFO_BLOCK_SIZE's maximum (libnbd without its strict
    checks; old clients never ask) gets EINVAL for that WRITE and keeps its connection."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4 * MiB))
    s = await serve(path, max_request=MiB)
    out = await nbdsh(
        f"""
h.set_strict_mode(0)
h.connect_uri({s.uri(path.name)!r})
assert h.get_block_size(nbd.SIZE_MAXIMUM) == {MiB}
try:
    h.pwrite(b"x" * ({MiB} + 4096), 0)
except nbd.Error as exc:
    print("refused", nbd_errno(exc))
h.pwrite(b"y" * 4096, 0, nbd.CMD_FLAG_FUA)
print("then", h.pread(4, 0))
h.shutdown()
"""
    )
    assert out.split() == ["refused", "EINVAL", "then", "bytearray(b'yyyy')"], out
    await serve.stop()
    assert [(r.type, r.offset, r.length) for r in await journal_records(s.journal)] == [
        (RecordType.WRITE, 0, 4096),
        (RecordType.FLUSH, 0, 0),
    ]


async def test_fio_random_4k_writes_with_verify(tmp_path: Path, serve: ServeFactory) -> None:
    target = tmp_path / "fio.img"
    target.write_bytes(bytes(32 * MiB))
    copy = tmp_path / "copy.img"
    shutil.copyfile(target, copy)
    s = await serve(target)
    out = await run(
        tool("fio"),
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={s.uri(target.name)}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--fsync_on_close=1",
        "--verify_state_save=0",  # fio would leave local-verify-*.state in the cwd
    )
    assert "err= 0" in out
    await stop_and_replay(serve, s, target, copy)


async def test_real_vhdx_is_refused_with_a_pointer_to_fuse_or_scan(
    tmp_path: Path, journal: Journal
) -> None:
    path = tmp_path / "disk.vhdx"
    create_image(path, "vhdx", "64M")
    with pytest.raises(ImageError) as err:
        JournaledFileExport(journal, path, "disk")
    message = str(err.value)
    assert "VHDX" in message and "--capture fuse" in message and "--capture scan" in message
