"""A job that opens while its session is cancelled (the receiver closing, a sender gone)
never leaves its journal open: a receiver started next on the same folder opens the job.

Seen as a flaky failure of test_pair's hypothesis scenario: a receiver restarted right
after a cut connection refused the next sender with "journal ... is already open".
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import replicator.engine.job_replica as job_replica
from replicator.engine.durable_tail import KeptMemory
from replicator.engine.job_replica import JobReplica
from replicator.engine.receiver import Receiver, ReceiverConfig
from replicator.journal import Journal


def _config(tmp: Path) -> ReceiverConfig:
    return ReceiverConfig(tmp / "replicas", tmp / "rstate")


async def test_a_session_cancelled_while_its_job_opens_leaves_the_job_to_aclose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancellation arrives after the journal is open but before the job is kept
    (as when it lands while the opening task's result is on its way)."""
    real_open = JobReplica.open

    async def open_then_linger(
        job: str, config: ReceiverConfig, kept: KeptMemory | None = None
    ) -> JobReplica:
        replica = await real_open(job, config, kept)
        await asyncio.sleep(0.2)
        return replica

    monkeypatch.setattr(JobReplica, "open", staticmethod(open_then_linger))
    receiver = Receiver(_config(tmp_path))
    session = asyncio.create_task(receiver.job("job"))
    await asyncio.sleep(0.1)  # the journal is open now; the job not yet kept
    session.cancel()
    with pytest.raises(asyncio.CancelledError):
        await session
    await receiver.aclose()
    monkeypatch.setattr(JobReplica, "open", real_open)
    again = Receiver(_config(tmp_path))
    try:
        replica = await again.job("job")  # "journal ... is already open" before the fix
        assert not replica.broken
    finally:
        await again.aclose()


async def test_an_open_cancelled_after_its_journal_opened_closes_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow_load_promotion(state_dir: Path) -> None:
        time.sleep(0.3)  # a worker thread: the cancellation reaches the await meanwhile

    monkeypatch.setattr(job_replica, "load_promotion", slow_load_promotion)
    opening = asyncio.create_task(JobReplica.open("job", _config(tmp_path)))
    await asyncio.sleep(0.1)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    journal = await Journal.open(tmp_path / "rstate" / "job" / "journal")
    await journal.aclose()
