"""A real ``replicator receive`` fed by a sender whose clock is wrong (tests/hostile_sender.py
stamps its Pings and records as a host an hour off would): the target's lag is the age of
the replica's data on the target's clock, live and at rest, never an hour, never negative,
and never near 0 for data that arrived late (a backlog)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from replicator.journal import Record
from replicator.transport import Ack, Goodbye, Ping, Pong, Welcome
from replicator.transport.messages import CAP_WALL_CLOCK
from tests import hostile_sender
from tests.tools import (
    ENV,
    REPLICATOR,
    ReceiverProc,
    qemu_img,
    qemu_io,
    replicator,
    require_tool,
    start_receiver,
    status_json,
)

HOUR = 3600.0


async def _point(
    port: int, job: str, *, skew: float, age: float, capabilities: tuple[str, ...]
) -> None:
    """One session of ``job`` from a source whose clock is ``skew`` seconds off ours: a
    Ping stamped with that clock, then a write and a FLUSH stamped ``age`` seconds ago on
    it (data that waited in a backlog); returns once the receiver has applied them."""
    conn, welcome = await hostile_sender.hello(port, job, capabilities=capabilities)
    assert isinstance(welcome, Welcome), welcome
    try:
        await conn.send(Ping(1, time.time_ns() + int(skew * 1e9)))
        stamp = time.time_ns() + int((skew - age) * 1e9)
        records = [Record.write("disk.img", 0, b"\x5a" * 4096), Record.flush()]
        frame = hostile_sender.frame(records, welcome.received_lsn + 1, stamp)
        await conn.send(frame)
        async with asyncio.timeout(30):
            while True:
                msg = await conn.recv()
                if isinstance(msg, Ping):
                    await conn.send(Pong(msg.nonce, msg.ts_ns))
                elif isinstance(msg, Ack) and msg.applied_lsn >= frame.last_lsn:
                    break
        await conn.send(Goodbye("done"))
    finally:
        await conn.aclose()


def _job(rcv: ReceiverProc, job: str) -> dict[str, Any]:
    answer = status_json(directory=rcv.dir)
    (entry,) = [j for j in answer["jobs"] if j["job"] == job]
    assert isinstance(entry, dict)
    return entry


@pytest.mark.parametrize("skew", [-HOUR, HOUR], ids=["source-behind", "source-ahead"])
def test_a_source_clock_an_hour_off_shows_the_data_age_not_the_hour(
    tmp_path: Path, skew: float
) -> None:
    """A source an hour behind made the target's lag read an hour; an hour ahead, -3600 s.
    The lag now counts on the target's clock, from the source's stamp less the offset its
    Pings show: seconds, live and at rest; status shows the offset, the log says to fix
    NTP."""
    log = tmp_path / "receiver.log"
    rcv = start_receiver(tmp_path / "target", log=log)
    try:
        asyncio.run(_point(rcv.port, "vm", skew=skew, age=0.0, capabilities=(CAP_WALL_CLOCK,)))
        live = _job(rcv, "vm")
    finally:
        assert rcv.stop() == 0
    rest = _job(rcv, "vm")
    assert rest["source"] == "files"
    for entry in (live, rest):
        assert entry["lsn"]["applied"] == 2 and entry["consistency_point"]["consistent"]
        assert 0 <= entry["lag"]["seconds"] < 60, entry["lag"]
    assert live["source_clock_offset_seconds"] == pytest.approx(skew, abs=30)
    said = log.read_text()
    assert "receiver.source_clock_offset" in said and "NTP" in said
    # a failover's RPO bound is counted the same way, and kept in promoted.state
    out = replicator("failover", "--dir", str(rcv.dir), "--job", "vm", "--force", "--json")
    assert out.returncode == 0, out.stderr
    assert 0 <= json.loads(out.stdout)["missing_seconds"] < 60, out.stdout
    promotion = _job(rcv, "vm")["promotion"]
    assert 0 <= promotion["missing_seconds"] < 60, promotion


def test_late_data_from_a_skewed_source_reads_its_age_not_zero(tmp_path: Path) -> None:
    """A backlog: the source (an hour behind) stamped a point 40 s before it reached the
    target. Its lag is the data's age, about 40 s: not the hour of the clocks, and not the
    near 0 of "seconds since this target applied the point" (the understatement a lag
    must never make)."""
    rcv = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    try:
        asyncio.run(_point(rcv.port, "vm", skew=-HOUR, age=40.0, capabilities=(CAP_WALL_CLOCK,)))
        live = _job(rcv, "vm")
    finally:
        assert rcv.stop() == 0
    rest = _job(rcv, "vm")
    for entry in (live, rest):
        assert 40 <= entry["lag"]["seconds"] < 100, entry["lag"]


def test_a_sender_that_does_not_send_its_clock_never_shows_a_negative_lag(
    tmp_path: Path,
) -> None:
    """A sender without the ``wall-clock`` capability (protocol 6 from before it): its
    Pings say nothing of its clock, the lag counts from its stamp as before, but a stamp
    from the future (an hour ahead) reads as the time since the point was applied, not
    -3600 s; no offset is claimed."""
    rcv = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    try:
        asyncio.run(_point(rcv.port, "vm", skew=HOUR, age=0.0, capabilities=()))
        live = _job(rcv, "vm")
    finally:
        assert rcv.stop() == 0
    rest = _job(rcv, "vm")
    assert live["source_clock_offset_seconds"] is None
    for entry in (live, rest):
        assert 0 <= entry["lag"]["seconds"] < 60, entry["lag"]


def test_a_real_sender_an_hour_behind_under_faketime(tmp_path: Path) -> None:
    """`replicator send --once` run with its clock an hour behind (libfaketime, uvloop and
    all): the target's lag is the seconds of the sync, not an hour."""
    faketime = require_tool("faketime")
    disk = tmp_path / "disk.img"
    qemu_img("create", "-q", "-f", "raw", str(disk), "16M")
    qemu_io("raw", disk, "write -P 0x11 0 4M")
    rcv = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    try:
        out = subprocess.run(
            [faketime, "-f", "-3600s", *REPLICATOR, "send", "--to", rcv.address, "--job", "vm",
             "--state-dir", str(tmp_path / "state"), "--once", "--insecure", str(disk)],
            capture_output=True, text=True, timeout=120, env=ENV,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        live = _job(rcv, "vm")
    finally:
        assert rcv.stop() == 0
    assert 0 <= live["lag"]["seconds"] < 60, live["lag"]
    assert live["source_clock_offset_seconds"] == pytest.approx(-HOUR, abs=30)
    assert 0 <= _job(rcv, "vm")["lag"]["seconds"] < 60


def test_a_receiver_held_up_reads_the_age_of_what_it_applied_late(tmp_path: Path) -> None:
    """A backlog, clocks right: the receiver is held (SIGSTOP) for 4 s while a point
    waits in its socket, then applies it. The lag is the point's age, 4 s and more, not
    the near 0 of "since applied"."""
    rcv = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    try:

        async def held() -> None:
            conn, welcome = await hostile_sender.hello(
                rcv.port, "vm", capabilities=(CAP_WALL_CLOCK,)
            )
            assert isinstance(welcome, Welcome), welcome
            try:
                await conn.send(Ping(1, time.time_ns()))
                await asyncio.sleep(0.5)  # the Ping is read before the receiver is held
                rcv.proc.send_signal(signal.SIGSTOP)
                try:
                    records = [Record.write("disk.img", 0, b"\x5a" * 4096), Record.flush()]
                    frame = hostile_sender.frame(records, 1, time.time_ns())
                    await conn.send(frame)
                    await asyncio.sleep(4)
                finally:
                    rcv.proc.send_signal(signal.SIGCONT)
                async with asyncio.timeout(30):
                    while True:
                        msg = await conn.recv()
                        if isinstance(msg, Ping):
                            await conn.send(Pong(msg.nonce, msg.ts_ns))
                        elif isinstance(msg, Ack) and msg.applied_lsn >= frame.last_lsn:
                            break
                await conn.send(Goodbye("done"))
            finally:
                await conn.aclose()

        asyncio.run(held())
        live = _job(rcv, "vm")
    finally:
        assert rcv.stop() == 0
    assert live["lsn"]["applied"] == 2
    assert 4 <= live["lag"]["seconds"] < 60, live["lag"]
    assert abs(live["source_clock_offset_seconds"]) < 1
