"""Source self-fencing's clock and NBD write gate (engine/witness_fence.py,
engine/nbd/gate.py): fenced fence_after after the last successful renewal's send, the
command run once per fencing, writes held from the deadline on (even before the fence's
timer has run: a frozen process), released by a fresh renewal, failed once promoted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from replicator.engine.nbd.gate import WriteGate, fence_clock
from replicator.engine.witness_fence import SourceFence


def fenced(fence: SourceFence) -> bool:  # read afresh (no narrowing across awaits)
    return fence.fenced


def closed(gate: WriteGate) -> bool:
    return gate.closed


async def test_fenced_after_fence_after_and_unfenced_by_a_fresh_renewal(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    gate = WriteGate()
    fence = SourceFence(
        "vm1",
        0.3,
        exec_cmd=f"touch {marker}",
        gate=gate,
    )
    watching = asyncio.ensure_future(fence.watch())
    try:
        start = fence_clock()
        fence.renewed(start)
        await asyncio.sleep(0.2)
        assert not fenced(fence) and not closed(gate)
        fence.renewed(fence_clock())  # renewing in time: never fenced
        await asyncio.sleep(0.2)
        assert not fenced(fence)
        await asyncio.sleep(0.25)  # 0.45 s since the last renewal
        assert fenced(fence) and gate.held and fence.status()["fenced"] is True
        for _ in range(50):
            if marker.exists():
                break
            await asyncio.sleep(0.02)
        assert marker.exists()
        write = asyncio.ensure_future(gate.passable())
        await asyncio.sleep(0.05)
        assert not write.done()  # held
        fence.renewed(fence_clock() - 0.5)  # succeeded, but sent too long ago
        await asyncio.sleep(0.05)
        assert fenced(fence) and not write.done()
        fence.renewed(fence_clock())
        assert not fenced(fence) and await write is True
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)


async def test_a_write_after_the_deadline_holds_before_the_timer_runs() -> None:
    gate = WriteGate()
    fence = SourceFence("vm1", 0.05, gate=gate)  # no watch: as if its timer had not run
    fence.renewed(fence_clock())
    assert not closed(gate)
    await asyncio.sleep(0.1)  # past the deadline; no watch task runs to fence
    assert closed(gate)
    write = asyncio.ensure_future(gate.passable())
    await asyncio.sleep(0.02)
    assert not write.done() and gate.held
    fence.renewed(fence_clock())  # fresh: released though the fence never fired
    assert await write is True and not closed(gate)


async def test_promoted_fails_held_and_later_writes() -> None:
    gate = WriteGate()
    fence = SourceFence("vm1", 10.0, gate=gate)
    gate.hold()
    held = asyncio.ensure_future(gate.passable())
    await asyncio.sleep(0.01)
    fence.demoted()
    assert await held is False and await gate.passable() is False
    gate.hold()  # nothing reopens or re-holds a failed gate
    assert closed(gate) and await gate.passable() is False


async def test_etcd_fences_before_its_lease_can_expire() -> None:
    """etcd leases are whole seconds (rounded up): a 0.9 s lease is a 1 s TTL, so a
    declared fence_after of 0.8 s is cut to 75 % of it."""
    from replicator.engine.witness_etcd import EtcdWitness

    etcd = EtcdWitness("127.0.0.1", 1, who="t", lease_seconds=0.9)
    try:
        gate = WriteGate()
        fence = SourceFence("vm1", 2 * 0.4, gate=gate)
        fence.bound(etcd.fence_bound)
        assert etcd.ttl == 1 and fence.fence_after == 0.75
        fence.renewed(fence_clock())
        assert gate.deadline == fence.last_ok + 0.75
        fence.bound(None)  # the built-in witness: the declared value stands
        assert fence.fence_after == 0.75
    finally:
        await etcd.aclose()


def test_a_host_suspended_past_the_deadline_resumes_fenced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A source host suspended (S3) for longer than fence_after: the witness may have
    promoted the target meanwhile. CLOCK_MONOTONIC (time.monotonic) stands still while a
    machine sleeps, so a fence counting on it found its deadline ahead on waking and let
    the VM's writes through until its next renewal heard "promoted" (up to
    --witness-interval later): acknowledged after the grant. The suspend is injected:
    CLOCK_BOOTTIME moves on by 30 s while CLOCK_MONOTONIC does not, as on a real wake."""
    gate = WriteGate()
    fence = SourceFence("vm1", 0.6, gate=gate)
    fence.renewed(fence_clock())
    assert not closed(gate)
    real = time.clock_gettime
    slept = 30.0

    def suspended(clock: int) -> float:
        return real(clock) + (slept if clock == time.CLOCK_BOOTTIME else 0.0)

    monkeypatch.setattr(time, "clock_gettime", suspended)
    assert closed(gate)  # held at once, before the fence's timer or any renewal runs
    assert fence.status()["since_renewal_seconds"] >= slept


async def test_no_write_passes_before_the_first_renewal() -> None:
    """A source just started does not know it is the primary: the witness may have granted
    its target before this start (the source gone long enough), while that target was not
    promoted yet when this source's first sync ended. Its writes were let through for
    fence_after seconds, renewed or not: with the witness out of its reach (or slow to
    answer) they were acknowledged beside the promoted target. Now they wait for the
    first renewal (the fence's timer, log and --fence-exec still count from the start)."""
    gate = WriteGate()
    fence = SourceFence("vm1", 10.0, gate=gate)
    fence.bound(7.5)  # etcd's bound, before any renewal: still held
    assert closed(gate) and not fence.status()["fenced"]
    write = asyncio.ensure_future(gate.passable())
    await asyncio.sleep(0.05)
    assert not write.done()
    fence.renewed(fence_clock())
    assert await write is True and not closed(gate)
    assert gate.deadline == fence.last_ok + 7.5
