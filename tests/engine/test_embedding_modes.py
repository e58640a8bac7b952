"""The embedding API's choices beyond scan capture (engine/api.py, docs/EMBEDDING.md):
bandwidth shaping, NBD capture and failback, each in this one process over loopback with
real files (the NBD client is the tests' raw one, on the façade's own socket)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from replicator.engine.api import (
    ConfigError,
    EventKind,
    Receiver,
    ReceiverConfig,
    Sender,
    SenderConfig,
    nbd_options,
    resolve_volumes,
    shaping_from,
)
from replicator.engine.control import SOCKET_NAME, request
from replicator.engine.nbd.proto import Cmd
from replicator.engine.status import SenderPhase
from tests.engine.test_embedding import WAIT, Setup, caught_up, until
from tests.nbd.helpers import RawClient

MiB = 1024 * 1024
POLL = 0.05


async def eventually(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    """Wait (at most WAIT seconds) until ``check`` holds."""
    for _ in range(int(WAIT / POLL)):
        if await check():
            return
        await asyncio.sleep(POLL)
    raise AssertionError(f"{what}: not within {WAIT} s")


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(2 * MiB))  # random: lz4 cannot shrink what is shaped
    config = ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate")
    async with Receiver(config) as receiver:
        yield Setup(tmp_path, disk, receiver)


async def test_shaping_caps_the_wire_and_the_rate_op_changes_it(setup: Setup) -> None:
    with pytest.raises(ConfigError, match="--rate"):
        shaping_from(rate="fast")
    shaping = shaping_from(rate="1MiB/s")
    sender = Sender(setup.config(), shaping=shaping)
    try:
        started = time.monotonic()
        summary = await sender.run_once()
        took = time.monotonic() - started
        assert (
            summary.wire_bytes > 2 * MiB and setup.replica.read_bytes() == setup.disk.read_bytes()
        )
        assert took >= 1.5, f"2 MiB at 1 MiB/s took {took:.2f} s"  # the bucket shaped it
        snapshot = await sender.snapshot()
        assert snapshot["shaping"]["rate_bytes_per_second"] == MiB
        assert snapshot["shaping"]["bytes_shaped"] >= 2 * MiB
        # `replicator rate --state-dir` reaches it through the control socket
        sock = setup.tmp / "sstate" / SOCKET_NAME
        answer = await asyncio.to_thread(request, sock, "rate", rate="unlimited")
        assert answer["source"] == "manual" and shaping.rate is None
        with setup.disk.open("r+b") as f:
            f.write(os.urandom(2 * MiB))
        started = time.monotonic()
        await sender.run_once()
        assert time.monotonic() - started < 1.5  # unlimited now
        assert setup.replica.read_bytes() == setup.disk.read_bytes()
    finally:
        await sender.aclose()
    with pytest.raises(ConfigError, match="connector"):
        Sender(setup.config(), shaping=shaping, connector=sender.engine.connector)


async def test_a_target_rpo_is_paced_without_the_control_socket(setup: Setup) -> None:
    shaping = shaping_from(target_rpo="30")
    sender = Sender(setup.config(), shaping=shaping, control=False, interval=0.2)
    try:
        assert (await sender.snapshot())["shaping"]["rpo"]["pace_bytes_per_second"] is None
        async with sender.events() as events:
            await sender.start()  # the pacer runs from here on: it reads the job's lag
            await until(events, caught_up)

        async def paced() -> bool:
            return (await sender.snapshot())["shaping"]["rpo"]["pace_bytes_per_second"] is not None

        await eventually("a pace", paced)  # the pacer's first ticks (every 0.25 s) set one
        assert (await sender.snapshot())["shaping"]["rpo"]["target_seconds"] == 30
        assert setup.replica.read_bytes() == setup.disk.read_bytes()
    finally:
        await sender.aclose()


async def test_nbd_capture_journals_writes_and_the_replica_follows(setup: Setup) -> None:
    sock = setup.tmp / "nbd.sock"
    sender = Sender(setup.config(), nbd=nbd_options(sock), interval=3600)
    events = sender.events()
    try:
        with pytest.raises(RuntimeError, match="run_once"):
            await sender.run_once()
        await sender.start()
        await until(events, caught_up)  # the initial sync, before the exports serve
        assert setup.replica.read_bytes() == setup.disk.read_bytes()
        assert (await sender.snapshot())["capture"] == "nbd"

        async def serving() -> bool:
            return sock.exists()

        await eventually("the NBD socket", serving)
        client = await RawClient.open(str(sock), setup.disk.name)
        data = os.urandom(128 * 1024)
        assert await client.request(Cmd.WRITE, 512 * 1024, len(data), data) == (0, b"")
        assert await client.request(Cmd.FLUSH) == (0, b"")
        # no scan runs (interval: an hour): the write reaches the replica as it was journaled

        async def replicated() -> bool:
            return setup.replica.read_bytes()[512 * 1024 : 640 * 1024] == data

        await eventually("the write on the replica", replicated)
        with pytest.raises(RuntimeError, match="NBD exports"):
            await sender.verify()
        client.writer.close()
        await sender.stop()
        stopped = await until(events, lambda e: e.kind is EventKind.STOPPED)
        assert stopped.error is None
        assert setup.replica.read_bytes() == setup.disk.read_bytes()
        result = await sender.verify()  # stopped: the files are the façade's to compare
        assert result.identical
    finally:
        await sender.aclose()
    with pytest.raises(ConfigError, match="needs at least one disk image"):
        xml = setup.tmp / "vm.xml"
        xml.write_text("<domain/>")
        config = SenderConfig("127.0.0.1", 1, "x", resolve_volumes([xml]), setup.tmp / "x")
        Sender(config, nbd=nbd_options(sock))


async def test_an_nbd_sender_says_replicating_only_once_its_export_listens(setup: Setup) -> None:
    """An HA controller starts the VM when the state says "replicating": at that moment
    (the listener is called inline, on the loop) the export's socket takes a connection."""
    sock = setup.tmp / "nbd.sock"
    sender = Sender(setup.config(), nbd=nbd_options(sock), interval=3600)
    events = sender.events()
    seen: list[str] = []

    def on_change(job: str, what: str) -> None:
        if what != "state" or sender.status.state is not SenderPhase.REPLICATING:
            return
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
            except OSError as exc:
                seen.append(f"not listening: {exc}")
            else:
                seen.append("listening")

    sender.status.listeners.add(on_change)
    try:
        await sender.start()
        await until(events, lambda e: e.state == "replicating")
        assert seen and set(seen) == {"listening"}, seen
        client = await RawClient.open(str(sock), setup.disk.name)
        assert await client.request(Cmd.FLUSH) == (0, b"")
        client.writer.close()
    finally:
        await sender.aclose()


async def test_failback_after_a_failover_then_replication_resumes(setup: Setup) -> None:
    sender = Sender(setup.config(), control=False)
    try:
        await sender.run_once()
        await setup.receiver.failover("vm1")
        # the VM ran on the target: the promoted replica changed there
        promoted = os.urandom(64 * 1024)
        with setup.replica.open("r+b") as f:
            f.seek(MiB)
            f.write(promoted)
        result = await sender.failback()
        assert result.job == "vm1" and result.bytes_moved == 64 * 1024
        assert setup.disk.read_bytes() == setup.replica.read_bytes()
        # the target is a replica again: replication resumes, no full copy
        with setup.disk.open("r+b") as f:
            f.write(b"\7" * 4096)
        summary = await sender.run_once()
        assert summary.basis == "local" and summary.bytes_changed == 64 * 1024
        assert setup.replica.read_bytes() == setup.disk.read_bytes()
    finally:
        await sender.aclose()


def test_wait_for_receiver_is_refused_without_nbd_capture(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(65536))
    config = SenderConfig(
        "127.0.0.1", 1, "x", resolve_volumes([disk]), tmp_path / "state", wait_for_receiver=5
    )
    with pytest.raises(ConfigError, match="wait_for_receiver applies to nbd capture"):
        Sender(config)
