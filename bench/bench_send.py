"""Initial and 1%-changed sync of a 1 GiB mixed image: `replicator send --once` vs rsync.

Both run in the same session on the same files, warm page cache for both:

* initial: `replicator send --once` to a fresh receiver on loopback vs `rsync --whole-file
  --fsync` (durable, as ours is: the target's peer) and plain `rsync --whole-file`
  into an empty folder;
* after changing 1% of the image in random 64 KiB extents: `send --once` vs
  `rsync --inplace --no-whole-file --ignore-times` onto the previous copy (without
  --ignore-times rsync's quick check skips a file changed within the second it was
  copied); payload bytes / changed bytes;
* peak RSS of the sender and of the receiver (from wait4 / VmHWM);
* beside the 1% figure, the limit of this machine: the whole machine's busy CPU over our
  run (every process, the kernel; ``/proc/stat``), and the ratio it would give spread on
  every vCPU, or that of a start alone (timed as ``send --help``: the interpreter, the
  imports, the command line) when longer. No schedule of the same work does better on
  this machine (the scan's hashing runs beside the start since engine/early_hashing.py;
  before, the floor counted the start on one vCPU and only the rest on all).

Before every timed run the page cache is written out (``sync``), so no tool pays for the
dirty pages another step left. This VM's disk writes at a rate that depends on what was
written and deleted before (the same ``rsync --fsync`` of the image into a new folder took
1.8 s in one place of a sequence and 4.4-4.7 s in another; ext4 is mounted with
``discard`` here, so a freed block the host dropped must be allocated again), so one
initial copy per tool says little. ``dd conv=fdatasync,sparse`` of the image into a new
file in each round gives the disk's own time for the same bytes (the zeros skipped, as
ours skips them), and ``--settle`` adds seconds of quiet before each copy.
The initial step runs ``--initial-rounds`` times into fresh targets (a fresh receiver
folder, fresh rsync folders, all deleted after the round), the 1%-changed step
``--repeat`` times (a different 1% each time); in both, which tool goes first
alternates, and the median and the range are reported.
``--data-mib`` makes the image sparse: that much mixed data spread evenly over
``--size-mib`` (e.g. 8 GiB with 1 GiB of data, where fixed costs matter less); rsync then
gets ``--sparse`` for the initial copy.
The package is byte-compiled first, as ``pip install`` does (see _common.compile_bytecode).

Usage: python bench/bench_send.py [--size-mib 1024] [--data-mib N] [--initial-rounds 3]
[--settle 0] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from _common import (
    REPLICATOR,
    ROOT,
    compile_bytecode,
    load_average,
    machine,
    machine_cpu,
    start_receiver,
)

VCPUS = os.cpu_count() or 1
MIB = 1024 * 1024


def make_mixed_image(path: Path, size_mib: int, seed: int = 7, data_mib: int | None = None) -> None:
    """Quarter text, quarter binaries, quarter zeros, quarter random, in shuffled 1 MiB blocks.

    ``data_mib`` (less than ``size_mib``): a sparse image with that many such blocks
    spread evenly over it, holes between them.
    """
    blocks = size_mib if data_mib is None else min(data_mib, size_mib)
    with path.open("wb") as f:
        f.truncate(size_mib * MIB)
        for i, block in enumerate(mixed_blocks(blocks, seed)):
            f.seek((i * size_mib // blocks) * MIB)
            f.write(block)


def mixed_blocks(count: int, seed: int) -> Iterator[bytes]:
    """``count`` 1 MiB blocks of mixed content (see ``make_mixed_image``)."""
    rng = random.Random(seed)
    words = [b"replica", b"journal", b"extent", b"epoch", b"barrier", b"volume", b"sector"]
    text = b" ".join(rng.choice(words) for _ in range(400_000))[:MIB]
    binaries = b"".join(
        p.read_bytes()
        for p in sorted(Path("/usr/bin").iterdir())[:60]
        if p.is_file() and not p.is_symlink()
    )
    kinds = ["text", "bin", "zero", "rand"] * (count // 4 + 1)
    rng.shuffle(kinds)
    for i, kind in enumerate(kinds[:count]):
        if kind == "text":
            yield text[i % 997 :] + text[: i % 997]
        elif kind == "bin":
            start = (i * MIB) % max(1, len(binaries) - MIB)
            yield binaries[start : start + MIB].ljust(MIB, b"\0")
        elif kind == "zero":
            yield bytes(MIB)
        else:
            yield rng.randbytes(MIB)


def change_one_percent(path: Path, seed: int = 11) -> int:
    rng = random.Random(seed)
    size = path.stat().st_size
    extents = size // (64 * 1024)
    chosen = rng.sample(range(extents), max(1, extents // 100))
    with path.open("r+b") as f:
        for e in chosen:
            f.seek(e * 64 * 1024)
            f.write(rng.randbytes(64 * 1024))
    return len(chosen) * 64 * 1024


def send_command(port: int, job: str, state: Path, image: Path) -> list[str]:
    """``replicator send --once --json`` of ``image`` to a receiver on loopback."""
    return [
        *REPLICATOR,
        "send",
        "--to",
        f"127.0.0.1:{port}",
        "--job",
        job,
        "--state-dir",
        str(state),
        "--once",
        "--json",
        "--insecure",
        str(image),
    ]


class Timed(NamedTuple):
    seconds: float
    peak_kib: int  # peak RSS sampled from /proc VmHWM
    out: str  # stdout
    busy_cpu_s: float  # the whole machine's busy CPU over the run (/proc/stat, 10 ms ticks)


def timed(cmd: list[str], settle: float = 0.0) -> Timed:
    """Run ``cmd`` after writing out the page cache and ``settle`` seconds more.

    wait4's ru_maxrss is not used: after a vfork+exec it can report the parent's RSS. The
    CPU is the machine's, not the process's: it takes in what the command makes others do
    (our sender's hashing helpers, the receiver, the kernel's writeback).
    """
    os.sync()  # nothing dirty from an earlier step: each tool writes only its own bytes
    time.sleep(settle)
    cpu = machine_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, vm_hwm_kib(proc.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.01)
    out_b, err_b = proc.communicate()
    elapsed = time.perf_counter() - start
    busy = machine_cpu()[0] - cpu[0]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err_b.decode()[-2000:]}")
    return Timed(elapsed, peak, out_b.decode(), busy)


def warm(path: Path) -> None:
    """Pull a file into the page cache without growing this process."""
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def spread(values: list[float]) -> dict[str, float]:
    """Median and range of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def changed_round(
    send: list[str], image: Path, copy: Path, seed: int, ours_first: bool
) -> dict[str, Any]:
    """Change a new 1% of ``image``; time ``send --once`` and rsync onto ``copy``."""
    changed = change_one_percent(image, seed)
    warm(image)
    rsync = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", str(image), f"{copy}/"]
    runs: dict[str, Timed] = {}
    for tool in ("ours", "rsync") if ours_first else ("rsync", "ours"):
        runs[tool] = timed(send if tool == "ours" else rsync)
    ours = runs["ours"]
    summary = json.loads(ours.out)
    # a start as ours has (the interpreter, the imports, the command line) on one vCPU;
    # the scan's hashing runs beside it (engine/early_hashing.py), so the machine's CPU on
    # every vCPU bounds the time, or the start when that is longer
    start = timed([*send[: send.index("send") + 1], "--help"]).seconds
    floor = max(start, ours.busy_cpu_s / VCPUS)
    return {
        "changed_bytes": changed,
        "replicator_s": ours.seconds,
        "rsync_inplace_s": runs["rsync"].seconds,
        "ratio": ours.seconds / runs["rsync"].seconds,
        # the least any schedule of this work can take: its CPU with every vCPU busy, or
        # the start (one vCPU) when that is longer
        "replicator_cpu_s": ours.busy_cpu_s,
        "start_s": start,
        "cpu_floor_ratio": floor / runs["rsync"].seconds,
        "payload_bytes": summary["payload_bytes"],
        "data_bytes": summary["bytes_changed"],
        "sender_rss_kib": ours.peak_kib,
        "load_average": load_average(),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument(
        "--data-mib", type=int, default=None, help="sparse image: this much data (default: full)"
    )
    parser.add_argument(
        "--initial-rounds",
        type=int,
        default=3,
        help="initial syncs of each (0: only the 1%% change, after one untimed first sync)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds of quiet before each initial copy (see the module docstring)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the 1%% change")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "send")
    args = parser.parse_args()
    work: Path = args.work
    compile_bytecode()
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    image = work / "src" / "disk.img"
    make_mixed_image(image, args.size_mib, data_mib=args.data_mib)
    warm(image)  # warm page cache for both tools

    results: dict[str, Any] = {
        "size_bytes": image.stat().st_size,
        "data_bytes": os.stat(image).st_blocks * 512,
        "machine": machine(),
        "load_average_start": load_average(),
    }
    sparse = ["--sparse"] if args.data_mib else []
    rsync = ["rsync", "--whole-file", *sparse, str(image)]
    rsync_fsync = ["rsync", "--whole-file", "--fsync", *sparse, str(image)]
    initial: list[dict[str, float]] = []
    wire_bytes = rss_send = rss_receive = 0
    settle = args.settle
    dd = ["dd", f"if={image}", "bs=1M", "conv=fdatasync,sparse", "status=none"]
    for k in range(args.initial_rounds):  # each into fresh targets, deleted after the round
        t: dict[str, float] = {}
        rcv, port = start_receiver(work / "rcv-initial")
        (work / "disk-limit").mkdir()
        try:
            for tool in ("ours", "rsync") if k % 2 == 0 else ("rsync", "ours"):
                if tool == "ours":
                    ours = send_command(port, "bench", work / "state-initial", image)
                    run = timed(ours, settle)
                    t["ours"] = run.seconds
                    wire_bytes = json.loads(run.out)["wire_bytes"]
                    rss_send = max(rss_send, run.peak_kib)
                else:  # durable like ours (the peer), and plain for reference
                    t["fsync"] = timed([*rsync_fsync, f"{work / 'rsync-fsync'}/"], settle).seconds
                    t["plain"] = timed([*rsync, f"{work / 'rsync-plain'}/"], settle).seconds
            # the disk's own rate for writing these bytes into a new file, nothing else
            t["disk"] = timed([*dd, f"of={work / 'disk-limit' / 'disk.img'}"], settle).seconds
            rss_receive = max(rss_receive, vm_hwm_kib(rcv.pid))
        finally:
            rcv.send_signal(signal.SIGTERM)
            rcv.wait(timeout=60)
        for done in ("rcv-initial", "state-initial", "rsync-fsync", "rsync-plain", "disk-limit"):
            shutil.rmtree(work / done)
        initial.append(t)
    # the changed rounds start from a replica and a copy of the image as it is now
    receiver, port = start_receiver(work / "rcv")
    send = send_command(port, "bench", work / "state", image)
    try:
        timed(send)
        timed([*rsync, f"{work / 'rsync'}/"])
        results["initial"] = (
            None
            if not initial
            else {
                "rounds": initial,
                "replicator_s": spread([r["ours"] for r in initial]),
                "rsync_whole_file_fsync_s": spread([r["fsync"] for r in initial]),
                "rsync_whole_file_s": spread([r["plain"] for r in initial]),
                "ratio": spread([r["ours"] / r["fsync"] for r in initial]),
                "ratio_to_plain": spread([r["ours"] / r["plain"] for r in initial]),
                "disk_s": spread([r["disk"] for r in initial]),
                "ratio_to_disk": spread([r["ours"] / r["disk"] for r in initial]),
                "settle_s": settle,
                "wire_bytes": wire_bytes,
                "load_average": load_average(),
            }
        )
        rounds = [
            changed_round(send, image, work / "rsync", 11 + k, ours_first=k % 2 == 0)
            for k in range(args.repeat)
        ]
        last = rounds[-1]
        results["changed_1pct"] = {
            "rounds": rounds,
            "replicator_s": spread([r["replicator_s"] for r in rounds]),
            "rsync_inplace_s": spread([r["rsync_inplace_s"] for r in rounds]),
            "ratio": spread([r["ratio"] for r in rounds]),
            "replicator_cpu_s": spread([r["replicator_cpu_s"] for r in rounds]),
            "start_s": spread([r["start_s"] for r in rounds]),
            "cpu_floor_ratio": spread([r["cpu_floor_ratio"] for r in rounds]),
            "changed_bytes": last["changed_bytes"],
            "payload_bytes": last["payload_bytes"],
            "payload_over_changed": last["payload_bytes"] / last["changed_bytes"],
        }
        results["peak_rss_mib"] = {
            "sender": max(rss_send, *(r["sender_rss_kib"] for r in rounds)) / 1024,
            "receiver": max(rss_receive, vm_hwm_kib(receiver.pid)) / 1024,
        }
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(timeout=60)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_results(results)
    return 0


def print_results(results: dict[str, Any]) -> None:
    i, c, r = results["initial"], results["changed_1pct"], results["peak_rss_mib"]
    print(results["machine"])
    print(
        f"image {results['size_bytes'] / MIB:.0f} MiB mixed (text/binaries/zeros/random), "
        f"{results['data_bytes'] / MIB:.0f} MiB allocated; load average at start "
        f"{results['load_average_start']}"
    )
    if not i:
        print("initial          not timed (--initial-rounds 0)")
    else:
        _print_initial(i)
    print(
        f"1% changed x{len(c['rounds'])}    replicator {_spread(c['replicator_s'], 's')}   "
        f"rsync --inplace {_spread(c['rsync_inplace_s'], 's')}   ratio "
        f"{_spread(c['ratio'], 'x')} (target <= 0.5)"
    )
    print(
        f"{'':17}the machine's CPU over our run {_spread(c['replicator_cpu_s'], ' CPU-s')}, "
        f"on all {VCPUS} vCPUs (or a start, send --help, {_spread(c['start_s'], 's')}, if "
        f"longer) gives {_spread(c['cpu_floor_ratio'], 'x')} of rsync (no schedule of this "
        f"work does better here)"
    )
    print(
        f"payload on wire  {c['payload_bytes']} B for {c['changed_bytes']} B changed: "
        f"{c['payload_over_changed']:.3f}x (target <= 1.1)"
    )
    print(
        f"peak RSS         sender {r['sender']:.0f} MiB, receiver {r['receiver']:.0f} MiB "
        f"(target <= 200); load average at the end {load_average()}"
    )


def _print_initial(i: dict[str, Any]) -> None:
    print(
        f"initial x{len(i['rounds'])}       replicator {_spread(i['replicator_s'], 's')}   "
        f"rsync --whole-file --fsync {_spread(i['rsync_whole_file_fsync_s'], 's')}   ratio "
        f"{_spread(i['ratio'], 'x')} (target <= 1.0); without --fsync "
        f"{_spread(i['rsync_whole_file_s'], 's')} ({_spread(i['ratio_to_plain'], 'x')}); "
        f"dd conv=fdatasync {_spread(i['disk_s'], 's')} ({_spread(i['ratio_to_disk'], 'x')})"
    )


def _spread(figure: dict[str, float], unit: str) -> str:
    return f"{figure['median']:.2f}{unit} ({figure['min']:.2f}-{figure['max']:.2f})"


if __name__ == "__main__":
    raise SystemExit(main())
