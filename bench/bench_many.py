"""Many to one: 8 jobs syncing into one receiver at once, against one job alone.

Each job is an initial ``send --once`` of its own mixed image (bench_send's content, a
different seed per job) into a fresh replica on one ``replicator receive`` on loopback.
One round times a single job alone (MB/s = image bytes / seconds) and ``--jobs`` jobs
started together (aggregate MB/s = all their image bytes / seconds until the last one is
done), each with a new receiver folder and new sender state folders; which of the two
goes first alternates between rounds. Target: aggregate >= 0.8x of the single job.

Usage: python bench/bench_many.py [--jobs 8] [--size-mib 256] [--repeat 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from _common import ROOT, compile_bytecode, load_average, start_receiver
from bench_send import make_mixed_image, send_command, vm_hwm_kib, warm

MB = 1_000_000


def run_jobs(work: Path, images: list[Path], tag: str) -> dict[str, Any]:
    """Initial syncs of ``images`` at once into one new receiver; seconds until all done."""
    shutil.rmtree(work / tag, ignore_errors=True)
    for image in images:
        warm(image)
    receiver, port = start_receiver(work / tag / "rcv")
    try:
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                send_command(port, f"{tag}{k}", work / tag / f"state{k}", image),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for k, image in enumerate(images)
        ]
        outputs = [proc.communicate() for proc in procs]
        seconds = time.perf_counter() - start
        for proc, (_, err) in zip(procs, outputs, strict=True):
            if proc.returncode != 0:
                raise SystemExit(f"send --once failed: {err.decode()[-2000:]}")
        receiver_rss = vm_hwm_kib(receiver.pid)
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(timeout=60)
    data = sum(image.stat().st_size for image in images)
    per_job = [json.loads(out)["seconds"] for out, _ in outputs]
    shutil.rmtree(work / tag, ignore_errors=True)  # the replicas: GiBs the next round needs
    return {
        "jobs": len(images),
        "seconds": seconds,
        "mb_per_s": data / MB / seconds,
        "job_seconds": per_job,
        "receiver_rss_mib": receiver_rss / 1024,
        "load_average": load_average(),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=256, help="each job's image")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "many")
    args = parser.parse_args()
    work: Path = args.work
    compile_bytecode()
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    images = [work / "src" / f"disk{k}.img" for k in range(args.jobs)]
    for k, image in enumerate(images):
        make_mixed_image(image, args.size_mib, seed=100 + k)
    rounds: list[dict[str, Any]] = []
    ratios: list[float] = []
    for r in range(args.repeat):
        order = ("one", "many") if r % 2 == 0 else ("many", "one")
        got = {
            which: run_jobs(work, images[:1] if which == "one" else images, which)
            for which in order
        }
        ratio: float = got["many"]["mb_per_s"] / got["one"]["mb_per_s"]
        rounds.append({**got, "ratio": ratio})
        ratios.append(ratio)
    spread = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    results = {
        "jobs": args.jobs,
        "image_bytes": args.size_mib * 1024 * 1024,
        "rounds": rounds,
        "ratio": spread,
    }
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{args.jobs} jobs x {args.size_mib} MiB mixed images, initial send --once each")
    for g in rounds:
        one, many = g["one"], g["many"]
        print(
            f"one job alone {one['mb_per_s']:6.1f} MB/s ({one['seconds']:.2f} s)   "
            f"{args.jobs} at once {many['mb_per_s']:6.1f} MB/s aggregate ({many['seconds']:.2f} s,"
            f" receiver peak RSS {many['receiver_rss_mib']:.0f} MiB)   ratio {g['ratio']:.2f}x"
            f"   load {many['load_average']}"
        )
    print(
        f"ratio median {spread['median']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f}) "
        "(target >= 0.8)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
