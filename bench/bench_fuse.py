"""FUSE filter vs ``bindfs`` vs the plain folder: the same fio jobs, side by side.

Our mount journals every write before acknowledging it (to a local journal directory;
no receiver). The filter runs in a child process (``--serve``, pyfuse3 allows one mount
per process) with a task standing in for the sender: every 0.5 s it syncs the journal
and trims what is durable, so the journal does not fill the disk. bindfs (a C FUSE
passthrough, libfuse 2, multithreaded) writes the folder and nothing else.

Jobs (targets from the FUSE issue):
  * 1 MiB sequential writes, buffered, one writer + end fsync: MB/s, target >= 0.7x bindfs
  * 4 KiB random writes, O_DIRECT, libaio iodepth 16: IOPS, target >= 0.5x bindfs

Run: ``.venv/bin/python bench/bench_fuse.py [--runtime 10] [--size-mib 512]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MiB = 1024 * 1024
JOBS: dict[str, tuple[list[str], str, float]] = {
    # name: (fio arguments, figure, target ratio vs bindfs)
    "1M seqwrite": (
        ["--rw=write", "--bs=1M", "--ioengine=psync", "--end_fsync=1"],
        "MB/s",
        0.7,
    ),
    "4k randwrite direct qd16": (
        ["--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=16"],
        "iops",
        0.5,
    ),
}


def fio(path: Path, args: list[str], runtime: int, size: int, cwd: Path) -> dict[str, float]:
    res = subprocess.run(
        [
            "fio",
            "--name=job",
            f"--filename={path}",
            f"--size={size}",
            f"--runtime={runtime}",
            "--time_based",
            "--output-format=json",
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        timeout=runtime * 6 + 60,
    )
    job = json.loads(res.stdout)["jobs"][0]["write"]
    return {"MB/s": job["bw_bytes"] / 1e6, "iops": job["iops"]}


def wait_mounted(mnt: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc.poll() is not None:
            raise RuntimeError(f"mount process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} did not get mounted")
        time.sleep(0.05)


@contextlib.contextmanager
def bindfs(src: Path, mnt: Path) -> Iterator[Path]:
    subprocess.run(["bindfs", str(src), str(mnt)], check=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], check=False, timeout=30)


@contextlib.contextmanager
def our_mount(src: Path, mnt: Path, journal: Path) -> Iterator[Path]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(src), str(mnt), str(journal)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_mounted(mnt, proc)
        yield mnt
    finally:
        proc.send_signal(signal.SIGTERM)
        if proc.wait(timeout=60) != 0:
            raise RuntimeError(f"filter exited with {proc.returncode}")


async def serve(src: Path, mnt: Path, journal_dir: Path) -> None:
    """The filter, plus a stand-in sender that syncs and trims the journal."""
    from replicator.engine.fuse import FuseCapture
    from replicator.journal.journal import Journal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with await Journal.open(journal_dir, segment_bytes=64 * MiB) as journal:

        async def ship() -> None:
            while True:
                await asyncio.sleep(0.5)
                durable = await journal.sync()
                await journal.trim(durable)

        shipper = asyncio.ensure_future(ship())
        try:
            await FuseCapture(src, mnt, journal).run(stop)
        finally:
            shipper.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--serve", nargs=3, type=Path, metavar=("SRC", "MNT", "JOURNAL"))
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve(*args.serve)) if args.uvloop else asyncio.run(serve(*args.serve))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-fuse-", dir="/tmp"))
    src, mnt = work / "src", work / "mnt"
    src.mkdir()
    mnt.mkdir()
    size = args.size_mib * MiB
    results: dict[str, dict[str, float]] = {}
    try:
        for job, (fio_args, figure, _) in JOBS.items():
            row = results.setdefault(job, {})
            target = "data.bin"
            row["plain"] = fio(src / target, fio_args, args.runtime, size, work)[figure]
            (src / target).unlink()
            with bindfs(src, mnt):
                row["bindfs"] = fio(mnt / target, fio_args, args.runtime, size, work)[figure]
            (src / target).unlink()
            with our_mount(src, mnt, work / f"journal-{len(results)}"):
                row["replicator"] = fio(mnt / target, fio_args, args.runtime, size, work)[figure]
            (src / target).unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'job':28} {'figure':6} {'plain':>10} {'bindfs':>10} {'ours':>10} ratio target")
    for job, (_, figure, goal) in JOBS.items():
        row = results[job]
        ratio = row["replicator"] / row["bindfs"]
        print(
            f"{job:28} {figure:6} {row['plain']:10.0f} {row['bindfs']:10.0f} "
            f"{row['replicator']:10.0f} {ratio:5.2f} >= {goal} {'ok' if ratio >= goal else 'MISS'}"
        )


if __name__ == "__main__":
    main()
