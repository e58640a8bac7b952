"""What the embedding API raises (engine/api.py, docs/EMBEDDING.md, "Errors and exit
codes"): a ``ReplicatorError`` with its exit code and what to do next, never a raw
OSError, KeyError or ExceptionGroup from deep in the engine."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from unittest.mock import patch

import pytest
import structlog.testing

from replicator.engine.api import (
    ConfigError,
    ExitCode,
    Receiver,
    ReceiverConfig,
    RefusedError,
    ReplicatorError,
    Sender,
    StorageError,
    _Tasks,
)
from tests.engine.test_embedding import Setup

MiB = 1024 * 1024


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(MiB))
    config = ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate")
    async with Receiver(config) as receiver:
        yield Setup(tmp_path, disk, receiver)


async def test_a_disk_gone_since_the_configuration_is_named_as_send_names_it(
    setup: Setup,
) -> None:
    """A disk removed (or replaced by a folder) after ``resolve_volumes`` came out of
    run_once(), verify() and failback() as a raw FileNotFoundError / IsADirectoryError,
    and ended a started run as an opaque 'local storage error'."""
    sender = Sender(setup.config())
    try:
        await sender.run_once()
        setup.disk.rename(setup.tmp / "away.img")
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "run_once": sender.run_once,
            "verify": sender.verify,
            "failback": sender.failback,
            "start": sender.start,
        }
        for name, call in calls.items():
            with pytest.raises(ConfigError, match="does not exist") as raised:
                await call()
            assert str(setup.disk) in str(raised.value), name
            assert raised.value.exit_code is ExitCode.CONFIG, name
            assert not sender.running
        setup.disk.mkdir()
        with pytest.raises(ConfigError, match="not a regular file"):
            await sender.run_once()
        setup.disk.rmdir()
        (setup.tmp / "away.img").rename(setup.disk)
        assert (await sender.verify()).identical  # back: all is well again
    finally:
        await sender.aclose()


async def test_what_the_engine_raises_raw_is_mapped(setup: Setup) -> None:
    """An OSError is a StorageError (exit code 9) as the CLI says it; anything else not
    ours is an internal error with the CLI's exit code for a bug (70), its cause kept."""
    sender = Sender(setup.config(), control=False)
    try:
        failing = OSError(errno.EIO, "Input/output error")
        with (
            patch.object(sender.engine, "run_once", side_effect=failing),
            pytest.raises(StorageError, match="Input/output error") as storage,
        ):
            await sender.run_once()
        assert storage.value.exit_code is ExitCode.STORAGE
        bug = KeyError("epoch")
        with (
            patch("replicator.engine.api.verify", side_effect=ExceptionGroup("tg", [bug])),
            pytest.raises(ReplicatorError, match="internal error: KeyError") as internal,
        ):
            await sender.verify()
        assert internal.value.exit_code is ExitCode.BUG
        assert isinstance(internal.value.__cause__, KeyError)
    finally:
        await sender.aclose()


async def test_a_second_sender_on_a_state_folder_is_refused_not_the_first(
    setup: Setup,
) -> None:
    """Without the control socket's claim (``control=False``) a second Sender on the
    same state folder started, or ran a cycle, unchallenged: between the first one's
    start() and its run it took the folder, and the first one's run failed."""
    first = Sender(setup.config(), interval=0.2, control=False)
    second = Sender(setup.config(), control=False)
    try:
        await first.start()  # its run has not begun yet: the folder is not locked
        with pytest.raises(ConfigError, match="a Sender of this process") as raised:
            await second.run_once()
        assert raised.value.exit_code is ExitCode.CONFIG and "'vm1'" in str(raised.value)
        for call in (second.start, second.verify, second.failback):
            with pytest.raises(ConfigError, match="a Sender of this process"):
                await call()
        assert not second.running
        await first.stop()  # stopped but open: the folder is still the first one's
        with pytest.raises(ConfigError, match="a Sender of this process"):
            await second.run_once()
        assert first.failure is None
    finally:
        await first.aclose()
    summary = await second.run_once()  # the first one closed: the folder is free
    assert summary.lsn > 0 and setup.replica.read_bytes() == setup.disk.read_bytes()
    del second, call, raised  # dropped without aclose(), its calls over: it lets go
    gc.collect()
    third = Sender(setup.config(), control=False)
    try:
        assert (await third.verify()).identical
    finally:
        await third.aclose()


async def test_a_background_task_that_fails_is_logged_at_once() -> None:
    """The façade's background tasks (a run, the event followers, shaping) each handle
    what they expect; one that raises anyway is a bug, said in the log when it happens,
    not swallowed at close (nor left to asyncio's "never retrieved" at collection)."""
    tasks = _Tasks()

    async def broken() -> None:
        raise KeyError("a bug")

    with structlog.testing.capture_logs() as logs:
        await asyncio.wait({tasks.start(broken(), "api-broken")})
        await asyncio.sleep(0)  # the done callback
    failed = [entry for entry in logs if entry["event"] == "api.task_failed"]
    assert len(failed) == 1 and failed[0]["task"] == "api-broken"
    assert isinstance(failed[0]["exc_info"], KeyError)
    await tasks.cancel()


async def test_asking_a_failed_sender_again_and_again_keeps_its_traceback(
    setup: Setup,
) -> None:
    """Each ``raise`` of one exception object adds the raising frames to its traceback
    (which keep their locals): a controller calling ``wait()`` on a failed Sender in a
    loop grew ``failure.__traceback__`` by two entries a call, for good."""
    sender = Sender(setup.config(), control=False)
    refusal = RefusedError("receiver refused (config): no such job here")
    with patch.object(sender.engine, "run_forever", side_effect=refusal):
        await sender.start()
        for _ in range(50):
            with pytest.raises(RefusedError):
                await sender.wait()
    with pytest.raises(RefusedError):
        await sender.stop()
    assert sender.failure is refusal
    entries, tb = 0, refusal.__traceback__
    while tb is not None:
        entries, tb = entries + 1, tb.tb_next
    assert entries < 20, f"{entries} traceback entries after 51 raises"
    await sender.aclose()
