"""A sender cut right after its last frame, before the receiver's sync task ran: a real
`replicator receive` must apply the epoch that frame completes and promote it in a
`failover --force` through it, as the same folder at rest would. It used to keep the
epoch's barrier out of its applier until a sender shipped another one, so status and the
running failover stayed at the point before."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from replicator.engine.connectors import TcpConnector
from replicator.transport import PROTOCOL_VERSION, Ack, Hello, Welcome
from tests.engine.test_receiver_session_end import BLOCK, FIRST, SECOND, _epoch
from tests.tools import answer_to_hello, replicator, start_receiver, status_json


async def _ship_then_cut(port: int) -> None:
    """Epoch one, applied; then epoch two's frame and, at once, the end of the connection
    (a FIN right behind it: the receiver reads both before its sync task runs)."""
    conn = await TcpConnector("127.0.0.1", port).connect()
    try:
        await conn.send(Hello(PROTOCOL_VERSION, "job", (), ("lz4",), 0, "s"))
        assert isinstance(await answer_to_hello(conn), Welcome)
        await conn.send(_epoch(1, 1))
        while True:
            msg = await conn.recv(timeout=30)
            if isinstance(msg, Ack) and msg.applied_lsn >= FIRST:
                break
        await conn.send(_epoch(FIRST + 1, 2))
    finally:
        await conn.aclose()


def _point(target: Path) -> int:
    status = status_json(directory=target)
    assert status["source"] == "process", status  # the running receiver's view
    [job] = status["jobs"]
    lsn: int = job["consistency_point"]["lsn"]
    return lsn


def test_a_sender_cut_after_its_last_frame_loses_no_point(tmp_path: Path) -> None:
    target = tmp_path / "target"
    rcv = start_receiver(target, log=tmp_path / "receiver.log")
    try:
        asyncio.run(_ship_then_cut(rcv.port))
        deadline = time.monotonic() + 10
        while (point := _point(target)) < SECOND and time.monotonic() < deadline:
            time.sleep(0.2)
        out = replicator("failover", "--dir", str(target), "--job", "job", "--force", "--json")
        assert out.returncode == 0, out.stderr
        promoted = json.loads(out.stdout)["point_lsn"]
        assert (point, promoted) == (SECOND, SECOND), "status, failover: the point before"
    finally:
        assert rcv.stop() == 0
    assert (target / "job" / "d").read_bytes() == bytes([2]) * 2 * BLOCK
