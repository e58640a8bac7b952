"""Journal benchmarks, each printed next to its target (and, for appends, its peer).

1. 1 MiB WRITE appends with a sync every 64 MiB, against plain sequential ``os.pwrite``
   of the same payloads plus the same fdatasyncs, in the same run (target >= 0.8x).
2. 4 KiB WRITE records, 64 concurrent writers each doing append then ``await sync()``
   (group commit): records/s (target >= 100,000/s), beside a model of the least any
   group commit on this event loop does (no journal code, see ``model_group_commit``),
   with the same fdatasyncs and with none.
3. Replay with ``read_from`` from the page cache: GB/s of payload (target >= 1 GB/s).

Run: ``.venv/bin/python bench/bench_journal.py [--size-mib 1024] [--records 200000]``.

Method. On these VMs the first write into never-touched guest memory is several times
slower than a write into recycled page-cache pages, which swamps the difference being
measured. So a warm-up writes and deletes a file of the test size first, each figure is
the median of ``--rounds`` runs, and the journal and the pwrite peer alternate (which one
goes first flips each round), each deleting its files before the other runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import uvloop
from _common import machine

from replicator.journal import Journal, Record
from replicator.journal import durable as durable_mod

MiB = 1024 * 1024
SYNC_EVERY = 64 * MiB


def bench_pwrite(path: Path, payloads: list[bytes], total: int) -> float:
    """Baseline: sequential pwrite of the payloads, fdatasync every 64 MiB. Returns MB/s."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    start = time.perf_counter()
    offset = 0
    since_sync = 0
    i = 0
    while offset < total:
        data = payloads[i % len(payloads)]
        i += 1
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
        since_sync += len(data)
        if since_sync >= SYNC_EVERY:
            durable_mod.fdatasync_fd(fd)
            since_sync = 0
    durable_mod.fdatasync_fd(fd)
    elapsed = time.perf_counter() - start
    os.close(fd)
    return total / elapsed / 1e6


async def bench_append(path: Path, payloads: list[bytes], total: int) -> float:
    """Journal: 1 MiB WRITE records, ``sync()`` every 64 MiB. Returns MB/s of payload."""
    journal = await Journal.open(path)
    start = time.perf_counter()
    written = since_sync = i = 0
    while written < total:
        data = payloads[i % len(payloads)]
        await journal.append(Record.write("disk0", written, data))
        i += 1
        written += len(data)
        since_sync += len(data)
        if since_sync >= SYNC_EVERY:
            await journal.sync()
            since_sync = 0
    await journal.sync()
    elapsed = time.perf_counter() - start
    await journal.aclose()
    return total / elapsed / 1e6


async def bench_group_commit(path: Path, records: int, writers: int) -> tuple[float, float]:
    """64 writers, each: append a 4 KiB record, await sync. Returns (records/s, syncs/s)."""
    journal = await Journal.open(path)
    data = os.urandom(4096)
    per_writer = records // writers
    syncs = 0
    real = durable_mod.fdatasync_fd

    def counting(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        real(fd)

    durable_mod.fdatasync_fd = counting

    async def writer(w: int) -> None:
        for k in range(per_writer):
            await journal.append(Record.write("disk0", (w * per_writer + k) * 4096, data))
            await journal.sync()

    try:
        start = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.perf_counter() - start
    finally:
        durable_mod.fdatasync_fd = real
    await journal.aclose()
    return per_writer * writers / elapsed, syncs / elapsed


async def model_group_commit(path: Path, records: int, writers: int, *, sync: bool) -> float:
    """The least work a group commit of 4 KiB records does on this loop; records/s.

    Each writer encodes its record (the record format's header and checksum: a 4 KiB
    record is not a record without them) and waits for its round's one future; one round
    at a time writes what is staged with one ``pwritev`` on a thread, fdatasyncs it
    (``sync``) and wakes the round's writers. No admission, segments, LSN checks or
    failure handling: what the journal adds is above this, so the model's rate bounds the
    journal's.
    """
    from replicator.journal.records import encode_parts

    loop = asyncio.get_running_loop()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    data = os.urandom(4096)
    per_writer = records // writers
    staged: list[bytes | memoryview] = []
    next_round: asyncio.Future[None] | None = None  # what the staged records' writers await
    committing: asyncio.Task[None] | None = None
    offset = 0

    def write(parts: list[bytes | memoryview], at: int) -> None:
        os.pwritev(fd, parts, at)
        if sync:
            os.fdatasync(fd)

    async def commit() -> None:
        nonlocal committing, next_round, offset
        while next_round is not None:
            parts, done = staged[:], next_round
            staged.clear()
            next_round = None
            await asyncio.to_thread(write, parts, offset)
            offset += sum(map(len, parts))
            done.set_result(None)
        committing = None

    async def writer(w: int) -> None:
        nonlocal committing, next_round
        for k in range(per_writer):
            record = Record.write("disk0", (w * per_writer + k) * 4096, data)
            staged.extend(encode_parts(record, w * per_writer + k + 1, time.time_ns()))
            if next_round is None:
                next_round = loop.create_future()
            if committing is None:
                committing = loop.create_task(commit())
            await next_round

    try:
        start = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        return per_writer * writers / (time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)


async def bench_replay(path: Path) -> tuple[float, int, float]:
    """read_from over a whole journal (page cache). Returns (GB/s payload, records, s)."""
    journal = await Journal.open(path)
    count = payload = 0
    start = time.perf_counter()
    async for record in journal.read_from(journal.first_lsn):
        count += 1
        payload += len(record.data)
    elapsed = time.perf_counter() - start
    await journal.aclose()
    return payload / elapsed / 1e9, count, elapsed


def _runs(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" for v in values)


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-journal-", dir=args.dir))
    total = args.size_mib * MiB
    payloads = [os.urandom(MiB) for _ in range(4)]
    try:
        rows: list[tuple[str, str, str]] = []
        bench_pwrite(root / "warmup.bin", payloads, total)
        (root / "warmup.bin").unlink()
        journal_runs: list[float] = []
        pwrite_runs: list[float] = []
        for round_no in range(args.rounds):
            for which in ("journal", "pwrite") if round_no % 2 == 0 else ("pwrite", "journal"):
                if which == "journal":
                    shutil.rmtree(root / "j1", ignore_errors=True)
                    journal_runs.append(await bench_append(root / "j1", payloads, total))
                else:
                    pwrite_runs.append(bench_pwrite(root / "plain.bin", payloads, total))
                    (root / "plain.bin").unlink()
        ja, peer = statistics.median(journal_runs), statistics.median(pwrite_runs)
        rows.append(
            (
                f"append 1 MiB WRITE, sync/64 MiB ({args.size_mib} MiB, median of {args.rounds})",
                f"{ja:,.0f} MB/s",
                f"pwrite+fdatasync {peer:,.0f} MB/s -> {ja / peer:.2f}x (target >= 0.80x); "
                f"runs: journal {_runs(journal_runs)}, pwrite {_runs(pwrite_runs)}",
            )
        )
        gbps, n, secs = await bench_replay(root / "j1")
        rows.append(
            (
                f"replay read_from, 1 MiB records ({n} in {secs:.2f} s)",
                f"{gbps:.2f} GB/s",
                "target >= 1 GB/s",
            )
        )
        shutil.rmtree(root / "j1")
        commits = []
        models: list[float] = []
        unsynced: list[float] = []
        for _ in range(args.rounds):
            shutil.rmtree(root / "j2", ignore_errors=True)
            commits.append(await bench_group_commit(root / "j2", args.records, args.writers))
            model = root / "model.bin"
            models.append(await model_group_commit(model, args.records, args.writers, sync=True))
            unsynced.append(await model_group_commit(model, args.records, args.writers, sync=False))
        rate, sync_rate = sorted(commits)[len(commits) // 2]
        model_rate, no_sync_rate = statistics.median(models), statistics.median(unsynced)
        rows.append(
            (
                f"4 KiB records, {args.writers} writers append+sync (median of {args.rounds})",
                f"{rate:,.0f} rec/s",
                f"{sync_rate:,.0f} fdatasync/s; target >= 100,000 rec/s; the least a group"
                f" commit does on this loop (no journal code): {model_rate:,.0f} rec/s, with no"
                f" fdatasync {no_sync_rate:,.0f} rec/s -> the journal {rate / model_rate:.2f}x"
                " of the model",
            )
        )
        gbps4, n4, secs4 = await bench_replay(root / "j2")
        rows.append(
            (
                f"replay read_from, 4 KiB records ({n4} in {secs4:.2f} s)",
                f"{gbps4:.2f} GB/s",
                f"{n4 / secs4:,.0f} rec/s (no target)",
            )
        )
        width = max(len(r[0]) for r in rows)
        print(machine())
        print(f"{'benchmark':<{width}}  {'journal':>14}  peer / target")
        for name, value, peer_text in rows:
            print(f"{name:<{width}}  {value:>14}  {peer_text}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="bytes for the 1 MiB test")
    parser.add_argument("--records", type=int, default=200_000, help="4 KiB records to commit")
    parser.add_argument("--writers", type=int, default=64, help="concurrent writer tasks")
    parser.add_argument("--rounds", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--dir", default=None, help="where to put the scratch journal")
    uvloop.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
