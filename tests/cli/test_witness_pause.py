"""A source frozen (SIGSTOP) past its fence while its link to the target is cut: the
witness grants the target, and the source, resumed, acknowledges not one write more
(docs/WITNESS.md, "Fencing"). Real `replicator witness`, `receive --auto-failover-after`
and `send --capture nbd --witness`, a WAN emulator between the sender and the receiver,
and a raw NBD client writing all along, which notes when each write was acknowledged."""

from __future__ import annotations

import datetime
import json
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from tests.cli.test_network_faults import ProxyThread
from tests.cli.test_witness import (  # noqa: F401
    LEASE,
    declared,
    procs,
    receiver_job,
    start_witness,
    wait_for,
    witness_replica,
)
from tests.cli.test_witness_fence import sender_job
from tests.tools import ENV, REPLICATOR, LoggedPopen, qemu_img, start_receiver, stop_and_read

pytestmark = pytest.mark.long


class Writer(threading.Thread):
    """4 KiB writes one after another through the export, each its number, at 4 KiB * i;
    ``acked``: (number, wall-clock time of its acknowledgement) of those that succeeded,
    ``failed``: the numbers answered with an error."""

    def __init__(self, sock: Path, export: str) -> None:
        super().__init__(daemon=True)
        self.conn = socket.socket(socket.AF_UNIX)
        self.conn.connect(str(sock))
        self.conn.settimeout(60)
        self.export = export.encode()
        self.acked: list[tuple[int, float]] = []
        self.failed: list[int] = []
        self.stop = threading.Event()

    def _exactly(self, n: int) -> bytes:
        got = b""
        while len(got) < n:
            chunk = self.conn.recv(n - len(got))
            if not chunk:
                raise EOFError
            got += chunk
        return got

    def run(self) -> None:
        self._exactly(18)  # NBDMAGIC, IHAVEOPT, handshake flags
        self.conn.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        self.conn.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(self.export)) + self.export)
        self._exactly(10)  # size, transmission flags
        i = 0
        try:
            while not self.stop.is_set():
                data = struct.pack(">I", i) * 1024
                self.conn.sendall(
                    struct.pack(">IHHQQI", 0x25609513, 0, 1, i, i * 4096, 4096) + data
                )
                _, error, _ = struct.unpack(">IIQ", self._exactly(16))
                if error:
                    self.failed.append(i)
                else:
                    self.acked.append((i, time.time()))
                i += 1
                time.sleep(0.02)
        except (EOFError, OSError):
            pass  # the sender stopped: its export is gone


def test_a_frozen_source_resumed_after_the_grant_acknowledges_nothing(
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],  # noqa: F811
) -> None:
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    auto = ("--insecure", "--auto-failover-after", "1", "--witness", address)
    log = tmp_path / "receiver.log"
    rcv = start_receiver(tmp_path / "target", log=log, security=auto)
    procs.append(rcv.proc)
    link = ProxyThread(("127.0.0.1", rcv.port))
    image = tmp_path / "vm1.img"
    qemu_img("create", "-q", "-f", "raw", str(image), "64M")
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    sender = LoggedPopen(
        [*REPLICATOR, "send", "--to", f"127.0.0.1:{link.address[1]}", "--job", "vm1",
         "--state-dir", str(state), "--capture", "nbd", "--nbd-socket", str(sock),
         "--insecure", "--interval", "0.2", "--witness", address, *LEASE, str(image)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    procs.append(sender)
    assert wait_for(lambda: (sender_job(state) or {}).get("state") == "replicating", 30)
    # declared in a renewal sent as the session begins, which may still be on its way when
    # the sender says "replicating": frozen before it lands, the source leaves the witness
    # refusing every copy (rightly), and no grant comes
    assert wait_for(declared(tmp_path, address, rcv), 30), witness_replica(tmp_path, address)
    assert wait_for(sock.exists, 60)  # served after "replicating" is said, not before
    writer = Writer(sock, "vm1.img")
    writer.start()
    # writing all along: frozen while its writes go on
    assert wait_for(lambda: len(writer.acked) >= 10, 30), "the writes are not acknowledged"

    sender.send_signal(signal.SIGSTOP)  # frozen, and cut off from the target
    link.call(lambda: link.wan.refuse(True))
    link.call(lambda: link.wan.reset())
    assert wait_for(lambda: receiver_job(rcv)["promoted"] is True, 20), receiver_job(rcv)
    time.sleep(1)
    sender.send_signal(signal.SIGCONT)
    _, err = sender.communicate(timeout=30)
    assert sender.returncode == ExitCode.SPLIT_BRAIN, err[-2000:]
    writer.stop.set()
    writer.join(timeout=30)

    code, out = stop_and_read(witness)
    assert code == 0, out[-2000:]
    granted = [
        datetime.datetime.fromisoformat(event["timestamp"]).timestamp()
        for event in (json.loads(line) for line in out.splitlines() if line.startswith("{"))
        if event.get("event") == "witness.granted"
    ]
    assert len(granted) == 1, out[-2000:]
    assert writer.acked, "no write was acknowledged before the freeze"
    last = writer.acked[-1][1]
    assert last < granted[0], f"acknowledged {last - granted[0]:.3f}s after the grant"
    assert writer.failed, "the write held over the freeze was not failed"
    assert rcv.stop() == 0
