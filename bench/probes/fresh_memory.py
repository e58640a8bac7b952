"""Probe: what writing into memory the machine has not used lately costs it.

Two measurements, each meant to cost the same on an ordinary machine whatever their
parameter, and printed so that a machine where they do not can be recognised:

1. The system CPU of writing ``--mib`` MiB of new data into a new file in pwrites of each
   piece size, pausing ``--pace`` seconds after every MiB (a replica written at a link's
   rate, not a ``dd``).
2. Seconds to write each GiB of ``--gib`` GiB of anonymous memory never touched before.
   An ordinary machine takes ~0.3-0.4 s for every GiB.

On the VM of bench/RESULTS.md "2026-12-04" the first GiB took 0.4 s and each later one
1-12 s, varying from minute to minute, and 1 MiB pieces cost 10-30 times the CPU of 64-256
KiB pieces. That VM hands its free memory back to its host (virtio-balloon free page
reporting), so a page the host took back faults into the host when first written again;
a write of 1 MiB goes into one large page-cache folio, carved from exactly those free
blocks, while small folios come first from the small free fragments still backed.
Usage: python bench/probes/fresh_memory.py [--dir /tmp]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import resource
import tempfile
import time

MiB = 1024 * 1024
GiB = 1024 * MiB


def touch_seconds(gib: int) -> list[float]:
    """Seconds to write each GiB of ``gib`` GiB of new anonymous memory."""
    area = mmap.mmap(-1, gib * GiB)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(area))  # valid while the map is
        seconds = []
        for n in range(gib):
            start = time.perf_counter()
            ctypes.memset(base + n * GiB, 1, GiB)
            seconds.append(time.perf_counter() - start)
        return seconds
    finally:
        area.close()


def system_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def paced_write(path: str, piece: int, mib: int, pace: float) -> float:
    """System CPU-seconds to write ``mib`` MiB in ``piece``-byte pwrites, ``pace`` s apart."""
    data = memoryview(os.urandom(MiB))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = system_seconds()
        for n in range(mib):
            for at in range(0, MiB, piece):
                os.pwrite(fd, data[at : at + piece], n * MiB + at)
            time.sleep(pace)
        return system_seconds() - start
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where the file is written")
    parser.add_argument("--gib", type=int, default=3, help="anonymous memory to write")
    parser.add_argument("--mib", type=int, default=800, help="file data per piece size")
    parser.add_argument("--pace", type=float, default=0.008, help="seconds after each MiB")
    parser.add_argument("--sizes-kib", default="1024,512,256,64,4")
    args = parser.parse_args()
    # file data first: the memory the anonymous probe frees stays backed for a while
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        for kib in (int(k) for k in args.sizes_kib.split(",")):
            cpu = paced_write(os.path.join(work, "probe"), kib * 1024, args.mib, args.pace)
            print(f"file data in {kib:4d} KiB pieces: {cpu:.2f} s of system CPU", flush=True)
    seconds = ", ".join(f"{s:.2f}" for s in touch_seconds(args.gib))
    print(f"anonymous memory, seconds per GiB in turn: {seconds}", flush=True)


if __name__ == "__main__":
    main()
