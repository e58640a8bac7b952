"""`make bench`: run every benchmark in bench/ and print their side-by-side figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _common import machine

HERE = Path(__file__).resolve().parent
BENCHES = [
    "bench_journal.py",
    "bench_send.py",
    "bench_many.py",
    "bench_tls.py",
    "bench_nbd.py",
    "bench_nbd_offload.py",
    "bench_lag.py",
    "bench_fuse.py",
    "bench_wan.py",
    "bench_codecs.py",
    "bench_failover.py",
]


def main() -> int:
    print(machine(), flush=True)
    failed = 0
    for name in BENCHES:
        path = HERE / name
        if not path.exists():
            continue
        print(f"\n### {name}", flush=True)
        failed |= subprocess.run([sys.executable, str(path)]).returncode != 0
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main())
