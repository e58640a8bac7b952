"""``replicator bench --replay STATE_DIR``: a recorded journal, replayed at its original pace
through the emulated link to a real receiver, to predict the RPO a link would hold.

The recording is a sender's journal (``STATE_DIR/journal``, or a journal folder itself):
the records and the time each was journaled (``ts_ns``). It is copied first (the original
is neither locked nor changed, so a sender may still be running on it) and read in full.

The replay (in this process, with the engine's own parts: ``Journal``, ``Link``, the
connection's credit window and lz4) journals the records into a fresh journal at their
original pace (record i at ``start + ts_i - ts_0``, stamped with the replay's time), while a
``Link`` ships them through a ``WanEmulator`` to a ``replicator receive`` child with a fresh
folder, as a sender does. Every ``LAG_SAMPLE`` seconds it reads the lag (``Link.lag``: the
age of the oldest record not applied by the receiver); when the last record is journaled
it waits until the receiver has applied everything.

What a recording holds: a state dir keeps only records its receiver has not acknowledged
(acknowledged ones are trimmed). To record a workload, run the capture (``send --capture nbd``
or ``fuse``) with a ``--to`` no receiver answers, for as long as the workload should be
recorded (every write stays journaled, up to the journal's cap), then stop it; or point
``--replay`` at a journal copied from a sender's state dir.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from replicator.engine.errors import ConfigError
from replicator.engine.link import Link
from replicator.engine.volumes import VolumeKind, VolumeSpec
from replicator.journal import Journal, Record, RecordType
from replicator.transport.connection import connect

__all__ = ["LAG_SAMPLE", "Recording", "load_recording", "replay"]

LAG_SAMPLE = 0.02  # seconds between lag samples
APPLY_TIMEOUT = 600.0  # after the last record: the receiver applies everything within this


@dataclasses.dataclass(frozen=True)
class Recording:
    records: list[Record]
    source: Path

    @property
    def seconds(self) -> float:
        """From the first record's time to the last's."""
        if len(self.records) < 2:
            return 0.0
        return (self.records[-1].ts_ns - self.records[0].ts_ns) / 1e9

    @property
    def payload_bytes(self) -> int:
        return sum(len(r.data) for r in self.records)

    def volumes(self) -> dict[str, int]:
        """Volume names and the least size that holds every write (for the Hello)."""
        sizes: dict[str, int] = {}
        for r in self.records:
            if r.type is RecordType.RESIZE:
                sizes[r.volume] = r.offset
            elif r.volume and r.type in (RecordType.WRITE, RecordType.ZERO, RecordType.TRIM):
                sizes[r.volume] = max(sizes.get(r.volume, 0), r.offset + r.length)
            elif r.volume and r.type is RecordType.FILE:
                sizes[r.volume] = max(sizes.get(r.volume, 0), r.length)
        return sizes


def journal_folder(path: Path) -> Path:
    """The journal of a state dir (``path/journal``) or ``path`` itself; ConfigError if
    neither holds journal segments."""
    for folder in (path / "journal", path):
        if folder.is_dir() and any(folder.glob("*.seg")):
            return folder
    raise ConfigError(
        f"--replay {str(path)!r}: no journal there (no *.seg files in it or in its journal/)",
        hint="give a sender's --state-dir, or a folder of journal segments",
    )


async def load_recording(path: Path) -> Recording:
    """Every record of the journal at ``path`` (read from a copy), in order."""
    folder = journal_folder(path)
    with tempfile.TemporaryDirectory(prefix="replicator-replay-") as tmp:
        copy = Path(tmp) / "journal"
        await asyncio.to_thread(shutil.copytree, folder, copy)
        journal = await Journal.open(copy)
        try:
            records = [r async for r in journal.read_from(journal.first_lsn)]
        finally:
            await journal.aclose()
    if not records:
        raise ConfigError(f"--replay {str(path)!r}: the journal holds no records")
    return Recording(records, folder)


async def replay(
    recording: Recording, address: tuple[str, int], job: str, work: Path
) -> dict[str, Any]:
    """Replay ``recording`` at its pace to the receiver at ``address``; the figures."""
    journal = await Journal.open(work / "journal")
    try:
        link = Link(await connect(*address), journal)
        try:
            sizes = recording.volumes()
            specs = [VolumeSpec(work / name, name, VolumeKind.DISK) for name in sizes]
            await link.handshake(job, specs, sizes)
            link.start_reader()
            link.start_shipper(1)
            lags: list[float] = []
            sampler = asyncio.create_task(_sample(link, lags))
            try:
                seconds = await _journal_at_pace(recording.records, journal, link)
                await link.wait_applied(journal.last_lsn, APPLY_TIMEOUT)
            finally:
                sampler.cancel()
            await link.goodbye("replay done")
            wire = link.conn.bytes_sent
        finally:
            await link.aclose()
    finally:
        await journal.aclose()
    return {
        "records": len(recording.records),
        "payload_bytes": recording.payload_bytes,
        "recorded_seconds": round(recording.seconds, 4),
        "replay_seconds": round(seconds, 4),
        "wire_bytes": wire,
        "lag_samples": len(lags),
        "applied_lsn": link.applied_lsn,
        "lags": lags,  # the caller makes percentiles of them
    }


async def _journal_at_pace(records: list[Record], journal: Journal, link: Link) -> float:
    """Journal ``records`` at their recorded pace (durable, as capture does); seconds taken."""
    loop = asyncio.get_running_loop()
    start, first = loop.time(), records[0].ts_ns
    for record in records:
        due = start + (record.ts_ns - first) / 1e9
        delay = due - loop.time()
        if delay > 0:
            await journal.sync()  # what is due is durable, so the shipper sees it
            await asyncio.sleep(delay)
        link.raise_if_failed()
        await journal.append(dataclasses.replace(record, lsn=0, ts_ns=0))  # stamped now
    await journal.sync()
    return loop.time() - start


async def _sample(link: Link, lags: list[float]) -> None:
    while True:
        lags.append(float(link.lag()["seconds"]))
        await asyncio.sleep(LAG_SAMPLE)
