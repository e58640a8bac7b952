"""Shared helpers for the journal tests (deterministic payloads, small journals, reads)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, ParamSpec

import blake3

from replicator.journal import EncodedRecord, Journal, Record
from replicator.journal.records import split_run
from replicator.journal.segment import SEGMENT_SUFFIX, SPARE_SUFFIX

_P = ParamSpec("_P")


def payload(lsn: int, size: int | None = None) -> bytes:
    """Deterministic content for the record with ``lsn`` (so a reader can check it)."""
    if size is None:
        size = (lsn * 7919) % 900 + 1
    return blake3.blake3(lsn.to_bytes(8, "little")).digest(length=size)


def write_for(lsn: int, size: int | None = None) -> Record:
    return Record.write("vol", lsn * 512, payload(lsn, size))


def check_record(record: Record) -> None:
    """A record written by ``write_for`` comes back with exactly that content."""
    assert record.volume == "vol"
    assert record.offset == record.lsn * 512
    assert record.data == payload(record.lsn, len(record.data))


async def read_all(journal: Journal, lsn: int = 1) -> list[Record]:
    return [r async for r in journal.read_from(lsn)]


def segment_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.name.endswith(SEGMENT_SUFFIX))


def spare_files(path: Path) -> list[Path]:
    """Trimmed segment files the journal keeps for reuse."""
    return sorted(p for p in path.iterdir() if p.name.endswith(SPARE_SUFFIX))


def segments_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in segment_files(path))


def dir_bytes(path: Path) -> int:
    """Bytes of the journal's files: segments and the spares kept for reuse."""
    return segments_bytes(path) + sum(os.path.getsize(p) for p in spare_files(path))


async def filled(path: Path, count: int, *, segment_bytes: int = 1024) -> Journal:
    """A journal with ``count`` synced WRITE records (LSN 1..count)."""
    journal = await Journal.open(path, segment_bytes=segment_bytes)
    for lsn in range(1, count + 1):
        assert await journal.append(write_for(lsn, 100)) == lsn
    await journal.sync()
    return journal


class FirstWriteHeld(Generic[_P]):
    """A blocking write whose first call, in its worker thread, waits until a later call
    has written (or ``hold`` seconds have passed) before it writes: without settling, a
    cancelled caller's write lands after the newer one. Made in a coroutine."""

    def __init__(self, write: Callable[_P, None], hold: float = 0.5) -> None:
        self._write = write
        self._hold = hold
        self._calls = 0
        self._count = threading.Lock()
        self._loop = asyncio.get_running_loop()  # made in a test's coroutine
        self._started = asyncio.Event()
        self._later_written = threading.Event()

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> None:
        with self._count:
            self._calls += 1
            first = self._calls == 1
        if first:
            self._loop.call_soon_threadsafe(self._started.set)
            self._later_written.wait(self._hold)
            self._write(*args, **kwargs)
        else:
            self._write(*args, **kwargs)
            self._later_written.set()

    async def wait_started(self) -> None:
        await self._started.wait()


def each_record(items: list[EncodedRecord]) -> list[EncodedRecord]:
    """``items`` (records and runs of them, as a shipping read yields) one record each,
    cut apart with ``split_run``."""
    out: list[EncodedRecord] = []
    for item in items:
        rest: EncodedRecord | None = item
        while rest is not None:
            taken = split_run(rest, 0, at_least_one=True)
            assert taken is not None
            head, rest = taken
            assert head.count == 1, head
            out.append(head)
    return out
