"""``replicator bench --rsync``: rsync's time for the same change sync over the same link.

The issue's yardstick is ``rsync --inplace --no-whole-file`` syncing the same changed image
over the same emulated link. Per scenario (see engine/benchmark.py):

* ``seed(image, target)`` copies the image, as the initial sync left it, into a folder of
  its own before the change (locally: rsync's initial copy is not what is compared);
* ``rsync_change(...)`` starts ``rsync --daemon --no-detach`` on a free loopback port with a
  config of its own (one writable module on that folder, no chroot, running as the current
  user), puts a ``WanEmulator`` with the scenario's profile in front of it, and times
  ``rsync --inplace --no-whole-file IMAGE rsync://HOST:PORT/bench/`` (the delta algorithm:
  both ends checksum the whole image, only changed blocks travel), then checks the copy
  equals the image (blake3) and stops the daemon, whatever happens.

The time is the rsync client's wall clock, start to exit, as ``replicator send --once``'s
is for ours (both read the whole image; both include connecting through the link).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from replicator.engine.benchmark_netns import LOOPBACK, Place
from replicator.engine.benchmark_procs import free_port, stop_process, wait_listening
from replicator.engine.benchmark_workload import blake3_file
from replicator.engine.errors import ConfigError, ExitCode, ReplicatorError
from replicator.transport.wan import LinkProfile, WanEmulator

__all__ = ["MODULE", "require_rsync", "rsync_change", "seed"]

MODULE = "bench"
START_TIMEOUT = 30.0


class RsyncDiffers(ReplicatorError):
    """rsync's copy differs from the image: its figure would mean nothing (exit 1)."""

    exit_code = ExitCode.DIFFERENT


def require_rsync() -> str:
    """The rsync program; ConfigError (exit 3) when it is not installed."""
    found = shutil.which("rsync")
    if found is None:
        raise ConfigError(
            "--rsync needs the rsync program, which is not installed",
            hint="install rsync (e.g. apt-get install rsync), or leave out --rsync",
        )
    return found


def seed(image: Path, folder: Path) -> None:
    """rsync's side before the change: a copy of the image as the initial sync left it."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / image.name
    shutil.copyfile(image, copy)
    # an hour old: rsync's quick check (size and mtime, to the second) must not take the
    # copy for up to date when the change comes within the same second (small images)
    then = time.time() - 3600
    os.utime(copy, (then, then))


def _config(folder: Path, work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "rsyncd.conf"
    conf.write_text(
        f"pid file = {work / 'rsyncd.pid'}\n"
        f"log file = {work / 'rsyncd.log'}\n"
        "use chroot = no\n"
        f"uid = {os.getuid()}\n"
        f"gid = {os.getgid()}\n"
        f"[{MODULE}]\n"
        f"path = {folder}\n"
        "read only = no\n"
    )
    return conf


@contextlib.asynccontextmanager
async def _daemon(rsync: str, folder: Path, work: Path, place: Place) -> AsyncIterator[int]:
    """``rsync --daemon --no-detach`` on a free port where a receiver would listen (loopback,
    or the receiver's namespace); yields the port once it listens."""
    host = place.receiver_host
    port = free_port()
    conf = await asyncio.to_thread(_config, folder, work)
    daemon = (rsync, "--daemon", "--no-detach", f"--config={conf}", f"--address={host}")
    proc = await asyncio.create_subprocess_exec(
        *place.receiver((*daemon, f"--port={port}")),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        if await wait_listening(proc, host, port, START_TIMEOUT) is not None:
            raise ConfigError(
                f"the benchmark's rsync daemon did not listen on port {port} "
                f"(exit {proc.returncode}): {_tail(work / 'rsyncd.log')}",
                hint="check that `rsync --daemon` runs on this machine",
            )
        yield port
    finally:
        await stop_process(proc)


def _tail(path: Path, limit: int = 800) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


async def rsync_change(
    image: Path, folder: Path, work: Path, profile: LinkProfile, place: Place = LOOPBACK
) -> dict[str, Any]:
    """Time ``rsync --inplace --no-whole-file`` of ``image`` onto its copy in ``folder``
    (``seed``) through an emulator with ``profile``; check the copy equals the image."""
    rsync = require_rsync()
    async with (
        _daemon(rsync, folder, work, place) as port,
        WanEmulator(
            (place.receiver_host, port), listen=(place.proxy_host, 0), profile=profile
        ) as wan,
    ):
        url = f"rsync://{wan.address[0]}:{wan.address[1]}/{MODULE}/"
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *place.sender((rsync, "--inplace", "--no-whole-file", str(image), url)),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = await proc.communicate()
        finally:
            await stop_process(proc)
        seconds = time.monotonic() - started
        up, down = wan.stats.bytes_up, wan.stats.bytes_down
    if proc.returncode != 0:
        raise ConfigError(
            f"rsync failed (exit {proc.returncode}): {err.decode(errors='replace')[-800:].strip()}"
        )
    want, got = await asyncio.gather(
        asyncio.to_thread(blake3_file, image), asyncio.to_thread(blake3_file, folder / image.name)
    )
    if want != got:
        raise RsyncDiffers(f"rsync's copy {folder / image.name} differs from {image}")
    return {"seconds": round(seconds, 4), "link_bytes_up": up, "link_bytes_down": down}
