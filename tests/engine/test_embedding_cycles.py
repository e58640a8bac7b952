"""An HA controller's process starts and stops jobs for months: the embedding API's
resources (engine/api.py) must be flat over many start/stop cycles, also after errors.
Counted: open descriptors, threads, asyncio tasks, control sockets left in state folders,
and (the long version) memory the Python allocator holds."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from unittest.mock import patch

import pytest

from replicator.engine.api import (
    ConnectError,
    EventKind,
    Receiver,
    ReceiverConfig,
    Sender,
    SenderConfig,
    nbd_options,
    resolve_volumes,
)
from replicator.engine.control import SOCKET_NAME
from replicator.engine.job_replica import JobReplica
from replicator.engine.status import SenderPhase
from replicator.journal.journal import Journal
from tests.engine.test_embedding import caught_up, until

MiB = 1024 * 1024


def resources() -> dict[str, int]:
    gc.collect()
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "tasks": len(asyncio.all_tasks()),
    }


async def cycle(tmp: Path, disk: Path) -> None:
    """One of everything a controller does: a receiver up, a continuous sender started,
    caught up and closed, a cycle, a sender that cannot reach its receiver."""
    config = ReceiverConfig(tmp / "replicas", tmp / "rstate")
    async with Receiver(config) as receiver:
        job = SenderConfig(*receiver.address, "vm1", resolve_volumes([disk]), tmp / "sstate")
        async with Sender(job, interval=0.2) as sender, sender.events() as events:
            await until(events, caught_up)
        once = Sender(job)
        try:
            await once.run_once()
        finally:
            await once.aclose()
    away = SenderConfig("127.0.0.1", 1, "vm1", resolve_volumes([disk]), tmp / "sstate")
    unreached = Sender(away)
    with pytest.raises(ConnectError):
        await unreached.run_once()
    await unreached.aclose()


async def run_cycles(tmp: Path, count: int, each: Callable[[int], None] | None = None) -> None:
    disk = tmp / "disk.img"
    disk.write_bytes(os.urandom(MiB))
    for _ in range(2):  # the default executor's threads, imports, caches: made once
        await cycle(tmp, disk)
    before = resources()
    for i in range(count):
        with disk.open("r+b") as f:
            f.write(os.urandom(4096))
        await cycle(tmp, disk)
        if each is not None:
            each(i)
    after = resources()
    assert after["fds"] <= before["fds"], (before, after)
    assert after["tasks"] <= before["tasks"], (before, after)
    # the executor may add a worker now and then (up to its max), never one per cycle
    assert after["threads"] <= before["threads"] + 2, (before, after)
    assert not (tmp / "sstate" / SOCKET_NAME).exists()
    assert not (tmp / "rstate" / SOCKET_NAME).exists()


async def test_start_stop_cycles_leave_nothing_behind(tmp_path: Path) -> None:
    await run_cycles(tmp_path, 5)


@pytest.mark.long
async def test_two_hundred_cycles_hold_no_more_memory(tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        held: list[int] = []

        def measure(i: int) -> None:
            if i in (49, 199):
                gc.collect()
                held.append(tracemalloc.get_traced_memory()[0])

        await run_cycles(tmp_path, 200, measure)
        growth = held[1] - held[0]
        assert growth < 512 * 1024, f"{growth} bytes more after 150 more cycles"
    finally:
        tracemalloc.stop()


async def test_a_receiver_reopening_idle_jobs_keeps_one_follower_per_job(
    tmp_path: Path,
) -> None:
    """A receiver with more jobs than it keeps open closes idle ones and opens them again
    when their senders come back; the façade followed each opening with a task (and a
    listener) and never let the previous one go: one task and one closed JobReplica kept
    per reopening, for the life of the process."""
    disks = []
    for j in range(2):
        disk = tmp_path / f"disk{j}.img"
        disk.write_bytes(os.urandom(MiB))
        disks.append(disk)
    config = ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate", max_open_jobs=1)
    with patch("replicator.engine.receiver.IDLE_BEFORE_CLOSE", 0.0):
        async with Receiver(config) as receiver, receiver.events() as events:
            for _ in range(3):
                for j, disk in enumerate(disks):  # each one closes the other, idle
                    job = SenderConfig(
                        *receiver.address, f"vm{j}", resolve_volumes([disk]), tmp_path / f"s{j}"
                    )
                    sender = Sender(job, control=False)
                    try:
                        await sender.run_once()
                    finally:
                        await sender.aclose()
            followers = [t.get_name() for t in asyncio.all_tasks()]
            assert sorted(n for n in followers if n.startswith("api-applies")) == [
                "api-applies-vm0",
                "api-applies-vm1",
            ]
            gc.collect()
            assert sum(isinstance(o, JobReplica) for o in gc.get_objects()) <= 2
            # a job reopened still has its events: its opening, then its apply rounds
            await asyncio.sleep(0.1)  # the last round's events delivered
            events.close()
            seen = [(e.job, e.kind) async for e in events]
            last_opened = max(i for i, got in enumerate(seen) if got == ("vm0", EventKind.JOB))
            assert ("vm0", EventKind.LAG) in seen[last_opened:]


async def test_an_nbd_sender_started_again_and_again_keeps_one_journal(tmp_path: Path) -> None:
    """Each start() of an NBD-capturing Sender opens the state folder's journal afresh;
    the NBD backend's table of captures (weak keys, the values holding their keys) kept
    every one of them, closed, with its capture, for the life of the process."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(MiB))
    config = ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate")
    async with Receiver(config) as receiver:
        job = SenderConfig(*receiver.address, "vm1", resolve_volumes([disk]), tmp_path / "s")
        sender = Sender(job, nbd=nbd_options(tmp_path / "nbd.sock"), control=False)
        try:
            async with sender.events() as events:
                for _ in range(4):
                    await sender.start()
                    await until(events, lambda e: e.state == SenderPhase.REPLICATING)
                    await sender.stop()
        finally:
            await sender.aclose()
    gc.collect()
    kept = [o.path for o in gc.get_objects() if isinstance(o, Journal)]
    # the last run's, which the job's status still shows (its lag at the end)
    assert len([path for path in kept if path.is_relative_to(tmp_path / "s")]) == 1
