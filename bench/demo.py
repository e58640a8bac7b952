"""`make demo`: replicate a real dynamic VHD over loopback, change it, replicate again, verify.

Everything here is a real tool on real files: qemu-img makes the disk, qemu-io writes
into it the way a VM would, `replicator receive` and `replicator send` run as separate
processes over 127.0.0.1, and the replica is proven with `qemu-img compare`, blake3 and
`replicator verify`.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3
from _common import REPLICATOR, ROOT, start_receiver

WORK = ROOT / "demo-work"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def sh(*cmd: str, show: bool = True) -> str:
    if show:
        print("$ " + " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    if show and out.strip():
        print(out.rstrip(), flush=True)
    return out


def b3(path: Path) -> str:
    h = blake3.blake3()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:32]


def send_once(port: int, state: Path, *volumes: Path) -> dict[str, object]:
    cmd = [
        *REPLICATOR,
        "send",
        "--to",
        f"127.0.0.1:{port}",
        "--job",
        "demo-vm",
        "--state-dir",
        str(state),
        "--once",
        "--json",
        "--insecure",
        *map(str, volumes),
    ]
    print(f"$ replicator send --to 127.0.0.1:{port} --job demo-vm --once --json --insecure ...")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    summary: dict[str, object] = json.loads(out)
    print(
        f"   scanned {summary['bytes_scanned']} B, changed {summary['bytes_changed']} B, "
        f"records {summary['payload_bytes']} B -> {summary['wire_bytes']} B on the wire, "
        f"{summary['seconds']} s"
    )
    return summary


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(WORK, ignore_errors=True)
    source, target, state = WORK / "source", WORK / "target", WORK / "sender-state"
    source.mkdir(parents=True)
    disk, config = source / "disk0.vhd", source / "demo-vm.xml"

    step("create a 1 GiB dynamic VHD and write 40 MiB into it with qemu-io")
    sh("qemu-img", "create", "-q", "-f", "vpc", str(disk), "1G")
    sh(
        "qemu-io", "-f", "vpc",
        "-c", "write -P 0x11 0 16M",
        "-c", "write -P 0x22 256M 16M",
        "-c", "write -P 0x33 900M 8M",
        str(disk),
    )  # fmt: skip
    config.write_text("<domain type='kvm'><name>demo-vm</name><memory>1048576</memory></domain>\n")

    step("start a receiver on loopback")
    try:
        receiver, port = start_receiver(target)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    try:
        print(
            f"   replicator receive --listen 127.0.0.1:{port} --dir {target} (pid {receiver.pid})"
        )

        step("initial sync: the whole disk (holes stay holes) and the VM's XML")
        first = send_once(port, state, disk, config)

        step("the VM writes again: 3 small changes with qemu-io")
        sh(
            "qemu-io", "-f", "vpc",
            "-c", "write -P 0x44 4M 64k",
            "-c", "write -P 0x55 300M 128k",
            "-c", "write -P 0x66 700M 64k",
            str(disk),
        )  # fmt: skip

        step("differential sync: only the changed extents move")
        second = send_once(port, state, disk, config)

        step("prove the replica")
        replica = target / "demo-vm" / "disk0.vhd"
        sh("qemu-img", "compare", "-f", "vpc", "-F", "vpc", str(disk), str(replica))
        src_hash, dst_hash = b3(disk), b3(replica)
        print(f"   blake3 source  {src_hash}\n   blake3 replica {dst_hash}")
        if src_hash != dst_hash:
            print("replica differs from the source", file=sys.stderr)
            return 1
        sh(
            *REPLICATOR, "verify", "--to", f"127.0.0.1:{port}", "--job", "demo-vm",
            "--state-dir", str(state), "--insecure", str(disk), str(config),
        )  # fmt: skip
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(timeout=30)

    step("done")
    print(
        f"   initial sync sent {first['payload_bytes']} B for a {disk.stat().st_size} B file; "
        f"after the change it sent {second['payload_bytes']} B "
        f"({second['bytes_changed']} B changed).\n"
        f"   receiver exited {receiver.returncode} after SIGTERM; "
        f"demo took {time.monotonic() - started:.1f} s. Files are in {WORK}."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
