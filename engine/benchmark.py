"""``replicator bench``: a real sender and a real receiver over an emulated (or a real) link,
with the link's plain-TCP goodput measured in the same run for comparison.

One scenario (one RTT and rate of the emulated link):

1. write a ``size`` image of the chosen mix (engine/benchmark_workload.py);
2. plain TCP: a bulk transfer between two child processes through a ``WanEmulator`` with
   the scenario's profile (one-way delay = RTT / 2 each way, the rate cap each way): the
   link's own goodput, for comparison;
3. initial sync: ``replicator send --once`` (a child process) through a second emulator
   with the same profile to a ``replicator receive`` child on loopback with a fresh --dir;
4. change ``change`` of the image in 64 KiB extents, then ``send --once`` again;
5. verify: blake3 of the source and of the replica must be equal, else ``BenchError``
   (exit 1): the benchmark never reports figures for a replica that is wrong.
6. with ``rsync``: ``rsync --inplace --no-whole-file`` of the same changed image onto a copy
   of the image as it was before the change, through its own daemon behind an emulator with
   the same profile (engine/benchmark_rsync.py); its time next to our change sync's.

With ``to`` (a remote ``replicator receive``) there is no emulator: the real link is
measured, plain TCP is not (there is no sink on the far side), and step 5 runs
``replicator verify``, which compares blake3 manifests of both sides.

What is measured:

* wire goodput: the record bytes the sender put on the wire (its summary's ``wire_bytes``,
  compressed) over the time the link carried the sync: from the first byte the emulator
  forwarded for the sender's connection to the last one (sampled every 2 ms). The same
  clock measures plain TCP (bytes / first to last byte), so the two compare. In remote
  mode the window comes from the sender's own byte counter (sampled every 20 ms).
* file-data rate: file bytes sent as data (``bytes_changed``: zeros the replica already
  has are not sent, nor counted) over the same window; image sync rate: the whole image
  over it; compression ratio: payload bytes / wire bytes.
* lag: the sender's replication lag as its status reports it (``lag.seconds``: the age of
  the oldest captured change the receiver has not applied yet, i.e. what would be lost if
  the source died now), sampled every 20 ms through the sender's control socket, from the
  moment the sync captured its first change until the sender exits. A scan captures
  changes when it reads them, so a scanning sender's RPO is this lag plus its --interval.
  The headline lag figures are the change sync's (steady replication), the initial
  sync's are in its own section.
* RPO held: the change sync's lag p99 is at most ``target_rpo``.
* change time: the change sync's ``send --once``, start to exit (``change_seconds``), and
  with ``rsync`` rsync's for the same change (``rsync_change_seconds``) and their ratio
  (``change_time_over_rsync``: the issue's target is at most 0.3).

Everything (child processes, emulators, the work folder) is cleaned up on success, on
failure and on cancellation (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicator.engine.benchmark_netns import LOOPBACK, Place, namespaces
from replicator.engine.benchmark_procs import free_port, stop_process, wait_listening
from replicator.engine.benchmark_replay import Recording, load_recording, replay
from replicator.engine.benchmark_rsync import rsync_change, seed
from replicator.engine.benchmark_workload import Mix, blake3_file, change_image, write_image
from replicator.engine.control import SOCKET_NAME, ControlRefused, ControlUnavailable, request
from replicator.engine.errors import ConfigError, ExitCode, ReplicatorError
from replicator.transport.wan import LinkProfile, WanEmulator

__all__ = [
    "BenchConfig",
    "BenchError",
    "Scenario",
    "percentile",
    "run_bench",
    "verify_local",
]

REPLICATOR = (sys.executable, "-m", "replicator.cli")
JOB = "bench"
VOLUME = "disk.img"
STEPS = ("write image", "plain TCP", "initial sync", "change", "change sync", "verify")
RSYNC_STEP = "rsync"  # after verify, with --rsync
REPLAY_STEPS = ("replay",)  # the steps of a --replay scenario
WIRE_SAMPLE = 0.002  # seconds between reads of the emulator's byte counter
STATUS_SAMPLE = 0.020  # seconds between status requests to the sender
PLAIN_TCP_SECONDS = 10.0  # plain TCP sends at most this long at the rate cap
PLAIN_TCP_MIN = 4 * 1024 * 1024
PLAIN_TCP_MAX = 1024 * 1024 * 1024
START_TIMEOUT = 30.0

# The plain TCP peers: separate processes, so they do not share the emulator's event loop.
_SINK = """
import socket, sys
listener = socket.create_server((sys.argv[1], 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
buf = bytearray(1 << 20)
total = 0
while n := conn.recv_into(buf):
    total += n
print(total, flush=True)
"""
_SOURCE = """
import os, socket, sys
chunk = os.urandom(1 << 20)
left = int(sys.argv[2])
with socket.create_connection((sys.argv[3], int(sys.argv[1]))) as s:
    while left > 0:
        s.sendall(chunk[:left])
        left -= len(chunk)
"""


class BenchError(ReplicatorError):
    """A scenario's replica differs from its source: exit 1, like ``verify``."""

    exit_code = ExitCode.DIFFERENT


@dataclass(frozen=True)
class Scenario:
    """One emulated link: round-trip time (seconds) and rate cap (bytes/s, None: none)."""

    rtt: float
    rate: float | None


@dataclass(frozen=True)
class BenchConfig:
    scenarios: tuple[Scenario, ...]
    size: int
    change: float  # fraction of the image rewritten, (0, 1]
    mix: Mix = Mix.mixed
    to: tuple[str, int] | None = None  # a remote receiver: no emulator
    security: tuple[str, ...] = ("--insecure",)  # sender's TLS options for ``to``
    target_rpo: float | None = None
    send_args: tuple[str, ...] = ()  # more `send` options (e.g. --target-rpo)
    work_dir: Path | None = None  # where the temporary folder goes (default: the system's)
    rsync: bool = False  # also time rsync's change sync (engine/benchmark_rsync.py)
    replay: Path | None = None  # replay this recorded journal (engine/benchmark_replay.py)
    netns: bool = False  # sender and receiver in namespaces, tbf rate (benchmark_netns.py)

    @property
    def steps(self) -> tuple[str, ...]:
        """The steps of one scenario, in order (for a progress bar)."""
        if self.replay is not None:
            return REPLAY_STEPS
        return (*STEPS, RSYNC_STEP) if self.rsync else STEPS


Step = Callable[[int, str], None]  # (scenario index, step name): a step begins


@dataclass
class _Phase:
    """One `send --once` run and what was seen of it."""

    summary: dict[str, Any]
    seconds: float  # the sender process, start to exit
    window: float | None  # the link carried the sync this long
    link_bytes: int | None  # bytes the emulator forwarded to the receiver
    lags: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        wire = int(self.summary["wire_bytes"])
        payload = int(self.summary["payload_bytes"])
        changed = int(self.summary["bytes_changed"])
        return {
            "seconds": round(self.seconds, 4),
            "wire_seconds": _round(self.window),
            "wire_bytes": wire,
            "payload_bytes": payload,
            "link_bytes_up": self.link_bytes,
            "file_bytes_changed": changed,
            "file_bytes_zeroed": int(self.summary["bytes_zeroed"]),
            "wire_goodput_bytes_per_s": _rate(wire, self.window),
            "file_data_rate_bytes_per_s": _rate(changed, self.window),
            "compression_ratio": round(payload / wire, 4) if wire else None,
            "lag_samples": len(self.lags),
            "lag_p50_s": _round(percentile(self.lags, 0.50)),
            "lag_p99_s": _round(percentile(self.lags, 0.99)),
            "lag_max_s": _round(max(self.lags) if self.lags else None),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _rate(nbytes: int, seconds: float | None) -> float | None:
    return round(nbytes / seconds, 1) if seconds else None


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 1); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def verify_local(source: Path, replica: Path) -> str:
    """The blake3 of ``source``, after checking ``replica`` has the same; BenchError if not."""
    if not replica.is_file():
        raise BenchError(f"the replica {replica} is missing after the sync")
    want, got = blake3_file(source), blake3_file(replica)
    if want != got:
        raise BenchError(
            f"the replica {replica} differs from its source (blake3 {got} != {want})",
            hint="this is a replication bug: please report it with the command line",
        )
    return want


# -- child processes --------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    return {**os.environ, "REPLICATOR_LOG_FORMAT": "json"}


@contextlib.asynccontextmanager
async def _child(
    *args: str, log: Path | None = None, stdout: int | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process, stopped (and reaped) when the block ends, however it ends."""
    with contextlib.ExitStack() as files:
        err = files.enter_context(log.open("ab")) if log else asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout if stdout is not None else asyncio.subprocess.DEVNULL,
            stderr=err,
            env=_child_env(),
        )
    try:
        yield proc
    finally:
        await stop_process(proc)


def _log_tail(log: Path, limit: int = 1500) -> str:
    """What a failed child said: its one-line error when it printed one, else its log's end."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    errors = [line for line in text.splitlines() if line.startswith("replicator: ")]
    if errors:
        return errors[-1].removeprefix("replicator: ").removeprefix("error: ")
    return text[-limit:].strip()


@contextlib.asynccontextmanager
async def _receiver(directory: Path, log: Path, place: Place) -> AsyncIterator[int]:
    """``replicator receive`` on a free port (loopback, or its namespace's address); yields
    the port once it listens."""
    host = place.receiver_host
    port = free_port()
    args = ("receive", "--listen", f"{host}:{port}", "--dir", str(directory), "--insecure")
    async with _child(*place.receiver((*REPLICATOR, *args)), log=log) as proc:
        why = await wait_listening(proc, host, port, START_TIMEOUT)
        if why == "exited":
            raise _child_failed("replicator receive", proc.returncode or 0, log)
        if why is not None:
            raise ConfigError(
                f"the benchmark's receiver did not listen within {START_TIMEOUT:g} s: "
                f"{_log_tail(log)}"
            )
        yield port


# -- samplers ---------------------------------------------------------------------------------


class _WireClock:
    """When the emulator forwarded its first and last byte upstream since the clock started.

    The last is the emulator's own time of it. The first is the read before the count first
    moved, every 2 ms: never after the first byte, so the window is never short. (Taken as
    the middle of the 2 ms, it made plain TCP beat the emulator's own cap by 5% on a loaded
    machine: a read delayed by the loop's other work lost that time from the window.)
    """

    def __init__(self, wan: WanEmulator) -> None:
        self.wan = wan
        self.start_bytes = wan.stats.bytes_up
        self.first: float | None = None
        self.last: float | None = None
        self.bytes = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stats = self.wan.stats
        seen = self.start_bytes
        before = loop.time()  # the previous read
        while True:
            now, count = loop.time(), stats.bytes_up
            if count != seen:
                seen = count
                if self.first is None:
                    self.first = before  # the first byte went after the previous read
                self.last = stats.up_at
                self.bytes = count - self.start_bytes
            before = now
            await asyncio.sleep(WIRE_SAMPLE)

    @property
    def window(self) -> float | None:
        if self.first is None or self.last is None or self.last <= self.first:
            return None
        return self.last - self.first


class _StatusSampler:
    """The sender's lag and wire byte count, asked through its control socket every 20 ms."""

    def __init__(self, state_dir: Path, lsn_before: int) -> None:
        self.socket = state_dir / SOCKET_NAME
        self.lsn_before = lsn_before
        self.lags: list[float] = []
        self.wire: list[tuple[float, int]] = []  # (monotonic time, wire bytes) on change

    async def run(self) -> None:
        while True:
            try:
                snapshot = await asyncio.to_thread(request, self.socket, "status", timeout=1.0)
            except (ControlUnavailable, ControlRefused):
                snapshot = None
            now = time.monotonic()
            jobs = snapshot.get("jobs") if isinstance(snapshot, dict) else None
            if jobs:
                job = jobs[0]
                if int(job["lsn"]["journaled"]) > self.lsn_before:
                    self.lags.append(float(job["lag"]["seconds"]))
                wire = int(job["bytes"]["wire"])
                if not self.wire or self.wire[-1][1] != wire:
                    self.wire.append((now, wire))
            await asyncio.sleep(STATUS_SAMPLE)

    @property
    def window(self) -> float | None:
        moving = [t for t, count in self.wire if count > 0]
        if len(moving) < 2:
            return None
        return moving[-1] - moving[0]


@contextlib.asynccontextmanager
async def _running(coro_fn: Callable[[], Any]) -> AsyncIterator[None]:
    task = asyncio.create_task(coro_fn())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- the steps --------------------------------------------------------------------------------


async def _plain_tcp(profile: LinkProfile, nbytes: int, place: Place) -> dict[str, Any]:
    """A bulk TCP transfer of ``nbytes`` through an emulator with ``profile``."""
    sink_args = place.receiver((sys.executable, "-c", _SINK, place.receiver_host))
    async with _child(*sink_args, stdout=asyncio.subprocess.PIPE) as sink:
        assert sink.stdout is not None
        port = int(await asyncio.wait_for(sink.stdout.readline(), START_TIMEOUT))
        async with WanEmulator(
            (place.receiver_host, port), listen=(place.proxy_host, 0), profile=profile
        ) as wan:
            clock = _WireClock(wan)
            async with _running(clock.run):
                source = place.sender(
                    (
                        sys.executable,
                        "-c",
                        _SOURCE,
                        str(wan.address[1]),
                        str(nbytes),
                        wan.address[0],
                    )
                )
                async with _child(*source) as proc:
                    if await proc.wait() != 0:
                        raise ConfigError(f"the plain TCP source failed (exit {proc.returncode})")
                received = int(await asyncio.wait_for(sink.stdout.readline(), START_TIMEOUT))
                await sink.wait()
        window = clock.window
    if received != nbytes:
        raise ConfigError(f"plain TCP: the sink received {received} of {nbytes} bytes")
    return {
        "bytes": received,
        "seconds": _round(window),
        "goodput_bytes_per_s": _rate(received, window),
    }


async def _send_once(
    config: BenchConfig,
    to: tuple[str, int],
    job: str,
    state_dir: Path,
    image: Path,
    log: Path,
    lsn_before: int,
    wan: WanEmulator | None,
    place: Place,
) -> _Phase:
    args = place.sender((
        *REPLICATOR, "send", "--to", f"{to[0]}:{to[1]}", "--job", job, "--state-dir",
        str(state_dir), "--once", "--json", *config.security, *config.send_args, str(image),
    ))  # fmt: skip
    sampler = _StatusSampler(state_dir, lsn_before)
    clock = _WireClock(wan) if wan is not None else None
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(_running(sampler.run))
        if clock is not None:
            await stack.enter_async_context(_running(clock.run))
        proc = await stack.enter_async_context(
            _child(*args, log=log, stdout=asyncio.subprocess.PIPE)
        )
        assert proc.stdout is not None
        out = await proc.stdout.read()
        code = await proc.wait()
    seconds = time.monotonic() - started
    if code != 0:
        raise _child_failed("replicator send", code, log)
    summary: dict[str, Any] = json.loads(out)
    if clock is not None:
        return _Phase(summary, seconds, clock.window, clock.bytes, sampler.lags)
    return _Phase(summary, seconds, sampler.window, None, sampler.lags)


def _child_failed(what: str, code: int, log: Path) -> ReplicatorError:
    error = ConfigError(f"{what} failed (exit code {code}): {_log_tail(log)}")
    if code > ExitCode.DIFFERENT:  # 1 is a crash here (a traceback), not "replica differs"
        with contextlib.suppress(ValueError):
            error.exit_code = ExitCode(code)
    return error


async def _verify_remote(
    config: BenchConfig, to: tuple[str, int], job: str, state: Path, image: Path, log: Path
) -> str:
    args = (
        *REPLICATOR, "verify", "--to", f"{to[0]}:{to[1]}", "--job", job, "--state-dir",
        str(state), "--json", *config.security, str(image),
    )  # fmt: skip
    async with _child(*args, log=log, stdout=asyncio.subprocess.PIPE) as proc:
        assert proc.stdout is not None
        out = await proc.stdout.read()
        code = await proc.wait()
    if code == ExitCode.DIFFERENT:
        raise BenchError(f"`replicator verify` found the replica of job {job} differs: {out!r}")
    if code != 0:
        raise _child_failed("replicator verify", code, log)
    return await asyncio.to_thread(blake3_file, image)


def _plain_tcp_bytes(config: BenchConfig, scenario: Scenario) -> int:
    nbytes = max(config.size, PLAIN_TCP_MIN)
    if scenario.rate is not None:
        nbytes = min(nbytes, int(scenario.rate * PLAIN_TCP_SECONDS))
    return max(PLAIN_TCP_MIN, min(nbytes, PLAIN_TCP_MAX))


@contextlib.asynccontextmanager
async def _link(
    config: BenchConfig, profile: LinkProfile, rcv_dir: Path, log: Path, place: Place = LOOPBACK
) -> AsyncIterator[tuple[tuple[str, int], WanEmulator | None]]:
    """Where the sender connects: the emulator in front of a local receiver, or ``to``."""
    if config.to is not None:
        yield config.to, None
        return
    async with (
        _receiver(rcv_dir, log, place) as port,
        WanEmulator(
            (place.receiver_host, port), listen=(place.proxy_host, 0), profile=profile
        ) as wan,
    ):
        yield wan.address, wan


async def _scenario(
    config: BenchConfig, index: int, scenario: Scenario, root: Path, step: Step
) -> dict[str, Any]:
    if not config.netns:
        return await _scenario_at(config, index, scenario, root, step, LOOPBACK)
    async with namespaces(scenario.rate) as place:  # removed however the scenario ends
        return await _scenario_at(config, index, scenario, root, step, place)


async def _scenario_at(
    config: BenchConfig, index: int, scenario: Scenario, root: Path, step: Step, place: Place
) -> dict[str, Any]:
    work = root / f"scenario-{index}"
    work.mkdir()
    image = work / "src" / VOLUME
    image.parent.mkdir()
    state = work / "state"
    remote = config.to is not None
    job = f"{JOB}-{os.getpid()}-{int(time.time())}-{index}" if remote else JOB
    # in namespaces the rate is the kernel's (tbf on the sender's link), the delay ours
    rate = None if config.netns else scenario.rate
    profile = LinkProfile(delay=scenario.rtt / 2, rate=rate)

    step(index, "write image")
    await asyncio.to_thread(write_image, image, config.size, config.mix)
    step(index, "plain TCP")
    plain_bytes = _plain_tcp_bytes(config, scenario)
    plain = None if remote else await _plain_tcp(profile, plain_bytes, place)
    link = _link(config, profile, work / "target", work / "receiver.log", place)
    async with link as (to, wan):
        step(index, "initial sync")
        sync_log = work / "send.log"
        initial = await _send_once(config, to, job, state, image, sync_log, 0, wan, place)
        if config.rsync:  # rsync's side starts from the same image
            await asyncio.to_thread(seed, image, work / "rsync")
        step(index, "change")
        changed = await asyncio.to_thread(change_image, image, config.change, config.mix)
        step(index, "change sync")
        lsn = int(initial.summary["lsn"])
        again = await _send_once(config, to, job, state, image, sync_log, lsn, wan, place)
        step(index, "verify")
        if remote:
            digest = await _verify_remote(config, to, job, state, image, work / "verify.log")
        else:
            replica = work / "target" / job / VOLUME
            digest = await asyncio.to_thread(verify_local, image, replica)
    rsync = None
    if config.rsync:
        step(index, RSYNC_STEP)
        rsync = await rsync_change(image, work / "rsync", work / "rsyncd", profile, place)
    first, second = initial.as_dict(), again.as_dict()
    ours = first["wire_goodput_bytes_per_s"]
    theirs = plain["goodput_bytes_per_s"] if plain else None
    lag_p99 = second["lag_p99_s"]
    wire, data = first["wire_goodput_bytes_per_s"], first["file_data_rate_bytes_per_s"]
    return {
        "rtt_s": scenario.rtt,
        "one_way_delay_s": None if remote else scenario.rtt / 2,
        "link_rate_limit_bytes_per_s": None if remote else scenario.rate,
        "mode": "remote" if remote else ("netns" if config.netns else "emulator"),
        "mix": str(config.mix),
        "size_bytes": config.size,
        "changed_bytes": changed,
        "wire_goodput_bytes_per_s": ours,
        "plain_tcp_goodput_bytes_per_s": theirs,
        "goodput_ratio": round(ours / theirs, 4) if ours and theirs else None,
        "file_data_rate_bytes_per_s": data,
        "file_data_over_wire_ratio": round(data / wire, 4) if data and wire else None,
        # the whole image (zeros included, which cost next to nothing) over the same time
        "image_sync_rate_bytes_per_s": _rate(config.size, initial.window),
        "compression_ratio": first["compression_ratio"],
        "lag_p50_s": second["lag_p50_s"],
        "lag_p99_s": lag_p99,
        "lag_max_s": second["lag_max_s"],
        "target_rpo_s": config.target_rpo,
        "rpo_held": (
            None if config.target_rpo is None or lag_p99 is None else lag_p99 <= config.target_rpo
        ),
        # the change sync, start to exit: ours (send --once) and rsync's (--rsync)
        "change_seconds": second["seconds"],
        "rsync_change_seconds": rsync["seconds"] if rsync else None,
        "change_time_over_rsync": (
            round(second["seconds"] / rsync["seconds"], 4) if rsync and rsync["seconds"] else None
        ),
        "replica_verified": True,  # verify_local / _verify_remote raised otherwise
        "replica_blake3": digest,
        "plain_tcp": plain,
        "rsync": rsync,
        "initial_sync": first,
        "change_sync": second,
    }


async def _replay_scenario(
    config: BenchConfig, index: int, scenario: Scenario, root: Path, step: Step, rec: Recording
) -> dict[str, Any]:
    """A recorded journal replayed at its pace through the link (engine/benchmark_replay.py)."""
    work = root / f"scenario-{index}"
    work.mkdir()
    remote = config.to is not None
    job = f"{JOB}-replay-{os.getpid()}-{int(time.time())}-{index}" if remote else f"{JOB}-replay"
    profile = LinkProfile(delay=scenario.rtt / 2, rate=scenario.rate)
    step(index, REPLAY_STEPS[0])
    async with _link(config, profile, work / "target", work / "receiver.log") as (to, _):
        figures = await replay(rec, to, job, work)
    lags: list[float] = figures.pop("lags")
    lag_p99 = _round(percentile(lags, 0.99))
    return {
        "rtt_s": scenario.rtt,
        "one_way_delay_s": None if remote else scenario.rtt / 2,
        "link_rate_limit_bytes_per_s": None if remote else scenario.rate,
        "mode": "replay-remote" if remote else "replay",
        "replayed_from": str(rec.source),
        "wire_goodput_bytes_per_s": None,
        "plain_tcp_goodput_bytes_per_s": None,
        "goodput_ratio": None,
        "file_data_rate_bytes_per_s": None,
        "compression_ratio": (
            round(figures["payload_bytes"] / figures["wire_bytes"], 4)
            if figures["wire_bytes"]
            else None
        ),
        "lag_p50_s": _round(percentile(lags, 0.50)),
        "lag_p99_s": lag_p99,
        "lag_max_s": _round(max(lags) if lags else None),
        "target_rpo_s": config.target_rpo,
        "rpo_held": (
            None if config.target_rpo is None or lag_p99 is None else lag_p99 <= config.target_rpo
        ),
        # the receiver applied every record (replay() waited for it); there is no source
        # image to compare the replica with
        "replica_verified": None,
        "replay": figures,
    }


async def run_bench(config: BenchConfig, step: Step | None = None) -> list[dict[str, Any]]:
    """Run every scenario in turn; their figures (see the module docstring)."""
    report = step or (lambda index, name: None)
    parent = config.work_dir
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    recording = None if config.replay is None else await load_recording(config.replay)
    root = Path(tempfile.mkdtemp(prefix="replicator-bench-", dir=parent))
    try:
        results = []
        for index, scenario in enumerate(config.scenarios):
            if recording is not None:
                results.append(
                    await _replay_scenario(config, index, scenario, root, report, recording)
                )
            else:
                results.append(await _scenario(config, index, scenario, root, report))
        return results
    finally:
        await asyncio.to_thread(shutil.rmtree, root, True)
