"""Peers that are not what they claim: clear errors and distinct exit codes, nothing lost."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from replicator.transport import PROTOCOL_VERSION, ProtocolConnection, Refuse, Role
from replicator.transport.frames import FRAME_VERSION
from tests.tools import ENV, ReceiverProc, replicator, start_receiver

Reply = Callable[[bytes], bytes]


@pytest.fixture
def fake_receiver() -> Iterator[Callable[[Reply], int]]:
    """A TCP server that reads the sender's first bytes and answers with ``reply(bytes)``."""
    servers: list[socket.socket] = []

    def start(reply: Reply) -> int:
        srv = socket.create_server(("127.0.0.1", 0))
        servers.append(srv)

        def serve() -> None:
            conn, _ = srv.accept()
            with conn:
                first = conn.recv(65536)
                conn.sendall(reply(first))
                conn.recv(65536)  # let the sender read before we close

        threading.Thread(target=serve, daemon=True).start()
        return int(srv.getsockname()[1])

    yield start
    for srv in servers:
        srv.close()


def _send(tmp_path: Path, port: int) -> tuple[int, str]:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\x01" * 65536)
    out = replicator(
        "send", "--to", f"127.0.0.1:{port}", "--job", "j", "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), str(disk), timeout=60,
    )  # fmt: skip
    return out.returncode, out.stderr


def _refuse_frames(code: str, message: str) -> bytes:
    return b"".join(ProtocolConnection(Role.RECEIVER).encode(Refuse(code, message)).buffers)


def test_newer_frame_version_is_a_version_mismatch(
    tmp_path: Path, fake_receiver: Callable[[Reply], int]
) -> None:
    def reply(hello: bytes) -> bytes:
        frame = bytearray(_refuse_frames("version", "x"))
        frame[4] = FRAME_VERSION + 1  # the byte after the magic
        return bytes(frame)

    rc, err = _send(tmp_path, fake_receiver(reply))
    assert rc == ExitCode.VERSION, err
    assert "version mismatch" in err


# a sender of another release: the protocol version it says in its Hello is STEP off ours
_OTHER_SENDER = """
import sys
import replicator.transport.protocol as protocol
import replicator.transport.version as version
version.PROTOCOL_VERSION = protocol.PROTOCOL_VERSION = version.PROTOCOL_VERSION + {step}
from replicator.cli.main import app
sys.argv = ["replicator", *sys.argv[1:]]
app()
"""


@pytest.mark.parametrize(
    ("step", "older", "newer"),
    [(1, "the receiver", "this sender"), (-1, "this sender", "the receiver")],
    ids=["newer-sender", "older-sender"],
)
def test_a_sender_of_another_release_is_told_which_versions_and_what_to_do(
    tmp_path: Path, step: int, older: str, newer: str
) -> None:
    """It read "protocol version mismatch: receiver speaks protocol 6: protocol version
    mismatch: peer speaks protocol version 7, we speak 6", and no way out. The receiver's
    refusal itself names the side to upgrade: a sender of an older release prints it as
    it comes (after "protocol version mismatch: "), and the receiver logs it."""
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\x01" * 65536)
    log = tmp_path / "receiver.log"
    receiver = start_receiver(tmp_path / "t", log=log)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _OTHER_SENDER.format(step=step), "send", "--to",
             receiver.address, "--job", "j", "--once", "--insecure", "--state-dir",
             str(tmp_path / "s"), str(disk)],
            capture_output=True, text=True, env=ENV, timeout=60,
        )  # fmt: skip
    finally:
        assert receiver.stop() == 0
    assert out.returncode == ExitCode.VERSION, out.stderr
    ours, theirs = PROTOCOL_VERSION, PROTOCOL_VERSION + step
    assert (
        f"replicator: error: protocol version mismatch: this sender speaks protocol version "
        f"{theirs}, the receiver {ours} ({older} runs an older release: upgrade replicator on "
        f"its host to the release {newer} runs; both sides must run the same one)"
    ) in out.stderr
    assert out.stderr.strip().splitlines()[-1].count("mismatch") == 1, out.stderr
    sender_side = "the sender" if step < 0 else "this receiver"
    receiver_side = "this receiver" if step < 0 else "the sender"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    said = [e["why"] for e in lines if e["event"] == "receiver.refused"]
    assert said == [
        f"the sender speaks protocol version {theirs}, this receiver {ours}: {sender_side} runs "
        f"an older release: upgrade replicator on its host to the release {receiver_side} runs; "
        "both sides must run the same one"
    ]


# What every receiver before 2026-12-07 answered a sender of protocol 6 (its text taken from
# a real one, built from commit e8262fd (protocol 5), refusing `send` of this release): its
# own error in its own words, "we" being the receiver
_OLDER_RECEIVERS_REFUSAL = (
    "receiver speaks protocol 5: protocol version mismatch: peer speaks protocol version 6, "
    "we speak 5"
)


def test_a_receiver_of_an_older_release_is_named_as_the_side_to_upgrade(
    tmp_path: Path, fake_receiver: Callable[[Reply], int]
) -> None:
    """Upgrading the source first, a sender met such a receiver and printed "protocol
    version mismatch: receiver speaks protocol 5: protocol version mismatch: peer speaks
    protocol version 6, we speak 5 (... compare `replicator --version` on each and upgrade
    the older one)": "we" was the receiver, and both hosts' --version said 0.1.0."""
    rc, err = _send(
        tmp_path, fake_receiver(lambda _: _refuse_frames("version", _OLDER_RECEIVERS_REFUSAL))
    )
    assert rc == ExitCode.VERSION, err
    assert err.strip().splitlines()[-1] == (
        f"replicator: error: protocol version mismatch: this sender speaks protocol version "
        f"{PROTOCOL_VERSION}, the receiver 5 (the receiver runs an older release: upgrade "
        "replicator on its host to the release this sender runs; both sides must run the same "
        "one)"
    )


def test_a_version_refusal_naming_no_version_is_shown_as_it_came(
    tmp_path: Path, fake_receiver: Callable[[Reply], int]
) -> None:
    rc, err = _send(tmp_path, fake_receiver(lambda _: _refuse_frames("version", "not today")))
    assert rc == ExitCode.VERSION, err
    assert err.strip().splitlines()[-1] == (
        "replicator: error: protocol version mismatch: the receiver refused this sender's "
        f"protocol version {PROTOCOL_VERSION}: not today (run the same replicator release on "
        "both sides: compare `replicator --version` on each (it names the protocol) and "
        "upgrade the older one)"
    )


def test_refusal_is_reported_with_its_reason(
    tmp_path: Path, fake_receiver: Callable[[Reply], int]
) -> None:
    rc, err = _send(tmp_path, fake_receiver(lambda _: _refuse_frames("storage", "disk full")))
    assert rc == ExitCode.REFUSED, err
    assert "disk full" in err


def test_not_a_replicator_peer(tmp_path: Path, fake_receiver: Callable[[Reply], int]) -> None:
    rc, err = _send(tmp_path, fake_receiver(lambda _: b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    assert rc == ExitCode.PROTOCOL, err
    assert "is not a replicator receiver" in err and "it speaks HTTP" in err


def test_receiver_survives_garbage_and_keeps_serving(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"RPLW" + b"\xff" * 60, b"\x00" * 4096):
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as s:
            s.sendall(garbage)
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\x02" * 131072)
    out = replicator(
        "send", "--to", receiver.address, "--job", "after", "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), str(disk),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (receiver.dir / "after" / "d.img").read_bytes() == disk.read_bytes()
    assert receiver.proc.poll() is None
