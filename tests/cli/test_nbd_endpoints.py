"""Where the NBD shim is to listen is checked before the initial sync.

The exports are served once the replica is synced, which can take hours; a socket path in
a folder that does not exist, a file in the way or a port already taken used to end the
sender only then, as "local storage error" (exit 9).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from tests.tools import one_line_error, qemu_img, replicator, start_receiver


def _send(tmp_path: Path, address: str, *nbd: str) -> tuple[int, str]:
    disk = tmp_path / "disk.img"
    if not disk.exists():
        qemu_img("create", "-q", "-f", "raw", str(disk), "64M")
    out = replicator(
        "send", "--to", address, "--job", "vm", "--state-dir", str(tmp_path / "state"),
        "--capture", "nbd", "--insecure", *nbd, str(disk), timeout=60,
    )  # fmt: skip
    return out.returncode, one_line_error(out.stderr)


@pytest.mark.parametrize(
    "case", ["no folder", "a file", "a live server", "a port taken", "a path too long"]
)
def test_an_endpoint_that_cannot_be_served_is_refused_before_the_initial_sync(
    tmp_path: Path, case: str
) -> None:
    sock = tmp_path / "nbd.sock"
    extra: tuple[str, ...] = ()
    holder = socket.socket(socket.AF_UNIX if case == "a live server" else socket.AF_INET)
    if case == "no folder":
        sock = tmp_path / "nowhere" / "nbd.sock"
    elif case == "a file":
        sock.write_text("the admin's notes\n")
    elif case == "a path too long":  # a deep VM folder: past sockaddr_un's 108 bytes
        sock = tmp_path / ("d" * 120) / "nbd.sock"
        sock.parent.mkdir()
    elif case == "a live server":
        holder.bind(str(sock))
        holder.listen()
    else:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        extra = ("--nbd-listen", f"127.0.0.1:{holder.getsockname()[1]}")
    receiver = start_receiver(tmp_path / "target")
    try:
        rc, error = _send(tmp_path, receiver.address, "--nbd-socket", str(sock), *extra)
    finally:
        holder.close()
        assert receiver.stop() == 0
    assert rc == ExitCode.CONFIG, error
    want = {
        "no folder": f"the folder {sock.parent} does not exist",
        "a file": "exists and is not a socket",
        "a live server": "is in use by another server",
        "a port taken": "cannot listen for NBD on 127.0.0.1:",
        "a path too long": "a unix socket's path holds at most 107",
    }[case]
    assert want in error, error
    assert not (tmp_path / "target" / "vm").exists()  # nothing was synced first
    if case == "a file":
        assert sock.read_text() == "the admin's notes\n"
