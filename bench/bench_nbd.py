"""NBD shim vs ``nbdkit file``: the same file, the same fio jobs, both over unix sockets.

The shim journals every write before acknowledging it (to a local journal directory;
no receiver). A background task stands in for the sender: every ``live.TICK`` seconds (the
sender's own cadence) it syncs the journal (shipping only sees synced records) and trims
what is durable, so the journal does not fill the disk. The process keeps freed buffers as
the command line does (``engine/allocator.py``). nbdkit writes the file and nothing else:
fio sends no flush, so nbdkit's writes stay in the page cache, while every byte the shim
journals has to reach the disk. So the 1 MiB job is also set beside the disk's own rate
for the journal's pattern, measured in the same run without any of our code: 1 MiB writes
into 64 MiB files, an fdatasync every tick, the file two back trimmed and written over by the
next file but one, as the journal reuses its trimmed segments (and, for comparison, into new
files, deleting the trimmed ones).

A third server runs the same jobs: our ``NbdServer`` with an export that only does what
nbdkit's file plugin does (``pwrite`` into the page cache, the same thread policy as the
shim, nothing journaled). It is what CPython on this event loop reaches with no journal at
all, so it bounds what any journal-first shim in this stack can reach.

And a fourth, as a user runs it: ``replicator send --capture nbd`` replicating to a
``replicator receive`` on loopback (the receiver on the same two vCPUs), each run with a
fresh state folder and replica, fio started once the initial sync is done (``status``).

Each run also reads the whole machine's CPU over fio's run (``/proc/stat``): CPU-seconds per
GB written and the share of the vCPUs busy, per server, and for the replicating server its
CPU ceiling (its figure divided by that share: what the same work per byte would reach
with every vCPU busy), as ``bench_fuse.py`` does.

Jobs (targets from the speed issue, as a ratio to nbdkit, journal only / replicating):
  * 4 KiB random writes, iodepth 16: IOPS, target >= 0.5x / >= 0.35x nbdkit
  * 1 MiB sequential writes, iodepth 4: MB/s, target >= 0.45x / >= 0.25x nbdkit

Run: ``.venv/bin/python bench/bench_nbd.py [--runtime 10] [--size-mib 512] [--repeat 1]
[--job NAME]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvloop
from _common import (
    REPLICATOR,
    cpu_since,
    journal_files_bytes,
    journal_pattern_limit,
    machine,
    machine_cpu,
    process_cpu,
    stand_in_shipper,
    start_receiver,
)

from replicator.engine.allocator import keep_freed_buffers
from replicator.engine.control import SOCKET_NAME, ControlUnavailable, request
from replicator.engine.nbd import JournaledFileExport, NbdServer
from replicator.engine.nbd.backend import THREAD_MIN
from replicator.engine.nbd.proto import TransmissionFlag
from replicator.engine.sender_state import LIVE_JOURNAL_CAP, journal_cap
from replicator.engine.volumes import pwrite_all
from replicator.journal import Journal

MiB = 1024 * 1024
JOBS: dict[str, tuple[list[str], str, float, float]] = {
    # name: (fio arguments, figure, target ratio journal only, target ratio replicating)
    "4k randwrite qd16": (["--rw=randwrite", "--bs=4k", "--iodepth=16"], "iops", 0.5, 0.35),
    "1M seqwrite qd4": (["--rw=write", "--bs=1M", "--iodepth=4"], "MB/s", 0.45, 0.25),
}


def settle(image: Path) -> None:
    """Start every run from the same state: nothing dirty, the image not cached.

    Without this, runs are not comparable: the previous run's writeback lands in the
    next one, and once the image was written sequentially the page cache holds it in
    large folios, which makes every later 4 KiB random write dirty a large folio
    (measured here, kernel 6.18: nbdkit 23k IOPS on such a file vs 150k+ after eviction).
    """
    os.sync()
    fd = os.open(image, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def fio(uri: str, args: list[str], runtime: int, size: int) -> dict[str, float]:
    """fio's figures, and the machine's CPU over its run (ramp included): ``cpu s/GB``
    (busy CPU-seconds of every process and the kernel per GB fio counted) and ``busy``
    (the share of all vCPUs)."""
    start = machine_cpu()
    proc = await asyncio.create_subprocess_exec(
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--size={size}",
        f"--runtime={runtime}",
        "--time_based",
        "--ramp_time=1",
        "--output-format=json",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"fio failed: {err.decode()}")
    job = json.loads(out[out.index(b"{") :])["jobs"][0]["write"]
    return {
        "iops": float(job["iops"]),
        "MB/s": float(job["bw_bytes"]) / 1e6,
        **cpu_since(start, job["io_bytes"]),
    }


async def wait_for_socket(path: str) -> None:
    for _ in range(200):
        if os.path.exists(path):  # noqa: ASYNC240 - polling a local path once per 10 ms
            return
        await asyncio.sleep(0.01)
    raise RuntimeError(f"{path} did not appear")


@contextlib.asynccontextmanager
async def nbdkit(image: Path, sock: str) -> AsyncIterator[str]:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)  # a stale socket would look like a ready server
    proc = await asyncio.create_subprocess_exec(
        "nbdkit", "--foreground", "--exit-with-parent", "-U", sock, "file", f"file={image}"
    )
    try:
        await wait_for_socket(sock)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


@contextlib.asynccontextmanager
async def shim(image: Path, sock: str, journal_dir: Path) -> AsyncIterator[str]:
    shutil.rmtree(journal_dir, ignore_errors=True)
    # capped as `send --capture nbd` caps it (a cap costs every append a check)
    cap = journal_cap(journal_dir.parent, LIVE_JOURNAL_CAP)
    journal = await Journal.open(journal_dir, max_bytes=cap)
    export = JournaledFileExport(journal, image, "bench", overflow=True)  # as `send` does
    server = NbdServer({export.name: export})
    await server.start_unix(sock)

    shipper = asyncio.ensure_future(stand_in_shipper(journal))
    try:
        yield f"nbd+unix:///{export.name}?socket={sock}"
    finally:
        shipper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await shipper
        await server.aclose()
        await export.aclose()
        await journal.aclose()


class PlainFileExport:
    """nbdkit file's work in our stack: pwrite and pread, nothing journaled (see above)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    @property
    def name(self) -> str:
        return "plain"

    @property
    def size(self) -> int:
        return self._size

    @property
    def flags(self) -> int:
        return int(TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA)

    async def read(self, offset: int, length: int) -> bytes:
        if length >= THREAD_MIN:
            return await asyncio.to_thread(os.pread, self._fd, length, offset)
        return os.pread(self._fd, length, offset)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        if len(data) >= THREAD_MIN:
            await asyncio.to_thread(pwrite_all, self._fd, data, offset)
        else:
            pwrite_all(self._fd, data, offset)
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool) -> None:
        await self.write(offset, bytes(length), fua=fua)  # not advertised: fio sends none

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        pass  # not advertised

    async def flush(self) -> None:
        await asyncio.to_thread(os.fdatasync, self._fd)

    async def aclose(self) -> None:
        os.close(self._fd)


@contextlib.asynccontextmanager
async def serving(export: PlainFileExport, sock: str) -> AsyncIterator[str]:
    """Our ``NbdServer`` serving ``export`` alone on ``sock``; yields the fio URI."""
    server = NbdServer({export.name: export})
    await server.start_unix(sock)
    try:
        yield f"nbd+unix:///{export.name}?socket={sock}"
    finally:
        await server.aclose()
        await export.aclose()


def plain_python(image: Path, sock: str) -> contextlib.AbstractAsyncContextManager[str]:
    return serving(PlainFileExport(image), sock)


async def sender_status(state: Path) -> dict[str, Any]:
    """The running sender's one job as ``status`` shows it ({} until its socket answers)."""
    try:
        answer = await asyncio.to_thread(request, state / SOCKET_NAME, "status")
    except ControlUnavailable:
        return {}
    jobs: list[dict[str, Any]] = answer.get("jobs", [])
    return jobs[0] if jobs else {}


async def stop(proc: asyncio.subprocess.Process | subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    if isinstance(proc, subprocess.Popen):
        await asyncio.to_thread(proc.wait)
    else:
        await proc.wait()


@contextlib.asynccontextmanager
async def replicating(image: Path, sock: str, work: Path) -> AsyncIterator[str]:
    """`send --capture nbd` to `receive` on loopback; yields once the initial sync is done."""
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    receiver, port = await asyncio.to_thread(start_receiver, work / "target")
    sender = await asyncio.create_subprocess_exec(
        *REPLICATOR, "send", "--to", f"127.0.0.1:{port}", "--job", "bench",
        "--state-dir", str(work / "state"), "--capture", "nbd", "--nbd-socket", sock,
        "--insecure", str(image),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(600):  # a 512 MiB initial sync takes seconds here
            while True:
                if sender.returncode is not None or receiver.poll() is not None:
                    raise RuntimeError("the sender or the receiver exited before fio ran")
                job = await sender_status(work / "state")
                lag = job.get("lag") or {}
                synced = job.get("state") == "replicating" and job.get("initial_sync") is None
                if synced and lag.get("records") == 0:
                    break
                await asyncio.sleep(0.2)
        await asyncio.to_thread(settle, image)
        peaks = {"sender": 0, "receiver": 0}
        folders = {"sender": work / "state" / "journal", "receiver": work / "target"}

        async def sample() -> None:  # how far the journals grow while fio runs
            while True:
                for side, folder in folders.items():
                    size = await asyncio.to_thread(journal_files_bytes, folder)
                    peaks[side] = max(peaks[side], size)
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        pids = {"sender": sender.pid, "receiver": receiver.pid}
        before = {side: process_cpu(pid) for side, pid in pids.items()}
        machine_before = machine_cpu()[0]
        try:
            yield f"nbd+unix:///{image.name}?socket={sock}"
        finally:
            sampler.cancel()
        used = {side: process_cpu(pid) - before[side] for side, pid in pids.items()}
        busy = machine_cpu()[0] - machine_before
        print(
            f"{'':<20} replicating run's CPU: sender {used['sender']:.1f} s,"
            f" receiver {used['receiver']:.1f} s, fio and the rest"
            f" {busy - sum(used.values()):.1f} s (of {busy:.1f} s busy)",
            flush=True,
        )
        print(
            f"{'':<20} replicating run: journals at most {peaks['sender'] / MiB:.0f} MiB"
            f" (sender), {peaks['receiver'] / MiB:.0f} MiB (receiver), spares included",
            flush=True,
        )
    finally:
        await stop(sender)
        await stop(receiver)
        shutil.rmtree(work, ignore_errors=True)


def print_cpu(
    job: str,
    servers: list[str],
    runs: dict[str, list[float]],
    cpu: dict[str, list[tuple[float, float]]],
    peer: float,
    figure: str,
) -> None:
    """Each server's CPU per GB and the vCPUs' busy share (in its best run), and the
    replicating job's CPU ceiling: its figure with the same CPU per byte and every vCPU
    busy, i.e. the most any schedule of this work reaches on this machine."""
    best = {server: runs[server].index(max(runs[server])) for server in servers}
    cells = []
    for server in servers:
        per_gb, busy = cpu[server][best[server]]
        cells.append(f"{server} {per_gb:.2f} s/GB ({busy:.0%} busy)")
    print(f"{'':<20} CPU: " + ", ".join(cells), flush=True)
    if "replicating" in servers:
        at = best["replicating"]
        ceiling = runs["replicating"][at] / cpu["replicating"][at][1]
        print(
            f"{'':<20} replicating with all {os.cpu_count()} vCPUs busy (the same CPU per"
            f" byte): {ceiling:.0f} {figure} = {ceiling / peer:.2f}x of nbdkit ({job})",
            flush=True,
        )


async def main() -> None:
    keep_freed_buffers()  # as the command line does for every engine command
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    parser.add_argument("--size-mib", type=int, default=512, help="size of the test file")
    parser.add_argument("--dir", type=Path, default=None, help="work directory")
    parser.add_argument(
        "--job", choices=sorted(JOBS), action="append", help="run only this job (repeatable)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per side, interleaved; the best of each side is compared (other load "
        "on the machine only ever makes a run slower)",
    )
    parser.add_argument(
        "--no-replicating",
        action="store_true",
        help="skip the runs of `send --capture nbd` replicating to a local `receive`",
    )
    opts = parser.parse_args()
    work = Path(opts.dir or tempfile.mkdtemp(prefix="bench-nbd-"))
    os.makedirs(work, exist_ok=True)
    image = work / "disk.img"
    size = opts.size_mib * MiB
    with image.open("wb") as f:  # fully allocated, so neither side pays for allocation
        block = os.urandom(MiB)
        for _ in range(opts.size_mib):
            f.write(block)
    sock = str(work / "nbd.sock")
    print(machine())
    print(f"file {image} ({opts.size_mib} MiB), fio {opts.runtime} s per run, unix sockets")
    print(
        f"{'job':<20} {'nbdkit file':>14} {'replicator shim':>16} {'ratio':>7} {'target':>7}"
        f"      {'Python, pwrite only':>20} {'ratio':>6}"
    )
    servers = ["nbdkit", "shim", "plain"] + ([] if opts.no_replicating else ["replicating"])

    def serve(server: str) -> contextlib.AbstractAsyncContextManager[str]:
        if server == "nbdkit":
            return nbdkit(image, sock)
        if server == "shim":
            return shim(image, sock, work / "journal")
        if server == "plain":
            return plain_python(image, sock)
        return replicating(image, sock, work / "replicating")

    try:
        for name, (args, figure, target, target_replicating) in JOBS.items():
            if opts.job and name not in opts.job:
                continue
            runs: dict[str, list[float]] = {server: [] for server in servers}
            cpu: dict[str, list[tuple[float, float]]] = {server: [] for server in servers}
            for _ in range(opts.repeat):
                for server in servers:
                    await asyncio.to_thread(settle, image)
                    async with serve(server) as uri:
                        got = await fio(uri, args, opts.runtime, size)
                    runs[server].append(got[figure])
                    cpu[server].append((got["cpu s/GB"], got["busy"]))
            if opts.repeat > 1:
                rounds = zip(*runs.values(), strict=True)
                text = " ".join("/".join(f"{value:.0f}" for value in r) for r in rounds)
                print(f"  runs ({'/'.join(servers)}): {text}")
            best = {server: max(values) for server, values in runs.items()}
            peer, ours, plain = best["nbdkit"], best["shim"], best["plain"]
            ratio = ours / peer
            verdict = "ok" if ratio >= target else "MISS"
            print(
                f"{name:<20} {peer:>10.0f} {figure:<4}{ours:>11.0f} {figure:<4}"
                f" {ratio:>6.2f}x {target:>5.2f}x {verdict:<4} {plain:>15.0f} {figure:<4}"
                f" {plain / peer:>5.2f}x",
                flush=True,
            )
            print(
                f"{'':<20} the shim reaches {ours / plain:.2f}x of the same server with no journal",
                flush=True,
            )
            if "replicating" in best:
                live = best["replicating"]
                verdict = "ok" if live / peer >= target_replicating else "MISS"
                print(
                    f"{'':<20} replicating (send + receive on loopback): {live:.0f} {figure},"
                    f" {live / peer:.2f}x of nbdkit (target {target_replicating:.2f}x {verdict})",
                    flush=True,
                )
            print_cpu(name, servers, runs, cpu, best["nbdkit"], figure)
            if figure == "MB/s":
                limit = await asyncio.to_thread(journal_pattern_limit, work / "pattern")
                fresh = await asyncio.to_thread(
                    journal_pattern_limit, work / "pattern", reuse=False
                )
                serial = 1 / (1 / limit + 1 / plain)  # the journal's write, then the image's
                print(
                    f"{'':<20} the disk takes the journal's writes at {limit:.0f} MB/s"
                    f" (into new files: {fresh:.0f}); that and the image's write ({plain:.0f})"
                    f" in series allow {serial:.0f}: the shim reaches {ours / serial:.2f}x of it",
                    flush=True,
                )
    finally:
        if opts.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    uvloop.run(main())
