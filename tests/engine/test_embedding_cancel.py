"""The embedding API under cancellation (engine/api.py, docs/EMBEDDING.md, "Lifecycle"):
an embedder's ``asyncio.timeout()`` or task cancellation reaches the façade at any await,
and must neither be swallowed (the caller's task would carry on as if not cancelled) nor
leave the job broken (a run still holding the state folder, a sender that stopped
replicating, a control socket left behind)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from replicator.engine.api import (
    EventKind,
    Receiver,
    ReceiverConfig,
    Sender,
)
from replicator.engine.control import SOCKET_NAME
from tests.engine.test_embedding import Setup, caught_up, until
from tests.nbd.helpers import loop_policy

MiB = 1024 * 1024


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """The embedder's loop is either (the CLI runs on uvloop): both are cancelled alike."""
    return loop_policy(request.param)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    config = ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate")
    async with Receiver(config) as receiver:
        yield Setup(tmp_path, disk, receiver)


def api_tasks() -> list[str]:
    """The sender façade's tasks still alive on this loop (not the receiver's, which runs
    on: ``api-applies-JOB``)."""
    names = (t.get_name() for t in asyncio.all_tasks())
    return sorted(n for n in names if n.startswith("api-") and not n.startswith("api-applies"))


def scribble(disk: Path) -> None:
    with disk.open("r+b") as f:
        f.seek(MiB)
        f.write(os.urandom(MiB))


async def test_a_timeout_around_verify_leaves_the_sender_replicating(setup: Setup) -> None:
    """``asyncio.timeout()`` cut the verify's pause short: the pause swallowed the
    cancellation, verify then found the state folder still held by the run it was
    stopping (a ConfigError naming another sender) and the run it restarted failed the
    same way: replication ended for good."""
    async with Sender(setup.config(), interval=0.2) as sender, sender.events() as events:
        await until(events, caught_up)
        scribble(setup.disk)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0):  # delivered at the pause's first wait
                await sender.verify()
        assert sender.running and sender.failure is None
        # the run resumes after the one stopped: the write is shipped and applied
        await until(events, lambda e: e.kind is EventKind.CONNECTED)
        await until(events, caught_up)
        result = await sender.verify()
        assert result.identical and sender.running and sender.failure is None
    assert sender.failure is None


async def test_a_cancelled_aclose_releases_everything_then_propagates(setup: Setup) -> None:
    """Cancelling ``aclose()`` (Ctrl-C while the embedder shuts down) was swallowed: the
    caller's task carried on as if not cancelled."""
    sender = Sender(setup.config(), interval=0.2)
    events = sender.events()
    await sender.start()
    await until(events, caught_up)
    scribble(setup.disk)
    closing = asyncio.get_running_loop().create_task(sender.aclose())
    await asyncio.sleep(0)  # aclose() is in its graceful stop
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    # cut short, but everything is released: no task, no socket, the folder free at once
    assert sender.closed and not sender.running and api_tasks() == []
    assert not (setup.tmp / "sstate" / SOCKET_NAME).exists()
    await sender.aclose()  # idempotent after a cancelled one
    again = Sender(setup.config())
    try:
        await again.run_once()  # ships what the cut-short stop left in the journal
    finally:
        await again.aclose()
    assert setup.replica.read_bytes() == setup.disk.read_bytes()


async def test_a_cancelled_stop_propagates_and_start_waits_for_its_run(setup: Setup) -> None:
    """A cancelled ``stop()`` was swallowed (the caller's task carried on); the run it
    asked to stop finishes stopping, and ``start()`` then waits for it instead of saying
    the Sender is already running or failing on the state folder it still holds."""
    async with Sender(setup.config(), interval=0.2) as sender, sender.events() as events:
        await until(events, caught_up)
        stopping = asyncio.get_running_loop().create_task(sender.stop())
        await asyncio.sleep(0)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        await sender.start()  # waits for the stopping run, then starts anew
        assert sender.running
        scribble(setup.disk)
        await until(events, lambda e: e.kind is EventKind.CONNECTED)
        await until(events, caught_up)
        assert sender.failure is None
    assert sender.failure is None and api_tasks() == []


async def test_a_cancelled_receiver_aclose_releases_then_propagates(tmp_path: Path) -> None:
    """Cancelling ``Receiver.aclose()`` while it ended a sender's session was swallowed
    (the engine waits for its sessions ignoring cancellation): the caller carried on."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 * MiB))
    config = ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate")
    receiver = Receiver(config)
    await receiver.start()
    setup = Setup(tmp_path, disk, receiver)
    async with Sender(setup.config(), interval=0.2) as sender, sender.events() as events:
        await until(events, caught_up)  # a session is open
        closing = asyncio.get_running_loop().create_task(receiver.aclose())
        await asyncio.sleep(0)  # aclose() waits for the session to end
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert receiver.closed and not (tmp_path / "rstate" / SOCKET_NAME).exists()
        await receiver.aclose()  # idempotent after a cancelled one
        # the folders are free at once: a new receiver takes them, the sender reconnects
        config = ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate")
        async with Receiver(config) as again:
            assert again.address
    assert sender.failure is None


async def test_wait_goes_on_through_a_verify_pause(setup: Setup) -> None:
    """``wait()`` (until the continuous run ends: stop() or an error) returned when a
    verify() of another task paused the run, as if replication had ended."""
    async with Sender(setup.config(), interval=0.2) as sender, sender.events() as events:
        await until(events, caught_up)
        waiting = asyncio.get_running_loop().create_task(sender.wait())
        await asyncio.sleep(0)
        result = await sender.verify()
        await asyncio.sleep(0.1)
        assert result.identical and sender.running and not waiting.done()
        await sender.stop()
        async with asyncio.timeout(5):
            await waiting  # the run ended: stop()
