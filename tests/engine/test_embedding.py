"""The embedding API (engine/api.py, docs/EMBEDDING.md): the example program as a real
process, and the façade's lifecycle, events, verify, failover and errors over loopback."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import pytest

from replicator.engine.api import (
    AuthError,
    ConfigError,
    ConnectError,
    EventKind,
    EventStream,
    ExitCode,
    MemoryConnector,
    Receiver,
    ReceiverConfig,
    RefusedError,
    Sender,
    SenderConfig,
    SplitBrainError,
    StatusEvent,
    TlsIdentity,
    resolve_volumes,
)
from replicator.engine.at_rest import sender_at_rest
from replicator.engine.control import SOCKET_NAME, request
from replicator.engine.keys import keygen
from replicator.engine.status import SenderJobStatus, SenderPhase
from tests.tools import ENV, free_port

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
WAIT = 30.0


def test_the_example_program_runs_a_pair_and_sees_a_lag_event() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embed_pair.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("lag event: ") for line in lines), out.stdout
    assert "verify disk.img: identical (16777216 bytes)" in lines
    summary = json.loads(lines[-1])
    assert summary["identical"] and summary["replica_matches"]
    assert summary["lag_records"] > 0 and summary["applied_lsn"] >= summary["journaled_lsn"]
    assert summary["running_after_verify"] and summary["sender_failure"] is None
    assert summary["receiver_events"][:2] == ["job", "connected"]
    assert "lag" in summary["receiver_events"]


@dataclass
class Setup:
    tmp: Path
    disk: Path
    receiver: Receiver

    def config(self, job: str = "vm1") -> SenderConfig:
        host, port = self.receiver.address
        return SenderConfig(host, port, job, resolve_volumes([self.disk]), self.tmp / "sstate")

    @property
    def replica(self) -> Path:
        return self.tmp / "replicas" / "vm1" / self.disk.name


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    config = ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate")
    async with Receiver(config) as receiver:
        yield Setup(tmp_path, disk, receiver)


async def until(events: EventStream, accept: Callable[[StatusEvent], bool]) -> StatusEvent:
    async with asyncio.timeout(WAIT):
        async for event in events:
            if accept(event):
                return event
    raise AssertionError("the events ended first")


def running(sender: Sender) -> bool:
    """Read afresh (mypy would keep an earlier ``assert sender.running`` narrowing)."""
    return sender.running


def caught_up(event: StatusEvent) -> bool:
    return event.kind is EventKind.LAG and event.lag.records == 0 and event.applied_lsn > 0


async def test_start_events_stop_and_aclose_twice(setup: Setup) -> None:
    sender = Sender(setup.config(), interval=0.2)
    events = sender.events()
    await sender.start()
    assert sender.running
    connected = await until(events, lambda e: e.kind is EventKind.CONNECTED)
    assert connected.job == "vm1" and connected.role == "sender"
    assert connected.snapshot["connected"] is True
    done = await until(events, caught_up)
    assert setup.replica.read_bytes() == setup.disk.read_bytes()
    # what the façade hands out is the engine's own state, read live
    assert sender.status is sender.engine.status and sender.config is sender.engine.config
    assert sender.status.state is SenderPhase.REPLICATING
    assert sender.status.link is not None and sender.status.link.applied_lsn >= done.applied_lsn
    snapshot = await sender.snapshot()
    assert snapshot["lsn"]["applied"] >= done.applied_lsn and snapshot["connected"]
    # the control socket `replicator status --state-dir` asks serves the same status
    answer = await asyncio.to_thread(request, setup.tmp / "sstate" / SOCKET_NAME, "status")
    assert answer["jobs"][0]["job"] == "vm1"
    assert answer["jobs"][0]["lsn"]["applied"] >= done.applied_lsn

    await sender.stop()
    assert not running(sender) and (await sender.snapshot())["state"] == SenderPhase.STOPPED
    stopped = await until(events, lambda e: e.kind is EventKind.STOPPED)
    assert stopped.error is None
    await sender.aclose()
    await sender.aclose()  # idempotent
    assert sender.closed and events.closed
    assert [e async for e in events] == []  # the stream ended
    assert not (setup.tmp / "sstate" / SOCKET_NAME).exists()
    with pytest.raises(RuntimeError, match="closed"):
        await sender.start()


async def test_a_write_is_a_lag_event_then_caught_up_and_verified(setup: Setup) -> None:
    async with Sender(setup.config(), interval=0.2) as sender, sender.events() as events:
        first = await until(events, caught_up)
        with setup.disk.open("r+b") as f:
            f.seek(MiB)
            f.write(os.urandom(MiB))
        lagging = await until(
            events,
            lambda e: (
                e.kind is EventKind.LAG
                and e.lag.records > 0
                and e.snapshot["lsn"]["journaled"] > first.applied_lsn + 1
            ),
        )
        journaled = lagging.snapshot["lsn"]["journaled"]
        assert lagging.applied_lsn < journaled and lagging.lag.seconds is not None
        await until(events, lambda e: caught_up(e) and e.applied_lsn >= journaled)
        assert setup.replica.read_bytes() == setup.disk.read_bytes()
        result = await sender.verify()  # a pause: the receiver serves one session per job
        assert result.identical and sender.running
        resumed = await until(events, lambda e: e.kind is EventKind.CONNECTED)
        assert resumed.snapshot["connected"]
    assert sender.failure is None


async def test_receiver_events_follow_sessions_and_applies(setup: Setup) -> None:
    events = setup.receiver.events()
    sender = Sender(setup.config(), control=False)
    summary = await sender.run_once()
    await sender.aclose()
    assert summary.lsn > 0 and summary.bytes_changed == 4 * MiB
    kinds: list[EventKind] = []
    async with asyncio.timeout(WAIT):
        async for event in events:
            kinds.append(event.kind)
            if event.kind is EventKind.DISCONNECTED:
                break
    assert kinds[:2] == [EventKind.JOB, EventKind.CONNECTED] and EventKind.LAG in kinds
    job = setup.receiver.status.jobs["vm1"]  # the engine's own status board
    assert (await job.snapshot())["lsn"]["applied"] == summary.lsn
    events.close()
    assert [e async for e in events] == []


async def test_a_receiver_with_metrics_and_its_stopped_event(tmp_path: Path) -> None:
    port = free_port()
    config = ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate")
    receiver = Receiver(config, metrics=("127.0.0.1", port))
    events = receiver.events()
    async with receiver:
        url = f"http://127.0.0.1:{port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        assert b'replicator_start_time_seconds{role="receiver"}' in body
        assert (tmp_path / "rstate" / SOCKET_NAME).exists()
    (stopped,) = [e async for e in events]
    assert stopped.kind is EventKind.STOPPED and stopped.job == "" and stopped.error is None
    assert not (tmp_path / "rstate" / SOCKET_NAME).exists()
    await receiver.aclose()  # idempotent


async def test_failover_then_the_sender_stops_with_split_brain(setup: Setup) -> None:
    once = Sender(setup.config(), control=False)
    await once.run_once()
    await once.aclose()
    result = await setup.receiver.failover("vm1")
    assert result.job == "vm1" and result.generation > result.previous_generation
    assert not result.already_promoted
    again = await setup.receiver.failover("vm1")  # idempotent
    assert again.already_promoted and again.generation == result.generation
    with pytest.raises(ConfigError, match="unknown job"):
        await setup.receiver.failover("nosuchjob")

    # demote: refused while a session (a failback's) holds the job, then done; once only
    replica = await setup.receiver.engine.job("vm1")
    async with replica.session_lock:
        with (
            patch("replicator.engine.receiver.DEMOTE_SESSION_WAIT", 0.2),
            pytest.raises(RefusedError, match="has a session"),
        ):
            await setup.receiver.demote("vm1")

    def promoted() -> bool:
        return replica.promotion is not None

    assert promoted()  # nothing demoted
    assert await setup.receiver.demote("vm1") == result.generation
    assert not promoted()
    with pytest.raises(ConfigError, match="not promoted"):
        await setup.receiver.demote("vm1")
    await setup.receiver.failover("vm1")  # promoted again, for what follows

    sender = Sender(setup.config(), interval=0.2)
    events = sender.events()
    with pytest.raises(SplitBrainError) as raised:
        async with sender:
            stopped = await until(events, lambda e: e.kind is EventKind.STOPPED)
            assert isinstance(stopped.error, SplitBrainError)
            assert not sender.running
    assert raised.value.exit_code is ExitCode.SPLIT_BRAIN
    assert sender.closed


async def test_the_state_folder_records_how_a_run_once_ended(setup: Setup) -> None:
    """`status` at rest says the last cycle failed (sender.json's record of it), also when
    the embedder caught the error and closed the Sender afterwards."""
    away = SenderConfig("127.0.0.1", free_port(), "vm1", setup.config().volumes, setup.tmp / "st")
    sender = Sender(away)
    with pytest.raises(ConnectError, match="cannot connect"):
        await sender.run_once()
    await sender.aclose()
    run = sender_at_rest(setup.tmp / "st")["jobs"][0]["last_run"]
    assert run["outcome"] == "failed" and run["exit_code"] == ExitCode.CONNECT, run
    assert "cannot connect to receiver" in run["error"]
    again = SenderConfig(*setup.receiver.address, "vm1", away.volumes, setup.tmp / "st")
    async with Sender(again, control=True) as sender:
        pass  # started and stopped: nothing failed
    assert sender_at_rest(setup.tmp / "st")["jobs"][0]["last_run"]["outcome"] == "ok"


async def test_bad_configuration_is_a_config_error(setup: Setup, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as bad_name:
        Sender(setup.config(job="../escape"))
    assert bad_name.value.exit_code is ExitCode.CONFIG
    with pytest.raises(ConfigError, match="interval"):
        Sender(setup.config(), interval=0)
    # a second receiver on the same folders: they are the first one's
    second = Receiver(ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate"))
    with pytest.raises(ConfigError, match="already runs"):
        await second.start()
    assert second.closed
    await second.aclose()
    # a replica folder that cannot be made
    (tmp_path / "file").write_text("not a folder")
    unusable = Receiver(ReceiverConfig(tmp_path / "file" / "replicas", tmp_path / "r2"))
    with pytest.raises(ConfigError, match="cannot create replica folder"):
        async with unusable:
            pass
    # an address in use
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = Receiver(ReceiverConfig(tmp_path / "r3", tmp_path / "s3"), port=port)
        with pytest.raises(ConfigError, match="cannot listen"):
            await busy.start()
    # a sender whose state folder another sender holds
    async with Sender(setup.config(), interval=60) as first:
        other = Sender(setup.config())
        with pytest.raises(ConfigError, match="already runs"):
            await other.start()
        assert first.running
        await other.aclose()


async def test_mutual_tls_and_a_refused_certificate(tmp_path: Path) -> None:
    keys, other = tmp_path / "keys", tmp_path / "other"
    await asyncio.to_thread(keygen, keys, ["sender", "receiver"])
    await asyncio.to_thread(keygen, other, ["sender"])  # another CA
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(MiB))
    server = TlsIdentity(keys, "receiver", server=True)
    server.load()
    config = ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate")
    async with Receiver(config, tls=server) as receiver:
        host, port = receiver.address
        job = SenderConfig(host, port, "vm1", resolve_volumes([disk]), tmp_path / "s1")
        sender = Sender(job, tls=TlsIdentity(keys, "sender", server=False), control=False)
        summary = await sender.run_once()
        await sender.aclose()
        assert summary.bytes_changed == MiB
        assert (tmp_path / "replicas" / "vm1" / "disk.img").read_bytes() == disk.read_bytes()
        stranger = SenderConfig(host, port, "vm1", resolve_volumes([disk]), tmp_path / "s2")
        refused = Sender(stranger, tls=TlsIdentity(other, "sender", server=False))
        with pytest.raises(AuthError) as raised:
            async with refused:
                await refused.wait()
        assert raised.value.exit_code is ExitCode.AUTH and refused.failure is raised.value


async def test_a_connector_passed_in_is_used_and_left_to_the_caller(setup: Setup) -> None:
    connector = MemoryConnector(setup.receiver.engine.handle)  # no port: an in-process pair
    try:
        with pytest.raises(ConfigError, match="connector"):
            Sender(setup.config(), connector=connector, tls=ssl.create_default_context())
        sender = Sender(setup.config(), connector=connector, control=False)
        summary = await sender.run_once()
        await sender.aclose()
        assert summary.lsn > 0 and connector.connections == 1
        assert setup.replica.read_bytes() == setup.disk.read_bytes()
        again = Sender(setup.config(), connector=connector, control=False)
        result = await again.verify()  # the connector still serves: not closed by aclose()
        await again.aclose()
        assert result.identical and connector.connections == 2
    finally:
        await connector.aclose()


def test_a_failing_listener_does_not_stop_the_engine_or_other_listeners() -> None:
    status = SenderJobStatus("vm1", "scan", "memory")
    told: list[tuple[str, str]] = []

    def broken(job: str, what: str) -> None:
        raise ValueError("a bug in the embedder's callback")

    status.listeners.add(broken)
    stop = status.listeners.add(lambda job, what: told.append((job, what)))
    status.set_state(SenderPhase.CONNECTING)
    status.set_state(SenderPhase.CONNECTING)  # no change: nobody told
    status.error("connect", "refused")
    stop()
    status.set_state(SenderPhase.STOPPED)
    assert status.state is SenderPhase.STOPPED
    assert told == [("vm1", "state"), ("vm1", "error")]
