"""A planned failover's link lost, and the target not reachable again: what the source
can and cannot know (engine/handover.py). A real Receiver and the engine's Link over an
in-memory pipe; the network that stays down is a target line whose every connection is
refused, and its window is shortened (the product waits ASK_WINDOW, 60 s)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from replicator.engine import handover
from replicator.engine.errors import ConnectError, ExitCode, ReplicatorError
from replicator.engine.handover import TargetLine, hand_over, wait_for_request
from replicator.engine.link import Link
from replicator.engine.receiver import Receiver, ReceiverConfig
from replicator.engine.receiver_session import Session
from replicator.engine.volumes import VolumeKind, VolumeSpec
from replicator.journal import Journal, Record
from replicator.transport import Welcome, connection_pair

BLOCK = 4096


async def _down() -> Welcome:
    raise ConnectError("cannot connect to the receiver: connection refused")


async def _join_down() -> Link:
    raise ConnectError("cannot connect to the receiver: connection refused")


async def _close(link: Link) -> None:
    await link.aclose()


UNREACHABLE = TargetLine(ask=_down, join=_join_down, close=_close)


@pytest.mark.parametrize("cut", ["after the promotion", "before the final point"])
async def test_a_handover_whose_target_cannot_be_asked_again_says_what_is_known(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    monkeypatch.setattr(handover, "ASK_WINDOW", 1.0)
    monkeypatch.setattr(handover, "ASK_RETRY", 0.1)
    journal = await Journal.open(tmp_path / "journal")
    await journal.append_many([Record.write("d", 0, b"\x01" * BLOCK), Record.epoch(1)])
    await journal.sync()
    receiver = Receiver(ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate"))
    sender_conn, receiver_conn = await connection_pair()
    serving = asyncio.create_task(receiver.handle(receiver_conn))
    link = Link(sender_conn, journal)
    try:
        await link.handshake(
            "job", [VolumeSpec(tmp_path / "d", "d", VolumeKind.DISK)], {"d": BLOCK}
        )
        link.start_reader()
        link.start_shipper(link.received_lsn + 1)
        await link.wait_applied(journal.last_lsn, timeout=20)
        if cut == "after the promotion":

            async def lost(self: Session, generation: int) -> None:  # with the link
                self.conn.abort()
                raise ConnectionResetError("the link dropped")

            monkeypatch.setattr(Session, "confirm_handover", lost)
        failover = asyncio.create_task(receiver.failover_planned("job", 5.0))
        assert await wait_for_request(link, asyncio.Event(), 20)
        final = await journal.append(Record.flush())
        await journal.sync()
        if cut == "before the final point":
            sender_conn.abort()
        with pytest.raises(ReplicatorError) as caught:
            await hand_over(link, final, tmp_path / "sstate", "job", UNREACHABLE)
        error = caught.value
        if cut == "after the promotion":  # it may have promoted: how to find out, what not to do
            promotion, _ = await failover
            assert promotion.point_lsn == final  # it did
            assert error.exit_code == ExitCode.SPLIT_BRAIN  # not restarted by systemd
            assert "may or may not have promoted its replicas" in str(error)
            assert "`replicator status --dir DIR`" in str(error)
            assert "do not start the VM here or there" in str(error)
        else:  # the final point never left: the target did not promote for it
            with pytest.raises(ConnectError, match="nothing was promoted"):
                await failover
            assert error.exit_code == ExitCode.CONNECT
            assert f"before this source sent its final point (lsn {final})" in str(error)
            assert "so the target did not promote for it" in str(error)
    finally:
        await link.aclose()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await receiver.aclose()
        await journal.aclose()
