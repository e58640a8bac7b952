"""Helpers for the fault matrix (tests/cli/test_fault_matrix.py).

A receiver whose log goes to a file (a pipe nobody reads could fill up and stall it while
a test waits on a sender), disk images with known content, and the checks every fault
case makes on what a command printed.
"""

from __future__ import annotations

import json
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.tools import ENV, REPLICATOR, ReceiverProc, b3, free_port, replicator, wait_port

MiB = 1 << 20
KiB = 1 << 10
EXTENT = 64 * KiB
IMAGE_BYTES = 8 * MiB


@dataclass
class LoggedReceiver:
    """A real `replicator receive`, its stderr (JSON log lines) in ``log``."""

    dir: Path
    log: Path
    proc: ReceiverProc

    @classmethod
    def start(cls, directory: Path, log: Path) -> LoggedReceiver:
        port = free_port()
        with log.open("a") as err:
            popen = subprocess.Popen(
                [*REPLICATOR, "receive", "--listen", f"127.0.0.1:{port}", "--dir",
                 str(directory), "--insecure"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
                env=ENV,
            )  # fmt: skip
        wait_port(port, popen)
        return cls(directory, log, ReceiverProc(port, directory, popen))

    @property
    def address(self) -> str:
        return self.proc.address

    def alive(self) -> bool:
        return self.proc.proc.poll() is None

    def stop(self) -> int:
        return self.proc.stop()

    def events(self) -> list[dict[str, Any]]:
        return log_events(self.log.read_text(errors="replace"))


def log_events(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a process's stderr."""
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
    return out


def error_lines(stderr: str) -> list[str]:
    """What a command printed for the user on stderr: every line but the JSON log."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def make_image(path: Path, seed: int) -> None:
    """8 MiB of random data with zero regions (holes in the replica) at known places."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(IMAGE_BYTES))
    for start, length in ((MiB, MiB), (5 * MiB + 512 * KiB, 512 * KiB)):
        data[start : start + length] = bytes(length)
    path.write_bytes(bytes(data))


def change_image(path: Path, seed: int, *, big: bool = False) -> None:
    """Change some extents: random data in several places (one inside a zero region),
    a region zeroed, one write not aligned to an extent. ``big`` rewrites 3 MiB more."""
    rng = random.Random(seed)
    with path.open("r+b") as f:
        for offset, length in (
            (0, EXTENT),
            (MiB + 256 * KiB, 128 * KiB),  # into the first zero region
            (3 * MiB + 1000, 70_000),  # straddles extents, unaligned
            (7 * MiB, 256 * KiB),
        ):
            f.seek(offset)
            f.write(rng.randbytes(length))
        f.seek(4 * MiB)
        f.write(bytes(256 * KiB))  # was random: a ZERO record, zeroed in place on the replica
        if big:
            f.seek(2 * MiB)
            f.write(rng.randbytes(3 * MiB))


def same_bytes(a: Path, b: Path) -> bool:
    """cmp(1): equal sizes and equal bytes, compared chunk by chunk."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            ca, cb = fa.read(MiB), fb.read(MiB)
            if ca != cb:
                return False
            if not ca:
                return True


def equal(source: Path, replica: Path) -> bool:
    """The replica exists and equals the source (blake3 and byte for byte)."""
    return replica.exists() and b3(source) == b3(replica) and same_bytes(source, replica)


def send(
    address: str, job: str, state: Path, volume: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return replicator(
        "send", "--to", address, "--job", job, "--state-dir", str(state), "--once", "--json",
        "--insecure", *extra, str(volume), timeout=120,
    )  # fmt: skip


def verify(address: str, job: str, state: Path, volume: Path) -> subprocess.CompletedProcess[str]:
    return replicator(
        "verify", "--to", address, "--job", job, "--state-dir", str(state), "--insecure",
        str(volume), timeout=120,
    )  # fmt: skip
