"""Replication lag of `--capture nbd`: write acknowledged at the source -> applied at the target.

Runs a receiver and a live sender on loopback, measures the shim's maximum 4 KiB random
write IOPS with fio (nbd engine, iodepth 16), then runs fio at half that rate while a probe
writes a unique 4 KiB block through the shim with qemu-io (write + flush) every 50 ms. The
lag of a probe is the time from qemu-io's return (the flush was acknowledged) until the
block is in the replica *and* the receiver has persisted a newer applied LSN
(`applied.state` replaced, which happens after the replica fsync). Prints p50/p99/max.

Usage: python bench/bench_lag.py [--probes 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from _common import REPLICATOR, ROOT, start_receiver

SIZE = 256 * 1024 * 1024


def fio(uri: str, seconds: int, rate: int | None) -> subprocess.Popen[str]:
    cmd = [
        "fio",
        "--name=bg",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        f"--size={SIZE}",
        "--time_based",
        f"--runtime={seconds}",
        "--output-format=json",
        "--verify_state_save=0",
    ]
    if rate:
        cmd.append(f"--rate_iops={rate}")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def iops_of(proc: subprocess.Popen[str]) -> float:
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"fio failed: {err}")
    return float(json.loads(out[out.index("{") :])["jobs"][0]["write"]["iops"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "lag")
    args = parser.parse_args()
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    disk, sock = work / "disk.img", work / "nbd.sock"
    with disk.open("wb") as f:
        f.truncate(SIZE + 64 * 1024 * 1024)  # probes live past fio's range
    rcv, port = start_receiver(
        work / "target",
        stderr=open(work / "receiver.log", "w"),  # noqa: SIM115 - lives as long as the process
        cli_args=tuple(os.environ.get("LAG_RCV_ARGS", "").split()),  # "-vv": apply timings
    )
    snd = subprocess.Popen(
        [
            *REPLICATOR,
            "send",
            "--to",
            f"127.0.0.1:{port}",
            "--job",
            "lag",
            "--state-dir",
            str(work / "state"),
            "--capture",
            "nbd",
            "--nbd-socket",
            str(sock),
            "--insecure",
            str(disk),
        ],
        stderr=subprocess.DEVNULL,
    )
    replica = work / "target" / "lag" / "disk.img"
    state = work / "target" / ".replicator" / "lag" / "applied.state"
    uri = f"nbd+unix:///disk.img?socket={sock}"
    try:
        while not sock.exists():
            time.sleep(0.05)
        max_iops = iops_of(fio(uri, 8, None))
        rate = int(max_iops / 2)
        background = fio(uri, int(args.probes * 0.15) + 10, rate)  # outlasts the probes
        time.sleep(1)
        lags: list[float] = []
        fd = -1
        for i in range(args.probes):
            offset = SIZE + (i % 1000) * 65536
            pattern = (i % 250) + 1
            subprocess.run(
                [
                    "qemu-io",
                    "-f",
                    "raw",
                    "-c",
                    f"write -P {pattern} {offset} 4k",
                    "-c",
                    "flush",
                    uri,
                ],
                check=True,
                capture_output=True,
            )
            acked = time.monotonic()
            before = state.stat().st_ino if state.exists() else 0
            want = bytes([pattern]) * 4096
            while True:
                if fd < 0 and replica.exists():
                    fd = os.open(replica, os.O_RDONLY)
                if fd >= 0 and os.pread(fd, 4096, offset) == want:
                    break
                time.sleep(0.0005)
            while state.stat().st_ino == before:  # the applied LSN was persisted after it
                time.sleep(0.0005)
            lags.append(time.monotonic() - acked)
            time.sleep(0.05)
        background_iops = iops_of(background)
    finally:
        snd.send_signal(signal.SIGTERM)
        snd.wait(timeout=60)
        rcv.send_signal(signal.SIGTERM)
        rcv.wait(timeout=60)
    lags.sort()

    def p(q: float) -> float:
        return lags[min(len(lags) - 1, int(q * len(lags)))] * 1000

    print(f"shim max 4k random write IOPS (qd16, replicating): {max_iops:,.0f}")
    print(f"background load during probes: {background_iops:,.0f} IOPS (target rate {rate:,})")
    print(
        f"lag ack->applied+durable over {len(lags)} probes: p50 {p(0.5):.1f} ms, "
        f"p99 {p(0.99):.1f} ms, max {lags[-1] * 1000:.1f} ms (target p99 <= 100 ms)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
