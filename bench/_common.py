"""Helpers the benchmarks and the demo share: the CLI, a free port, a receiver to send to."""

from __future__ import annotations

import compileall
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
REPLICATOR = [sys.executable, "-m", "replicator.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_receiver(
    directory: Path,
    *,
    stderr: IO[Any] | int | None = subprocess.DEVNULL,
    cli_args: tuple[str, ...] = (),
    timeout: float = 20.0,
    security: tuple[str, ...] = ("--insecure",),
) -> tuple[subprocess.Popen[bytes], int]:
    """``replicator receive`` on a free loopback port; returns once it accepts connections.

    ``cli_args`` go before the command (e.g. ``-vv``); ``security`` after it (--insecure,
    or --tls-dir DIR). Raises RuntimeError when the receiver exits or does not listen
    within ``timeout`` seconds.
    """
    port = free_port()
    proc = subprocess.Popen(
        [*REPLICATOR, *cli_args, "receive", "--listen", f"127.0.0.1:{port}", "--dir",
         str(directory), *security],
        stdout=subprocess.DEVNULL, stderr=stderr,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"the receiver did not start (exit code {proc.poll()})"
                ) from None
            time.sleep(0.05)


def compile_bytecode() -> None:
    """Byte-compile the installed package, as ``pip install`` does for a user.

    Where PYTHONDONTWRITEBYTECODE is set (as in this project's shells) an editable
    install never gets .pyc files, and every ``replicator`` process compiles its ~70
    modules again: about 0.25 s per start on this machine, which a user never pays.
    Benchmarks of whole CLI runs call this first so they measure what a user runs.
    """
    spec = importlib.util.find_spec("replicator.cli")
    if spec is None or not spec.submodule_search_locations:
        return
    package = Path(next(iter(spec.submodule_search_locations))).parent
    compileall.compile_dir(str(package), quiet=1)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for the report (the machine is shared)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
