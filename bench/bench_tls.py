"""Initial sync of the 1 GiB mixed image over mutual TLS vs the same run with --insecure.

Same session, same image (bench_send.py's), loopback, page cache warm. Each round starts a
fresh receiver and a fresh sender state for each mode, alternating which mode goes first;
the figures are the medians. Also printed: CPU seconds of each side (the sender's from
wait4, the receiver's from /proc), the TLS 1.3 cipher suite the two sides agree on, and
what `openssl speed` says AES-GCM does on one core of this machine.

Usage: python bench/bench_tls.py [--size-mib 1024] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from _common import REPLICATOR, ROOT, start_receiver
from bench_send import make_mixed_image, vm_hwm_kib, warm

MIB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def negotiated_cipher(keys: Path) -> str:
    """The suite our two contexts agree on (an in-memory handshake)."""
    from replicator.engine.tls import TlsIdentity

    server = TlsIdentity(keys, "receiver", server=True).load()
    client = TlsIdentity(keys, "sender", server=False).load()
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c, s = client.wrap_bio(c_in, c_out), server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    cipher = c.cipher()
    return f"{cipher[0]} ({cipher[1]})" if cipher else "?"


def openssl_speed() -> str:
    out = subprocess.run(
        ["openssl", "speed", "-evp", "aes-256-gcm", "-seconds", "1", "-bytes", "16384"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    last = out.splitlines()[-1].split() if out else []
    if len(last) >= 2 and last[-1].endswith("k"):
        return f"{float(last[-1][:-1]) * 1000 / 1e9:.2f} GB/s"
    return "?"


def one_run(work: Path, image: Path, mode: str, keys: Path, n: int) -> dict[str, float]:
    security = ("--insecure",) if mode == "insecure" else ("--tls-dir", str(keys))
    target = work / f"rcv-{mode}-{n}"
    receiver, port = start_receiver(target, security=security)
    try:
        time.sleep(0.5)  # the receiver's start-up is not part of the sync
        rcv_cpu0 = cpu_seconds(receiver.pid)
        cpu0 = children_cpu()
        start = time.perf_counter()
        done = subprocess.run(
            [*REPLICATOR, "send", "--to", f"127.0.0.1:{port}", "--job", "bench", "--state-dir",
             str(work / f"state-{mode}-{n}"), "--once", "--json", *security, str(image)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"send ({mode}) failed: {done.stderr[-2000:]}")
        summary = json.loads(done.stdout)
        result = {
            "seconds": elapsed,
            "sender_cpu_s": children_cpu() - cpu0,
            "receiver_cpu_s": cpu_seconds(receiver.pid) - rcv_cpu0,
            "receiver_peak_rss_mib": vm_hwm_kib(receiver.pid) / 1024,
            "wire_bytes": float(summary["wire_bytes"]),
        }
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(timeout=60)
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(work / f"state-{mode}-{n}", ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "tls")
    args = parser.parse_args()
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    image = work / "src" / "disk.img"
    make_mixed_image(image, args.size_mib)
    keys = work / "keys"
    subprocess.run([*REPLICATOR, "keygen", "--out", str(keys)], check=True, capture_output=True)
    runs: dict[str, list[dict[str, float]]] = {"insecure": [], "tls": []}
    for n in range(args.rounds):
        for mode in ("insecure", "tls") if n % 2 == 0 else ("tls", "insecure"):
            warm(image)
            runs[mode].append(one_run(work, image, mode, keys, n))

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    results: dict[str, Any] = {
        "size_bytes": image.stat().st_size,
        "rounds": args.rounds,
        "cipher": negotiated_cipher(keys),
        "aes_gcm_one_core": openssl_speed(),
        "runs": runs,
    }
    for mode in runs:
        results[mode] = {
            key: median(mode, key)
            for key in ("seconds", "sender_cpu_s", "receiver_cpu_s", "receiver_peak_rss_mib")
        }
    results["tls_over_insecure_throughput"] = median("insecure", "seconds") / median(
        "tls", "seconds"
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    size = results["size_bytes"] / MIB
    wire = median("tls", "wire_bytes") / MIB
    print(f"image {size:.0f} MiB mixed, {wire:.0f} MiB on the wire; {args.rounds} rounds, medians")
    for mode in ("insecure", "tls"):
        r = results[mode]
        print(
            f"{mode:9} initial sync {r['seconds']:.2f} s ({size / r['seconds']:.0f} MiB/s)   "
            f"CPU sender {r['sender_cpu_s']:.2f} s, receiver {r['receiver_cpu_s']:.2f} s   "
            f"receiver peak RSS {r['receiver_peak_rss_mib']:.0f} MiB"
        )
    print(
        f"TLS / --insecure throughput {results['tls_over_insecure_throughput']:.2f}x "
        f"(target >= 0.9x); cipher {results['cipher']}; "
        f"AES-256-GCM on one core: {results['aes_gcm_one_core']}"
    )
    for mode in ("insecure", "tls"):
        print(f"  {mode} runs: " + ", ".join(f"{r['seconds']:.2f} s" for r in runs[mode]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
