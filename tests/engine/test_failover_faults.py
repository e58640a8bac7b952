"""Failover's durable steps, each made to fail (a real OSError where the step writes) or
cut short as a crash would: promotion is all or nothing for the sender's view, the
replica is never half promoted, and running failover again finishes the job. A step that
fails after ``promoted.state`` (the one that decides) is PromotedUnfinished: the job IS
promoted, and the error says so."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from replicator.engine import failover, job_replica, replica_state
from replicator.engine.generations import (
    PROMOTED_FILE,
    PromotedUnfinished,
    load_promotion,
    session_refusal,
)
from replicator.engine.receiver import JobReplica, Receiver, ReceiverConfig
from replicator.journal import Record, durable

BLOCK = 4096


def _config(tmp_path: Path) -> ReceiverConfig:
    return ReceiverConfig(replica_root=tmp_path / "replicas", state_root=tmp_path / "state")


async def _replica_with_one_epoch(tmp_path: Path) -> None:
    """A job whose sender replicated one epoch under generation 1."""
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        records = [
            Record.write("d", 0, b"\x01" * BLOCK).with_lsn(1, 1),
            Record.epoch(1).with_lsn(2, 1),
        ]
        await replica.ingest(records)
        await replica.journal.sync()
        replica.note_durable(records)
        await replica.apply_pending()
        await replica.set_generation(1)
    finally:
        await replica.aclose()


def _stale_sender_refused(replica: JobReplica) -> bool:
    return (
        session_refusal(
            "job",
            sender_generation=1,
            replica_generation=replica.state.generation,
            promotion=replica.promotion,
            fresh=replica.fresh,
            purpose=frozenset(),
        )
        is not None
    )


def _fail(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, err: int) -> None:
    def failing(*args: Any, **kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(owner, name, failing)


async def test_a_failed_promotion_write_promotes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _replica_with_one_epoch(tmp_path)
    with monkeypatch.context() as m:
        _fail(m, job_replica, "save_promotion", errno.ENOSPC)
        with pytest.raises(OSError):
            await failover.failover_at_rest(_config(tmp_path), "job")
    assert not (tmp_path / "state" / "job" / PROMOTED_FILE).exists()
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        assert replica.promotion is None and replica.state.generation == 1
        assert not _stale_sender_refused(replica)  # still a plain replica: replication goes on
    finally:
        await replica.aclose()
    result = await failover.failover_at_rest(_config(tmp_path), "job")  # the fault is gone
    assert result.generation == 2 and not result.already_promoted


async def test_a_crash_between_the_promotion_and_the_generation_is_finished_on_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _replica_with_one_epoch(tmp_path)
    saved = replica_state.save
    calls = [0]

    def dies_after_promotion(*args: Any, **kwargs: Any) -> None:
        if (tmp_path / "state" / "job" / PROMOTED_FILE).exists():
            calls[0] += 1
            raise OSError(errno.EIO, "the process died here")
        saved(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(replica_state, "save", dies_after_promotion)
        with pytest.raises(PromotedUnfinished):  # promoted: said so
            await failover.failover_at_rest(_config(tmp_path), "job")
    assert calls[0] >= 1
    on_disk = replica_state.load(tmp_path / "state" / "job", "job")
    assert on_disk is not None and on_disk.generation == 1  # the second write never happened
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        assert replica.promotion is not None and replica.promotion.generation == 2
        assert replica.state.generation == 2  # finished on open
        assert _stale_sender_refused(replica)
    finally:
        await replica.aclose()
    again = await failover.failover_at_rest(_config(tmp_path), "job")
    assert again.already_promoted and again.generation == 2


async def test_a_config_rewrite_cut_short_is_finished_by_running_failover_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _replica_with_one_epoch(tmp_path)
    folder = tmp_path / "replicas" / "job"
    original = "<domain><devices><disk><source file='/src/d'/></disk></devices></domain>\n"
    (folder / "vm.xml").write_text(original)
    real = durable.atomic_write
    writes = [0]

    def second_write_fails(path: Any, data: bytes, mode: int = 0o600, **kw: bool) -> None:
        writes[0] += 1
        if writes[0] == 2:  # the backup is written, the rewrite is not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data, mode, **kw)

    with monkeypatch.context() as m:
        m.setattr(failover, "atomic_write", second_write_fails)
        with pytest.raises(PromotedUnfinished):  # promoted: said so
            await failover.failover_at_rest(_config(tmp_path), "job")
    assert (folder / "vm.xml").read_text() == original  # never half written
    promotion = load_promotion(tmp_path / "state" / "job")
    assert promotion is not None  # promoted before the configuration step
    result = await failover.failover_at_rest(_config(tmp_path), "job")
    assert result.already_promoted and result.rewritten == [str(folder / "vm.xml")]
    assert str(folder / "d") in (folder / "vm.xml").read_text()
    assert (folder / "vm.xml.pre-failover").read_text() == original


async def test_a_forced_promotion_of_an_unknown_replica_cut_short_stays_marked_inconsistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`failover --force --allow-inconsistent` of a replica whose state file was damaged,
    killed between ``promoted.state`` and the generation's write: the open that finishes
    it, and every failover after, still say the replica was not at a consistency point."""
    await _replica_with_one_epoch(tmp_path)
    state_dir = tmp_path / "state" / "job"
    (state_dir / "applied.state").write_bytes(b"not a state file")
    saved = replica_state.save

    def dies_after_promotion(*args: Any, **kwargs: Any) -> None:
        if (state_dir / PROMOTED_FILE).exists():
            raise OSError(errno.EIO, "the process died here")
        saved(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(replica_state, "save", dies_after_promotion)
        with pytest.raises(PromotedUnfinished):  # promoted: said so
            await failover.failover_at_rest(_config(tmp_path), "job", allow_inconsistent=True)
    promotion = load_promotion(state_dir)
    assert promotion is not None and promotion.consistent is False
    replica = await JobReplica.open("job", _config(tmp_path))
    try:
        assert replica.promotion is not None and replica.promotion.consistent is False
        assert replica.state.generation == promotion.generation  # finished on open
        assert _stale_sender_refused(replica)
    finally:
        await replica.aclose()
    again = await failover.failover_at_rest(_config(tmp_path), "job")  # no override needed
    assert again.already_promoted and again.consistent is False


async def test_a_demote_through_the_receiver_that_cannot_remove_the_promotion_demotes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demote's one durable step (promoted.state removed, the directory synced) fails:
    the job stays promoted on disk and in the running receiver (a stale sender is still
    refused, automatic failover's clock is not reset), and the next demote does it."""
    await _replica_with_one_epoch(tmp_path)
    receiver = Receiver(_config(tmp_path))
    try:
        await receiver.failover("job")
        replica = await receiver.job("job")
        for step in ("unlink", "sync_dir"):
            with monkeypatch.context() as m:
                if step == "unlink":
                    _fail(m, Path, "unlink", errno.EIO)
                else:
                    _fail(m, durable, "sync_dir", errno.EIO)
                with pytest.raises(OSError):
                    await receiver.demote("job")
            assert replica.promotion is not None and _stale_sender_refused(replica)
            assert "job" not in receiver.demoted
            # the unlink failed: still on disk; the sync failed: the file was gone, and
            # a restart would have found the job demoted, which the operator was told had
            # failed: it is written again (the next demote syncs the folder either way:
            # journal/durable.remove_state)
            assert load_promotion(tmp_path / "state" / "job") == replica.promotion
        synced: list[Path] = []
        real_sync = durable.sync_dir

        def sync_dir(path: Path) -> None:
            synced.append(Path(path))
            real_sync(path)

        monkeypatch.setattr(durable, "sync_dir", sync_dir)
        assert await receiver.demote("job") == 2  # the fault is gone
        assert synced == [tmp_path / "state" / "job"]
        assert replica.promotion is None and "job" in receiver.demoted
        assert load_promotion(tmp_path / "state" / "job") is None
    finally:
        await receiver.aclose()


async def test_a_promotion_that_failed_after_its_rename_leaves_no_promotion_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """promoted.state is renamed into place, then its folder's sync fails (EIO): the
    failover fails and the running receiver is not promoted, but the file was there, and
    the next start found the job promoted, which the operator was told had failed."""
    from replicator.engine import generations

    await _replica_with_one_epoch(tmp_path)
    receiver = Receiver(_config(tmp_path))
    try:
        with monkeypatch.context() as m:

            def renamed_then_failed(state_dir: Path, promotion: generations.Promotion) -> None:
                generations.save_promotion(state_dir, promotion)
                raise OSError(errno.EIO, "Input/output error")

            m.setattr(job_replica, "save_promotion", renamed_then_failed)
            with pytest.raises(OSError):
                await receiver.failover("job")
        replica = await receiver.job("job")
        assert replica.promotion is None
    finally:
        await receiver.aclose()
    assert load_promotion(tmp_path / "state" / "job") is None
    reopened = await JobReplica.open("job", _config(tmp_path))
    try:
        assert reopened.promotion is None and not _stale_sender_refused(reopened)
    finally:
        await reopened.aclose()


async def test_a_demote_whose_generation_write_fails_demotes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A promotion whose generation write failed (PromotedUnfinished) is demoted: the
    demote records the promoted generation first (so the old source's plain `send` stays
    refused), and that write failing too demotes nothing: the job stays promoted, on disk
    and in the receiver; the next demote, the fault gone, records it and then demotes."""
    await _replica_with_one_epoch(tmp_path)
    receiver = Receiver(_config(tmp_path))
    try:
        with monkeypatch.context() as m:
            _fail(m, replica_state, "save", errno.ENOSPC)
            with pytest.raises(PromotedUnfinished):
                await receiver.failover("job")
            replica = await receiver.job("job")
            assert replica.promotion is not None and replica.state.generation == 1
            with pytest.raises(OSError):
                await receiver.demote("job")
            assert replica.promotion is not None and "job" not in receiver.demoted
            assert load_promotion(tmp_path / "state" / "job") == replica.promotion
            assert _stale_sender_refused(replica)
        assert await receiver.demote("job") == 2  # the fault is gone
        demoted = await receiver.job("job")
        assert demoted.promotion is None and demoted.state.generation == 2
        assert load_promotion(tmp_path / "state" / "job") is None
        assert _stale_sender_refused(demoted)  # generation 1's sender: --resync first
    finally:
        await receiver.aclose()
    on_disk = replica_state.load(tmp_path / "state" / "job", "job")
    assert on_disk is not None and on_disk.generation == 2
