"""Probe: a receiver's peak RSS with N senders at once (docs/OPERATIONS.md, "A receiver's
memory").

One ``replicator receive`` on loopback and N ``replicator send --once`` processes, each its
own job and its own mixed image of ``--size-mib`` MiB (bench_send's content), started
together: a first sync each. With ``--second`` each job is first synced, every image then
rewritten whole (odd MiB random, even MiB a constant) and sent again, measured on a new
receiver: the journalled path, where the appliers' kept records count too. Prints one
JSON line per N: seconds, aggregate MB/s, the receiver's RSS at start and its peak
(VmHWM). Options after ``--`` go to ``replicator receive`` (e.g. ``--in-flight-max 64M``).

Usage: python bench/probes/many_senders_memory.py [--n 1,8,16,32] [--size-mib 128]
       [--second] [--work DIR] [-- RECEIVE_OPTIONS...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import ROOT, start_receiver
from bench_send import make_mixed_image, send_command, vm_hwm_kib, warm

MIB = 1024 * 1024


def send_all(port: int, work: Path, images: list[Path]) -> tuple[float, list[str]]:
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            send_command(port, f"j{k}", work / f"state{k}", image),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for k, image in enumerate(images)
    ]
    errors = [p.communicate()[1].decode()[-300:] for p in procs]
    seconds = time.perf_counter() - start
    return seconds, [err for p, err in zip(procs, errors, strict=True) if p.returncode]


def rewrite(image: Path, seed: int) -> None:
    with image.open("r+b") as f:
        for mib in range(image.stat().st_size // MIB):
            f.write(os.urandom(MIB) if mib % 2 else bytes([seed % 255 + 1]) * MIB)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="1,8,16,32", help="numbers of senders, comma-separated")
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--second", action="store_true", help="measure a second, journalled send")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "many_memory")
    parser.add_argument("receive", nargs="*", help="options for replicator receive (after --)")
    args = parser.parse_args()
    counts = [int(n) for n in args.n.split(",")]
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    images = [work / "src" / f"disk{k}.img" for k in range(max(counts))]
    for k, image in enumerate(images):
        make_mixed_image(image, args.size_mib, seed=100 + k)
    security = ("--insecure", *args.receive)
    for n in counts:
        run = work / f"n{n}"
        if args.second:
            receiver, port = start_receiver(run / "rcv", security=security)
            send_all(port, run, images[:n])
            receiver.send_signal(signal.SIGTERM)
            receiver.wait(timeout=60)
            for k, image in enumerate(images[:n]):
                rewrite(image, k)
        for image in images[:n]:
            warm(image)
        receiver, port = start_receiver(run / "rcv", security=security)
        try:
            start_rss = vm_hwm_kib(receiver.pid)
            seconds, failed = send_all(port, run, images[:n])
            peak = vm_hwm_kib(receiver.pid)
        finally:
            receiver.send_signal(signal.SIGTERM)
            receiver.wait(timeout=60)
        data_mb = n * args.size_mib * MIB / 1e6
        print(
            json.dumps(
                {
                    "senders": n,
                    "second": args.second,
                    "seconds": round(seconds, 2),
                    "mb_per_s": round(data_mb / seconds, 1),
                    "start_rss_mib": start_rss // 1024,
                    "peak_rss_mib": peak // 1024,
                    "failed": failed,
                }
            ),
            flush=True,
        )
        shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
