"""`replicator send --capture nbd`: real NBD clients write, the replica follows in order."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    ReceiverProc,
    b3,
    nbdsh,
    qemu_compare,
    qemu_img,
    qemu_io,
    require_tool,
    start_receiver,
)


def _start_live(
    receiver: ReceiverProc, state: Path, sock: Path, *volumes: Path
) -> subprocess.Popen[str]:
    proc = LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "live", "--state-dir",
         str(state), "--capture", "nbd", "--nbd-socket", str(sock), "--insecure",
         *map(str, volumes)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "NBD socket did not appear"
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def _converges(fmt: str, source: Path, replica: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # -U: the sender serving the source holds QEMU's write lock on it
        if replica.exists() and qemu_compare(fmt, source, replica, shared=True).returncode == 0:
            return
        assert time.monotonic() < deadline, f"{replica} did not converge to {source}"
        time.sleep(0.1)


def _uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


@pytest.fixture
def live_vm(tmp_path: Path, receiver: ReceiverProc) -> Iterator[tuple[Path, Path, Path]]:
    """A dynamic VHD and a raw disk served by a live sender; yields (vhd, raw, socket)."""
    vhd, raw, sock = tmp_path / "disk0.vhd", tmp_path / "disk1.img", tmp_path / "nbd.sock"
    qemu_img("create", "-q", "-f", "vpc", str(vhd), "128M")
    qemu_img("create", "-q", "-f", "raw", str(raw), "32M")
    (tmp_path / "vm.xml").write_text("<domain><memory>1</memory></domain>\n")
    proc = _start_live(receiver, tmp_path / "state", sock, vhd, raw, tmp_path / "vm.xml")
    yield vhd, raw, sock
    assert _stop(proc) == 0, proc.stderr.read() if proc.stderr else ""


def test_qemu_io_random_writes_on_a_growing_vhd(
    live_vm: tuple[Path, Path, Path], receiver: ReceiverProc
) -> None:
    vhd, _, sock = live_vm
    rng = random.Random(4)
    commands = [f"write -P {i} {rng.randrange(0, 120) * 1024 * 1024} 64k" for i in range(1, 25)]
    qemu_io("vpc", _uri(sock, "disk0.vhd"), *commands, "flush")
    _converges("vpc", vhd, receiver.dir / "live" / "disk0.vhd")
    assert b3(vhd) == b3(receiver.dir / "live" / "disk0.vhd")


def test_configuration_file_changes_ship_in_order(
    tmp_path: Path, live_vm: tuple[Path, Path, Path], receiver: ReceiverProc
) -> None:
    replica = receiver.dir / "live" / "vm.xml"
    deadline = time.monotonic() + 30
    while not replica.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (tmp_path / "vm.xml").write_text("<domain><memory>2</memory></domain>\n")
    while replica.read_text() != (tmp_path / "vm.xml").read_text():
        assert time.monotonic() < deadline, "the XML change did not replicate"
        time.sleep(0.1)
    (tmp_path / "vm.xml").chmod(0o600)  # the mode alone: no byte changes
    while replica.stat().st_mode & 0o7777 != 0o600:
        assert time.monotonic() < deadline, "the chmod did not replicate"
        time.sleep(0.1)
    assert replica.read_text() == (tmp_path / "vm.xml").read_text()


def test_qemu_img_convert_and_nbdcopy_into_exports(
    tmp_path: Path, live_vm: tuple[Path, Path, Path], receiver: ReceiverProc
) -> None:
    _, raw, sock = live_vm
    image = tmp_path / "payload.raw"
    with image.open("wb") as f:
        f.write(random.Random(1).randbytes(8 * 1024 * 1024))
        f.truncate(32 * 1024 * 1024)
    qemu_img("convert", "-n", "-f", "raw", "-O", "raw", str(image), _uri(sock, "disk1.img"))
    _converges("raw", raw, receiver.dir / "live" / "disk1.img")
    assert b3(raw) == b3(image)
    require_tool("nbdcopy")
    with image.open("r+b") as f:
        f.seek(20 * 1024 * 1024)
        f.write(random.Random(2).randbytes(1024 * 1024))
    subprocess.run(["nbdcopy", str(image), _uri(sock, "disk1.img")], check=True, timeout=60)
    _converges("raw", raw, receiver.dir / "live" / "disk1.img")
    assert b3(receiver.dir / "live" / "disk1.img") == b3(image)


def test_libnbd_every_change_on_two_connections_reaches_the_replica(
    tmp_path: Path, live_vm: tuple[Path, Path, Path], receiver: ReceiverProc
) -> None:
    """What a libnbd user sends the sender's shim: FUA writes, zeroes with and without
    NO_HOLE, trims, a WRITE over the advertised maximum (refused; it used to cost the
    connection), writes on one connection flushed by the other (multi-conn is advertised).
    Every acknowledged change is in the source and reaches the replica."""
    _, raw, sock = live_vm
    max_request = 32 * 1024 * 1024
    out = nbdsh(
        f"""
uri = {_uri(sock, "disk1.img")!r}
h.set_strict_mode(0)
h.connect_uri(uri)
other = nbd.NBD()
other.connect_uri(uri)
assert h.can_multi_conn()
h.pwrite(b"\\x11" * 1048576, 0, nbd.CMD_FLAG_FUA)
h.zero(65536, 4096, nbd.CMD_FLAG_NO_HOLE)  # (length, offset)
h.zero(65536, 262144)
h.trim(65536, 524288, nbd.CMD_FLAG_FUA)
try:
    h.pwrite(b"\\x22" * ({max_request} + 4096), 2097152)
except nbd.Error as exc:
    print("oversized", nbd_errno(exc))
cookies = [
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i + 1]) * 65536), (4 + i) * 1048576)
    for i in range(16)
]
while h.aio_in_flight():
    h.poll(-1)
for cookie in cookies:
    assert h.aio_command_completed(cookie)  # raises the command's error
other.flush()
print("read back", other.pread(4, 4 * 1048576))
h.shutdown()
other.shutdown()
"""
    )
    assert out.split() == [
        "oversized",
        "EINVAL",
        "read",
        "back",
        "bytearray(b'\\x01\\x01\\x01\\x01')",
    ]
    data = raw.read_bytes()
    expected = bytearray(32 * 1024 * 1024)
    expected[:1048576] = b"\x11" * 1048576
    expected[4096 : 4096 + 65536] = bytes(65536)
    expected[262144 : 262144 + 65536] = bytes(65536)
    expected[524288 : 524288 + 65536] = bytes(65536)
    for i in range(16):
        expected[(4 + i) * 1048576 : (4 + i) * 1048576 + 65536] = bytes([i + 1]) * 65536
    assert data == expected
    _converges("raw", raw, receiver.dir / "live" / "disk1.img")
    assert b3(receiver.dir / "live" / "disk1.img") == b3(raw)


def test_fio_nbd_random_writes_with_verify(
    tmp_path: Path, live_vm: tuple[Path, Path, Path], receiver: ReceiverProc
) -> None:
    _, raw, sock = live_vm
    require_tool("fio")
    out = subprocess.run(
        ["fio", "--name=rand", "--ioengine=nbd", f"--uri={_uri(sock, 'disk1.img')}",
         "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c",
         "--verify_state_save=0", "--do_verify=1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verify" not in out.stderr.lower() or "error" not in out.stderr.lower()
    _converges("raw", raw, receiver.dir / "live" / "disk1.img")


def test_two_disks_stay_consistent_when_the_receiver_is_killed(tmp_path: Path) -> None:
    """The pair of replicas always equals a state the pair of sources passed through."""
    a, b, sock = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "nbd.sock"
    for disk in (a, b):
        qemu_img("create", "-q", "-f", "raw", str(disk), "2M")
    target = tmp_path / "target"
    receiver = start_receiver(target)
    proc = _start_live(receiver, tmp_path / "state", sock, a, b)
    history = {(b3(a), b3(b))}
    rng = random.Random(9)
    kills = 0
    try:
        for step in range(1, 41):
            disk = rng.choice((a, b))
            offset = rng.randrange(0, 32) * 65536
            qemu_io("raw", _uri(sock, disk.name), f"write -P {step} {offset} 64k", "flush")
            history.add((b3(a), b3(b)))
            if step % 5 == 0:
                time.sleep(rng.random() * 0.05)
                receiver.stop(signal.SIGKILL)
                kills += 1
                ra, rb = target / "live" / "a.img", target / "live" / "b.img"
                pair = (b3(ra), b3(rb))
                assert pair in history, f"replica pair after kill {kills} never existed"
                receiver = start_receiver(target, receiver.port)
        deadline = time.monotonic() + 60
        while (b3(target / "live" / "a.img"), b3(target / "live" / "b.img")) != (b3(a), b3(b)):
            assert time.monotonic() < deadline, "replicas did not catch up"
            time.sleep(0.2)
    finally:
        assert _stop(proc) == 0, proc.stderr.read() if proc.stderr else ""
        receiver.stop()
    assert kills == 8


def test_sigkilled_sender_loses_nothing_it_acknowledged(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk, sock = tmp_path / "disk.img", tmp_path / "nbd.sock"
    qemu_img("create", "-q", "-f", "raw", str(disk), "16M")
    state = tmp_path / "state"
    proc = _start_live(receiver, state, sock, disk)
    qemu_io("raw", _uri(sock, "disk.img"), "write -P 0x77 1M 2M", "flush")
    proc.send_signal(signal.SIGKILL)  # the flush was acknowledged: it must reach the replica
    proc.wait()
    sock.unlink(missing_ok=True)
    proc = _start_live(receiver, state, sock, disk)
    try:
        _converges("raw", disk, receiver.dir / "live" / "disk.img")
        replica = (receiver.dir / "live" / "disk.img").read_bytes()
        assert replica[1 << 20 : 3 << 20] == b"\x77" * (2 << 20)
    finally:
        assert _stop(proc) == 0
