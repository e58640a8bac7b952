"""FUSE filter vs ``bindfs`` vs the plain folder: the same fio jobs, side by side.

Two columns for our mount:

* ``replicating``: what the issue measures. ``replicator send --capture fuse`` (the real
  CLI) mounts the folder and ships every journaled write to a ``replicator receive`` on
  loopback, which journals, applies and fsyncs it on the same 2 cores.
* ``journal only``: the filter alone (``--serve``, pyfuse3 allows one mount per process)
  with a task standing in for the sender: every tick of the sender (``live.TICK``) it
  syncs the journal and trims what is durable. It shows the filter's own ceiling.

bindfs's writes reach the disk only at fio's end fsync, and mostly as rewrites of the same
512 MiB; every byte our filter journals must reach the disk before it ships. So the 1 MiB
job is also set beside the disk's rate for the journal's write pattern with none of our
code (``_common.journal_pattern_limit``), measured in the same run.

bindfs (a C FUSE passthrough, libfuse 2) writes the folder and nothing else. It runs
single-threaded with 4 KiB writes by default (``bindfs``), and at its best with
``--multithreaded -o big_writes`` (``bindfs -M bw``); the ratio is taken against the
faster of the two. Figures move between runs on this shared
machine, so every column is run ``--repeat`` times, interleaved in a rotating order after
a ``sync``, and the median is reported with the range.

Jobs (targets: the speed issue's for 1 MiB, which replaced the FUSE issue's 0.7x; the FUSE
issue's for 4 KiB):
  * 1 MiB sequential writes, buffered, one writer + end fsync: MB/s, target >= 0.45x bindfs
  * 4 KiB random writes, O_DIRECT, libaio iodepth 16: IOPS, target >= 0.5x bindfs

Run: ``.venv/bin/python bench/bench_fuse.py [--runtime 10] [--size-mib 512] [--repeat 3]
[--job NAME] [--column NAME]`` (the filters repeatable; the ratio needs ``replicating`` and a
bindfs column).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _common import (
    REPLICATOR,
    cpu_since,
    journal_pattern_limit,
    machine,
    machine_cpu,
    stand_in_shipper,
    start_receiver,
)

MiB = 1024 * 1024
LOG_JSON = ("--log-format", "json")
JOBS: dict[str, tuple[list[str], str, float]] = {
    # name: (fio arguments, figure, target ratio vs bindfs)
    "1M seqwrite": (
        ["--rw=write", "--bs=1M", "--ioengine=psync", "--end_fsync=1"],
        "MB/s",
        0.45,
    ),
    "4k randwrite direct qd16": (
        ["--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=16"],
        "iops",
        0.5,
    ),
}


def fio(path: Path, args: list[str], runtime: int, size: int, cwd: Path) -> dict[str, float]:
    """fio's figures, and the machine's CPU over its run: ``cpu s/GB`` (busy CPU-seconds of
    every process and the kernel per GB fio wrote) and ``busy`` (the share of all vCPUs)."""
    start = machine_cpu()
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
    return {"MB/s": job["bw_bytes"] / 1e6, "iops": job["iops"], **cpu_since(start, job["io_bytes"])}


def wait_mounted(mnt: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc.poll() is not None:
            raise RuntimeError(f"mount process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} did not get mounted")
        time.sleep(0.05)


@contextlib.contextmanager
def bindfs(src: Path, mnt: Path, *options: str) -> Iterator[Path]:
    subprocess.run(["bindfs", *options, str(src), str(mnt)], check=True, timeout=30)
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


@contextlib.contextmanager
def replicating_mount(src: Path, mnt: Path, work: Path) -> Iterator[Path]:
    """``replicator send --capture fuse`` into a ``replicator receive`` on loopback."""
    logs = (work / "receiver.log").open("ab"), (work / "sender.log").open("ab")
    receiver, port = start_receiver(work / "replica", stderr=logs[0], cli_args=LOG_JSON)
    sender: subprocess.Popen[bytes] | None = None
    try:
        sender = subprocess.Popen(
            [*REPLICATOR, *LOG_JSON, "send", "--to", f"127.0.0.1:{port}", "--job", "bench",
             "--state-dir", str(work / "send-state"), "--capture", "fuse", "--mount", str(mnt),
             "--insecure", str(src)],
            stdout=subprocess.DEVNULL, stderr=logs[1],
        )  # fmt: skip
        wait_mounted(mnt, sender, timeout=60)
        yield mnt
    finally:
        for proc in (sender, receiver):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
        for f in logs:
            f.close()
        shutil.rmtree(work / "replica", ignore_errors=True)
        shutil.rmtree(work / "send-state", ignore_errors=True)


async def serve(src: Path, mnt: Path, journal_dir: Path) -> None:
    """The filter, plus a stand-in sender that syncs and trims the journal."""
    from replicator.engine.fuse import FuseCapture
    from replicator.journal.journal import Journal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with await Journal.open(journal_dir, segment_bytes=64 * MiB) as journal:
        shipper = asyncio.ensure_future(stand_in_shipper(journal))
        try:
            await FuseCapture(src, mnt, journal).run(stop)
        finally:
            shipper.cancel()


COLUMNS = ("plain", "bindfs", "bindfs -M bw", "journal only", "replicating")
PEERS = ("bindfs", "bindfs -M bw")


def measure(
    column: str, work: Path, fio_args: list[str], runtime: int, size: int
) -> dict[str, float]:
    src, mnt = work / "src", work / "mnt"
    target = "data.bin"
    if column == "plain":
        mount: contextlib.AbstractContextManager[Path] = contextlib.nullcontext(src)
    elif column == "bindfs":
        mount = bindfs(src, mnt)
    elif column == "bindfs -M bw":
        mount = bindfs(src, mnt, "--multithreaded", "-o", "big_writes")
    elif column == "journal only":
        mount = our_mount(src, mnt, work / "journal")
    else:
        mount = replicating_mount(src, mnt, work)
    try:
        with mount as folder:
            figures = fio(folder / target, fio_args, runtime, size, work)
    finally:
        (src / target).unlink(missing_ok=True)
        shutil.rmtree(work / "journal", ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--serve", nargs=3, type=Path, metavar=("SRC", "MNT", "JOURNAL"))
    parser.add_argument(
        "--job", choices=sorted(JOBS), action="append", help="run only this job (repeatable)"
    )
    parser.add_argument(
        "--column",
        choices=COLUMNS,
        action="append",
        help="measure only this column (repeatable; the ratio needs replicating and a bindfs)",
    )
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve(*args.serve)) if args.uvloop else asyncio.run(serve(*args.serve))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-fuse-", dir="/tmp"))
    (work / "src").mkdir()
    (work / "mnt").mkdir()
    size = args.size_mib * MiB
    jobs = {name: spec for name, spec in JOBS.items() if not args.job or name in args.job}
    columns = tuple(c for c in COLUMNS if not args.column or c in args.column)
    runs: dict[tuple[str, str], list[float]] = {}
    cpu_runs: dict[tuple[str, str, str], list[float]] = {}
    try:
        for job, (fio_args, figure, _) in jobs.items():
            for rep in range(args.repeat):
                for k in range(len(columns)):  # rotated, so no column always follows another
                    column = columns[(k + rep) % len(columns)]
                    os.sync()  # the previous run's dirty pages must not slow this one down
                    figures = measure(column, work, fio_args, args.runtime, size)
                    for name in (figure, "cpu s/GB", "busy"):
                        cpu_runs.setdefault((job, column, name), []).append(figures[name])
                    runs.setdefault((job, column), []).append(figures[figure])
        disk = journal_pattern_limit(work / "pattern")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(machine())
    print(f"median of {args.repeat} interleaved runs, {args.runtime} s each (min-max)")
    print("ratio: replicating / the faster bindfs")
    print(f"{'job':26} {'figure':6}" + "".join(f" {c:>20}" for c in columns) + "  ratio target")
    for job, (_, figure, goal) in jobs.items():
        cells, medians = [], {}
        for column in columns:
            values = runs[(job, column)]
            medians[column] = statistics.median(values)
            cells.append(f"{medians[column]:.0f} ({min(values):.0f}-{max(values):.0f})")
        peers = [medians[peer] for peer in PEERS if peer in medians]
        verdict = "(not measured)"
        if "replicating" in medians and peers:
            ratio = medians["replicating"] / max(peers)
            verdict = f"{ratio:5.2f} >= {goal} {'ok' if ratio >= goal else 'MISS'}"
        print(f"{job:26} {figure:6}" + "".join(f" {c:>20}" for c in cells) + f"  {verdict}")
        if figure == "MB/s":
            cpu_report(job, columns, cpu_runs, peers)
        if figure == "MB/s" and {"journal only", "replicating"} <= medians.keys():
            print(
                f"{'':26} the disk takes the journal's write pattern at {disk:.0f} MB/s:"
                f" journal only reaches {medians['journal only'] / disk:.2f}x of it,"
                f" replicating {medians['replicating'] / disk:.2f}x (its receiver writes"
                " the same disk)"
            )


def cpu_report(
    job: str,
    columns: tuple[str, ...],
    cpu_runs: dict[tuple[str, str, str], list[float]],
    peers: list[float],
) -> None:
    """Each column's CPU per GB and the vCPUs' busy share over its fio run (medians), and
    the replicating job's CPU ceiling: its figure if the same work per byte had every
    vCPU busy, i.e. the most any schedule of this work reaches on this machine."""
    cells = []
    for column in columns:
        per_gb = statistics.median(cpu_runs[(job, column, "cpu s/GB")])
        busy = statistics.median(cpu_runs[(job, column, "busy")])
        cells.append(f"{per_gb:.2f} s/GB, {busy:.0%} busy")
    print(f"{'':26} {'CPU':6}" + "".join(f" {c:>20}" for c in cells))
    if "replicating" not in columns:
        return
    ceilings = [
        mbs / busy
        for mbs, busy in zip(
            cpu_runs[(job, "replicating", "MB/s")],
            cpu_runs[(job, "replicating", "busy")],
            strict=True,
        )
    ]
    ceiling = statistics.median(ceilings)
    versus = f" = {ceiling / max(peers):.2f}x the faster bindfs" if peers else ""
    print(
        f"{'':26} replicating with all {os.cpu_count()} vCPUs busy (the same CPU per byte):"
        f" {ceiling:.0f} MB/s{versus}"
    )


if __name__ == "__main__":
    main()
