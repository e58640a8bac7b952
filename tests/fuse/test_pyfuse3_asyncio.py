"""The patched asyncio shim of pyfuse3 (engine/fuse/pyfuse3.patch, change 3)."""

from __future__ import annotations

import asyncio
import os

import pyfuse3.asyncio as shim
import pytest


async def test_notify_closing_skips_a_future_that_is_already_done() -> None:
    """A waiter whose fd turned readable in this loop iteration is done but not yet
    resumed; stock pyfuse3 raised InvalidStateError out of terminate() on it."""
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    try:
        ready: asyncio.Future[None] = loop.create_future()
        ready.set_result(None)
        waiting: asyncio.Future[None] = loop.create_future()
        shim._read_futures[r].update({ready, waiting})
        shim.notify_closing(r)
        assert ready.result() is None
        with pytest.raises(shim.ClosedResourceError):
            waiting.result()
    finally:
        shim._read_futures.pop(r, None)
        os.close(r)
        os.close(w)


async def test_a_waiter_woken_by_notify_closing_leaves_wait_readable() -> None:
    r, w = os.pipe()
    try:
        waiter = asyncio.ensure_future(shim.wait_readable(r))
        await asyncio.sleep(0)
        shim.notify_closing(r)
        with pytest.raises(shim.ClosedResourceError):
            await waiter
        assert r not in shim._read_futures
    finally:
        os.close(r)
        os.close(w)


async def test_a_cancelled_nursery_cancels_its_tasks_and_ends_after_them() -> None:
    """As trio's nursery: main() cancelled must not leave pyfuse3's workers running."""
    ended: list[str] = []

    async def worker(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.01)  # a worker that needs a moment to leave
            ended.append(name)

    async def main() -> None:
        async with shim.open_nursery() as nursery:
            nursery.start_soon(worker, "a")
            nursery.start_soon(worker, "b")

    task = asyncio.ensure_future(main())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(ended) == ["a", "b"]
