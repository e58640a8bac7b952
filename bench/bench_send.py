"""Initial and 1%-changed sync of a 1 GiB mixed image: `replicator send --once` vs rsync.

Both run in the same session on the same files, warm page cache for both:

* initial: `replicator send --once` to a fresh receiver on loopback vs `rsync --whole-file`
  into an empty folder;
* after changing 1% of the image in random 64 KiB extents: `send --once` vs
  `rsync --inplace --no-whole-file --ignore-times` onto the previous copy (without
  --ignore-times rsync's quick check skips a file changed within the second it was
  copied); payload bytes / changed bytes;
* peak RSS of the sender and of the receiver (from wait4 / VmHWM).

Usage: python bench/bench_send.py [--size-mib 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from _common import REPLICATOR, ROOT, start_receiver

MIB = 1024 * 1024


def make_mixed_image(path: Path, size_mib: int, seed: int = 7) -> None:
    """Quarter text, quarter binaries, quarter zeros, quarter random, in shuffled 1 MiB blocks."""
    rng = random.Random(seed)
    words = [b"replica", b"journal", b"extent", b"epoch", b"barrier", b"volume", b"sector"]
    text = b" ".join(rng.choice(words) for _ in range(400_000))[:MIB]
    binaries = b"".join(
        p.read_bytes()
        for p in sorted(Path("/usr/bin").iterdir())[:60]
        if p.is_file() and not p.is_symlink()
    )
    kinds = ["text", "bin", "zero", "rand"] * (size_mib // 4 + 1)
    rng.shuffle(kinds)
    with path.open("wb") as f:
        for i, kind in enumerate(kinds[:size_mib]):
            if kind == "text":
                block = text[i % 997 :] + text[: i % 997]
            elif kind == "bin":
                start = (i * MIB) % max(1, len(binaries) - MIB)
                block = binaries[start : start + MIB].ljust(MIB, b"\0")
            elif kind == "zero":
                block = bytes(MIB)
            else:
                block = rng.randbytes(MIB)
            f.write(block)


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


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Run ``cmd``; (seconds, peak RSS KiB sampled from /proc VmHWM, stdout).

    wait4's ru_maxrss is not used: after a vfork+exec it can report the parent's RSS.
    """
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
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err_b.decode()[-2000:]}")
    return elapsed, peak, out_b.decode()


def warm(path: Path) -> None:
    """Pull a file into the page cache without growing this process."""
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "send")
    args = parser.parse_args()
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    image = work / "src" / "disk.img"
    make_mixed_image(image, args.size_mib)
    warm(image)  # warm page cache for both tools
    receiver, port = start_receiver(work / "rcv")
    send = [
        *REPLICATOR,
        "send",
        "--to",
        f"127.0.0.1:{port}",
        "--job",
        "bench",
        "--state-dir",
        str(work / "state"),
        "--once",
        "--json",
        "--insecure",
        str(image),
    ]
    results: dict[str, Any] = {"size_bytes": image.stat().st_size}
    try:
        t_ours, rss_send, out = timed(send)
        first = json.loads(out)
        t_rsync, _, _ = timed(["rsync", "--whole-file", str(image), str(work / "rsync") + "/"])
        results["initial"] = {
            "replicator_s": t_ours,
            "rsync_whole_file_s": t_rsync,
            "ratio": t_ours / t_rsync,
            "wire_bytes": first["wire_bytes"],
        }
        changed = change_one_percent(image)
        warm(image)
        t_ours2, rss_send2, out2 = timed(send)
        second = json.loads(out2)
        t_rsync2, _, _ = timed(
            [
                "rsync",
                "--inplace",
                "--no-whole-file",
                "--ignore-times",
                str(image),
                str(work / "rsync") + "/",
            ]
        )
        results["changed_1pct"] = {
            "changed_bytes": changed,
            "replicator_s": t_ours2,
            "rsync_inplace_s": t_rsync2,
            "ratio": t_ours2 / t_rsync2,
            "payload_bytes": second["payload_bytes"],
            "data_bytes": second["bytes_changed"],
            "payload_over_changed": second["payload_bytes"] / changed,
        }
        results["peak_rss_mib"] = {
            "sender": max(rss_send, rss_send2) / 1024,
            "receiver": vm_hwm_kib(receiver.pid) / 1024,
        }
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(timeout=60)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        i, c, r = results["initial"], results["changed_1pct"], results["peak_rss_mib"]
        print(f"image {results['size_bytes'] / MIB:.0f} MiB mixed (text/binaries/zeros/random)")
        print(
            f"initial sync     replicator {i['replicator_s']:.2f} s   rsync --whole-file "
            f"{i['rsync_whole_file_s']:.2f} s   ratio {i['ratio']:.2f}x (target <= 1.0)"
        )
        print(
            f"1% changed       replicator {c['replicator_s']:.2f} s   rsync --inplace "
            f"{c['rsync_inplace_s']:.2f} s   ratio {c['ratio']:.2f}x (target <= 0.5)"
        )
        print(
            f"payload on wire  {c['payload_bytes']} B for {c['changed_bytes']} B changed: "
            f"{c['payload_over_changed']:.3f}x (target <= 1.1)"
        )
        print(
            f"peak RSS         sender {r['sender']:.0f} MiB, receiver {r['receiver']:.0f} MiB "
            "(target <= 200)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
