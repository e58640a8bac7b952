"""Failover RTO and failback cost on this machine, with the real CLI on real raw disks.

* planned: `replicator failover --planned --json --exec true` while `send --capture nbd`
  serves N sparse raw disks (default four of 4 GiB, made with qemu-img) and its backlog is
  empty (one 1 MiB write per disk, applied): the command's own ``promote_seconds`` (start
  to promoted) and ``rto_seconds`` (start to `--exec` started), and the wall time
  including the CLI's Python start. The sender must exit 12 ("handed over").
* forced: `failover --force --json --exec true` at rest (receiver stopped) for the same
  kind of job.
* forced mid-burst: the same, but with both `send` and `receive` killed (SIGKILL) after
  ``--burst`` seconds of fio writing 1 MiB blocks at queue depth 4 over the first 512 MiB
  of the first disk (written once and replicated before, so overwritten in place):
  the receiver holds what it took and had not applied, and the promotion applies it
  first (the receiver's backlog limit, engine/window.py, bounds it). Also prints the
  receive journal's size at the kill.
* failback: a sparse 4 GiB disk holding 256 MiB of data, sent once, failed over at rest,
  then 1% changed on each side (promoted replica: over data and over a hole; old source:
  over data elsewhere); `replicator failback --from ... --json` moves ``bytes_moved``
  (target <= 3% of the disk), then both sides must be identical (blake3) and the next
  `send --once` must carry next to nothing.

Each planned/forced round starts from fresh state (a promoted job cannot be promoted
again). Everything runs in a temporary folder that is removed at the end, child
processes included, also after an error.

Usage: python bench/bench_failover.py [--rounds 3] [--disks 4] [--disk-gib 4] [--burst 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import blake3
from _common import REPLICATOR, journal_files_bytes, start_receiver

MIB = 1024 * 1024
GIB = 1024 * MIB
EXTENT = 64 * 1024


class Children:
    """The child processes of a step: stopped (SIGTERM, then SIGKILL) on the way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[Any]] = []

    def log(self, path: Path) -> IO[Any]:
        f = path.open("ab")
        self.logs.append(f)
        return f

    def receiver(self, directory: Path, log: Path) -> int:
        proc, port = start_receiver(directory, stderr=self.log(log))
        self.procs.append(proc)
        return port

    def spawn(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log(log))
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc, timeout=30)
        for f in self.logs:
            f.close()


def cli(*args: str, timeout: float = 300) -> tuple[float, dict[str, Any]]:
    """Run ``replicator ARGS`` (which ends in --json); (wall seconds, its JSON output)."""
    start = time.perf_counter()
    out = subprocess.run(
        [*REPLICATOR, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(
            f"replicator {' '.join(args[:1])} exited {out.returncode}: {out.stderr[-2000:]}"
        )
    result: dict[str, Any] = json.loads(out.stdout)
    return wall, result


def sparse_disks(folder: Path, count: int, gib: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    disks = [folder / f"disk{i}.img" for i in range(count)]
    for disk in disks:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "raw", str(disk), f"{gib}G"],
            check=True,
            capture_output=True,
        )
    return disks


def b3(path: Path) -> str:
    h = blake3.blake3()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return str(h.hexdigest())


def wait_caught_up(state: Path, sender: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until the sender is connected and the receiver has applied all it journaled."""
    deadline = time.monotonic() + timeout
    while True:
        if sender.poll() is not None:
            raise SystemExit(f"the NBD sender exited ({sender.returncode}) before failover")
        out = subprocess.run(
            [*REPLICATOR, "status", "--state-dir", str(state), "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode == 0:
            jobs = json.loads(out.stdout).get("jobs") or []
            if jobs:
                job, lsn = jobs[0], jobs[0]["lsn"]
                if (
                    job["connected"]
                    and lsn["journaled"] > 0
                    and lsn["applied"] == lsn["journaled"]
                    and job["lag"]["records"] == 0
                ):
                    return
        if time.monotonic() > deadline:
            raise SystemExit(f"the backlog did not empty within {timeout:.0f} s: {out.stdout}")
        time.sleep(0.2)


def live_nbd_job(root: Path, kids: Children, disks: int, gib: int) -> tuple[Path, Path, Any]:
    """Receiver + `send --capture nbd` of fresh sparse disks, one 1 MiB write per disk,
    backlog empty. Returns (target dir, state dir, sender process)."""
    volumes = sparse_disks(root / "src", disks, gib)
    target, state, sock = root / "target", root / "state", root / "nbd.sock"
    port = kids.receiver(target, root / "receive.log")
    sender = kids.spawn(
        [*REPLICATOR, "send", "--to", f"127.0.0.1:{port}", "--job", "vm", "--state-dir",
         str(state), "--capture", "nbd", "--nbd-socket", str(sock), "--insecure",
         *map(str, volumes)],
        root / "send.log",
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not sock.exists():
        if sender.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the NBD sender did not start (see {root / 'send.log'})")
        time.sleep(0.05)
    for i, volume in enumerate(volumes):
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"write -P {i + 1} 0 1M", "-c", "flush",
             f"nbd+unix:///{volume.name}?socket={sock}"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    wait_caught_up(state, sender)
    return target, state, sender


def planned_round(root: Path, disks: int, gib: int) -> dict[str, float]:
    kids = Children()
    try:
        target, _, sender = live_nbd_job(root, kids, disks, gib)
        wall, r = cli(
            "failover", "--dir", str(target), "--job", "vm", "--planned", "--json",
            "--exec", "true",
        )  # fmt: skip
        code = sender.wait(timeout=60)
        if code != 12:
            raise SystemExit(f"the sender exited {code} after a planned failover, not 12")
        return {
            "rto_s": r["rto_seconds"],
            "promote_s": r["promote_seconds"],
            "wall_s": round(wall, 3),
        }
    finally:
        kids.close()


def forced_failover(target: Path) -> dict[str, float]:
    """`failover --force` of the job at rest: its figures."""
    wall, r = cli(
        "failover", "--dir", str(target), "--job", "vm", "--force", "--json", "--exec", "true"
    )  # fmt: skip
    return {"rto_s": r["rto_seconds"], "promote_s": r["promote_seconds"], "wall_s": round(wall, 3)}


def forced_round(root: Path, disks: int, gib: int) -> dict[str, float]:
    kids = Children()
    try:
        target, _, _ = live_nbd_job(root, kids, disks, gib)
        kids.close()  # sender, then receiver: the job at rest
        return forced_failover(target)
    finally:
        kids.close()


def burst_round(root: Path, disks: int, gib: int, burst: float) -> dict[str, float]:
    kids = Children()
    try:
        target, state, sender = live_nbd_job(root, kids, disks, gib)
        fio = [
            "fio", "--name=burst", "--ioengine=nbd",
            f"--uri=nbd+unix:///disk0.img?socket={root / 'nbd.sock'}", "--rw=write",
            "--bs=1M", "--iodepth=4", "--size=512M",
        ]  # fmt: skip
        subprocess.run(fio, check=True, capture_output=True, timeout=120)  # allocated
        wait_caught_up(state, sender)
        burst_writes = subprocess.Popen(
            [*fio, f"--runtime={burst + 30}", "--time_based"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(burst)
        for proc in kids.procs:  # the source and the target lost at once
            proc.kill()
        for proc in kids.procs:
            proc.wait()
        burst_writes.kill()
        burst_writes.wait()
        held = journal_files_bytes(target / ".replicator")
        return {**forced_failover(target), "journal_mib": round(held / MIB, 1)}
    finally:
        kids.close()


def failback(root: Path, gib: int, data_mib: int) -> dict[str, Any]:
    """1% changed on each side of a sparse disk holding ``data_mib`` of data."""
    (disk,) = sparse_disks(root / "src", 1, gib)
    size = gib * GIB
    chunk = data_mib // 8 * MIB
    with disk.open("r+b") as f:  # 8 chunks spread over the disk, holes between
        for i in range(8):
            f.seek(i * (size // 8))
            f.write(os.urandom(chunk))
    target, state = root / "target", root / "state"
    replica = target / "vm" / disk.name
    one = int(0.01 * size) // EXTENT * EXTENT
    kids = Children()
    try:
        port = kids.receiver(target, root / "receive.log")
        common = ["--job", "vm", "--state-dir", str(state), "--json", "--insecure"]
        cli("send", "--to", f"127.0.0.1:{port}", "--once", *common, str(disk))
        kids.close()
        cli("failover", "--dir", str(target), "--job", "vm", "--force", "--json")
        with replica.open("r+b") as f:  # promoted side: over data and over a hole
            f.seek(0)
            f.write(os.urandom(one // 2))
            f.seek(size * 11 // 32)
            f.write(os.urandom(one - one // 2))
        with disk.open("r+b") as f:  # old source: over data elsewhere
            f.seek(size // 4)
            f.write(os.urandom(one // 2))
            f.seek(size // 2)
            f.write(os.urandom(one - one // 2))
        kids = Children()
        port = kids.receiver(target, root / "receive.log")
        wall, r = cli("failback", "--from", f"127.0.0.1:{port}", *common, str(disk))
        identical = b3(disk) == b3(replica)
        if not identical:
            raise SystemExit("after failback the source and the replica differ (blake3)")
        _, after = cli("send", "--to", f"127.0.0.1:{port}", "--once", *common, str(disk))
        return {
            "disk_bytes": size,
            "data_bytes": 8 * chunk,
            "changed_each_side": one,
            "bytes_moved": r["bytes_moved"],
            "bytes_zeroed": r["bytes_zeroed"],
            "moved_fraction": r["bytes_moved"] / size,
            "failback_s": r["seconds"],
            "wall_s": round(wall, 3),
            "identical": identical,
            "next_send_payload": after["payload_bytes"],
            "next_send_basis": after.get("basis"),
        }
    finally:
        kids.close()


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--disks", type=int, default=4)
    parser.add_argument("--disk-gib", type=int, default=4)
    parser.add_argument("--data-mib", type=int, default=256, help="data on the failback disk")
    parser.add_argument(
        "--burst", type=float, default=5.0, help="seconds of writes before the mid-burst kill"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="parent of the temp folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-failover-", dir=args.work_dir))
    results: dict[str, Any] = {"disks": args.disks, "disk_bytes": args.disk_gib * GIB}
    try:
        planned = [
            planned_round(work / f"planned{i}", args.disks, args.disk_gib)
            for i in range(args.rounds)
        ]
        forced = [
            forced_round(work / f"forced{i}", args.disks, args.disk_gib) for i in range(args.rounds)
        ]
        burst = [
            burst_round(work / f"burst{i}", args.disks, args.disk_gib, args.burst)
            for i in range(args.rounds)
        ]
        for name, runs in (("planned", planned), ("forced", forced), ("burst", burst)):
            results[name] = {k: spread([r[k] for r in runs]) for k in runs[0]}
            results[name]["rounds"] = runs
        results["failback"] = failback(work / "failback", args.disk_gib, args.data_mib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0

    def fig(d: dict[str, float]) -> str:
        return f"{d['median']:.3f} s ({d['min']:.3f}-{d['max']:.3f})"

    print(
        f"{args.disks} sparse raw disks of {args.disk_gib} GiB, empty backlog, "
        f"{args.rounds} rounds: median (min-max)"
    )
    print(f"{'':36}{'promote_seconds':>24}{'rto_seconds':>24}{'wall incl. CLI start':>24}")
    labels = {
        "planned": "failover --planned (NBD, live)",
        "forced": "failover --force (at rest)",
        "burst": "failover --force (killed mid-burst)",
    }
    for name, label in labels.items():
        p = results[name]
        print(f"{label:36}{fig(p['promote_s']):>24}{fig(p['rto_s']):>24}{fig(p['wall_s']):>24}")
    held = results["burst"]["journal_mib"]
    print(
        f"mid-burst: {args.burst:g} s of 1 MiB writes at QD4, then both sides SIGKILLed; the "
        f"receive journal held {held['min']:.0f}-{held['max']:.0f} MiB (spares included)"
    )
    print("target: RTO <= 2 s")
    fb = results["failback"]
    print(
        f"failback: {fb['data_bytes'] // MIB} MiB data on {fb['disk_bytes'] // GIB} GiB, "
        f"{fb['changed_each_side'] / MIB:.1f} MiB changed each side: moved "
        f"{fb['bytes_moved'] / MIB:.1f} MiB = {100 * fb['moved_fraction']:.2f}% of the disk "
        f"(target <= 3%), {fb['failback_s']:.2f} s ({fb['wall_s']:.2f} s wall), identical "
        f"(blake3); next send --once: {fb['next_send_payload']} payload bytes "
        f"(basis {fb['next_send_basis']})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
