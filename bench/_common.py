"""Helpers the benchmarks and the demo share: the CLI, a free port, a receiver to send to."""

from __future__ import annotations

import compileall
import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from replicator.journal import Journal

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
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


def machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU-seconds of the whole machine since boot, from /proc/stat: busy is
    user, nice, system, irq and softirq; iowait counts as idle (a CPU that could run)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, idle, iowait, irq, softirq = fields
    busy = user + nice + system + irq + softirq
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, (busy + idle + iowait) / tick


def process_cpu(pid: int) -> float:
    """CPU-seconds (user and system, every thread) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # the stat fields 14 and 15
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def cpu_since(start: tuple[float, float], io_bytes: float) -> dict[str, float]:
    """The machine's CPU from ``start`` (a ``machine_cpu()``) to now, for ``io_bytes``
    written: ``cpu s/GB`` (busy CPU-seconds of every process and the kernel per GB) and
    ``busy`` (the share of all vCPUs)."""
    busy1, all1 = machine_cpu()
    busy = busy1 - start[0]
    return {"cpu s/GB": busy / max(1e-9, io_bytes / 1e9), "busy": busy / (all1 - start[1])}


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


def machine() -> str:
    """What the figures were taken on, for the report: figures from different hosts are
    not comparable (a session's VM can land on another CPU model)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name", "unknown CPU")
    if "cpu family" in fields:  # "AMD EPYC" alone names no generation
        model += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"machine: {model}, {os.cpu_count()} vCPU, {memory:.0f} GiB, Linux {os.uname().release}, "
        f"Python {sys.version.split()[0]}"
    )


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for the report (the machine is shared)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def stand_in_shipper(journal: Journal) -> None:
    """Run until cancelled as the sender does with its journal, minus the network: every
    tick (``live.TICK``) make what was appended durable, then trim it (a receiver that
    acknowledges at once). Keeps a journal-only benchmark's journal from filling the disk."""
    import asyncio

    from replicator.engine.live import TICK

    while True:
        await asyncio.sleep(TICK)
        await journal.trim(await journal.sync())


def journal_pattern_limit(directory: Path, total: int = 1024 * MiB, *, reuse: bool = True) -> float:
    """MB/s the disk takes the journal's writes at, with no journal code: 1 MiB writes into
    64 MiB files, an fdatasync every tick of the sender (``live.TICK``) and at each file's
    end; the file two back trimmed; the directory synced after each create, rename and
    delete, as the journal does. ``reuse`` (what the journal does): a trimmed file is renamed
    and written over by the next file but one, its header rewritten and synced first;
    otherwise each file is new and trimmed files are deleted. The physical limit of any
    journal-first capture of large writes on this disk."""
    from replicator.engine.live import TICK

    os.makedirs(directory, exist_ok=True)
    block = os.urandom(MiB)
    files: list[Path] = []
    spares: list[Path] = []
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        start = time.perf_counter()
        last_sync = start
        for index in range(total // (64 * MiB)):
            path = directory / f"segment-{index}"
            if spares:
                fd = os.open(spares[0], os.O_WRONLY)
                os.pwrite(fd, block[:40], 0)
                os.fdatasync(fd)
                os.rename(spares.pop(0), path)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.fsync(dir_fd)
                for i in range(64):
                    os.pwrite(fd, block, i * MiB)
                    if time.perf_counter() - last_sync >= TICK:
                        os.fdatasync(fd)
                        last_sync = time.perf_counter()
                os.fdatasync(fd)
            finally:
                os.close(fd)
            files.append(path)
            if len(files) > 2:
                old = files.pop(0)
                if reuse:
                    spares.append(old.with_name(f"spare-{index}"))
                    old.rename(spares[-1])
                else:
                    old.unlink()
                os.fsync(dir_fd)
        rate = total / (time.perf_counter() - start) / 1e6
    finally:
        os.close(dir_fd)
    shutil.rmtree(directory, ignore_errors=True)
    return rate


def journal_files_bytes(folder: Path) -> int:
    """The journal files under ``folder`` (segments and spares), in bytes; files removed
    while it looks are skipped."""
    total = 0
    for path in folder.rglob("*"):
        if path.suffix in (".seg", ".spare"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
    return total
