"""``Quiesce``: what runs when, and what a failure says (engine/hooks.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from replicator.engine import hooks
from replicator.engine.hooks import OUTPUT_KEPT, HookFailed, Quiesce


async def test_the_thaw_follows_the_body_also_when_it_fails(tmp_path: Path) -> None:
    log = tmp_path / "log"
    quiesce = Quiesce(f"echo pre >> {log}", f"echo post $REPLICATOR_PRE_RESULT >> {log}", "vm")
    with pytest.raises(RuntimeError):
        async with quiesce.frozen():
            with log.open("a") as f:
                f.write("body\n")
            raise RuntimeError("the scan failed")
    assert log.read_text().splitlines() == ["pre", "body", "post ok"]
    assert quiesce.thaw_failure is None


async def test_a_failed_thaw_is_kept_until_a_thaw_succeeds(tmp_path: Path) -> None:
    flag = tmp_path / "broken"
    flag.touch()
    quiesce = Quiesce(None, f"test ! -e {flag}", "vm")
    async with quiesce.frozen():
        pass
    assert quiesce.thaw_failure is not None and quiesce.thaw_failure.phase == "post"
    flag.unlink()
    async with quiesce.frozen():
        pass
    assert quiesce.thaw_failure is None


async def test_a_failure_quotes_the_end_of_a_long_output_and_a_signal_is_named() -> None:
    noisy = Quiesce(
        f"head -c {3 * OUTPUT_KEPT} /dev/zero | tr '\\0' x; echo; echo last; exit 2", None, "vm"
    )
    with pytest.raises(HookFailed) as failed:
        async with noisy.frozen():
            pytest.fail("the body ran after a failed freeze")
    assert failed.value.message.endswith("it said: last")
    killed = Quiesce("kill -9 $$", None, "vm")
    with pytest.raises(HookFailed, match="was killed by signal 9"):
        async with killed.frozen():
            pass


async def test_a_stop_during_the_freeze_kills_it_and_still_thaws(tmp_path: Path) -> None:
    done, thawed = tmp_path / "froze", tmp_path / "thawed"
    quiesce = Quiesce(f"sleep 2; touch {done}", f"echo $REPLICATOR_PRE_RESULT > {thawed}", "vm")

    async def cycle() -> None:
        async with quiesce.frozen():
            pytest.fail("the body ran after an interrupted freeze")

    task = asyncio.ensure_future(cycle())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert thawed.read_text().strip() == "failed"
    await asyncio.sleep(2.2)
    assert not done.exists()  # the freeze was killed, not left to finish after the thaw


async def test_a_stop_during_the_thaw_leaves_it_to_finish(tmp_path: Path) -> None:
    thawed = tmp_path / "thawed"
    quiesce = Quiesce(None, f"sleep 0.5; touch {thawed}", "vm")

    async def cycle() -> None:
        async with quiesce.frozen():
            pass

    task = asyncio.ensure_future(cycle())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not thawed.exists()
    await asyncio.sleep(1.0)
    assert thawed.exists()  # in a session of its own: it outlives the stop


async def test_a_long_freeze_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks, "LONG_FREEZE", 0.2)
    quiesce = Quiesce("true", "true", "vm")
    with capture_logs() as logs:
        async with quiesce.frozen():
            await asyncio.sleep(0.05)
        async with quiesce.frozen():
            await asyncio.sleep(0.3)
    frozen = [e["seconds"] for e in logs if e["event"] == "sender.frozen"]
    assert len(frozen) == 2 and frozen[0] < 0.2 <= frozen[1]
    warned = [e for e in logs if e["event"] == "sender.long_freeze"]
    assert len(warned) == 1 and "--capture nbd" in warned[0]["hint"]
