"""Hashing helpers started before a ``send`` imports itself (engine/early_hashing.py).

What matters: a scan takes them only when they were asked exactly what it would ask (the
same file, size, extent size and runs), never for the epoch of a pre-hook's freeze, and
none is left running after the scan or the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from replicator.cli.main import app
from replicator.engine import early_hashing, hashing_helper, read_plan
from replicator.engine.connectors import MemoryConnector
from replicator.engine.extent_hasher import iter_extents_against
from replicator.engine.hooks import Quiesce
from replicator.engine.receiver import Receiver, ReceiverConfig
from replicator.engine.sender import Sender, SenderConfig
from replicator.engine.volumes import (
    DEFAULT_EXTENT,
    Extent,
    ExtentState,
    Holes,
    Unchanged,
    hole_digests,
    iter_extents,
    resolve_volumes,
)
from replicator.transport import FramedConnection
from replicator.transport.messages import DIGEST_SIZE
from tests.tools import process_entry, running

MiB = 1024 * 1024
SIZE = read_plan.HELPER_MIN_SIZE  # the least that helpers hash


def _image(path: Path, data_at: list[int]) -> Path:
    """A sparse image of SIZE with a MiB of data at each of ``data_at`` (MiB offsets)."""
    with path.open("wb") as f:
        f.truncate(SIZE)
        for mib in data_at:
            f.seek(mib * MiB)
            f.write(os.urandom(MiB))
    return path


@pytest.fixture(autouse=True)
def _none_left() -> Iterator[None]:
    yield
    early_hashing.discard()


def _early_procs() -> list[subprocess.Popen[bytes]]:
    return [proc for group in early_hashing._waiting.values() for proc in group]


def _spawns(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the helpers a scan starts itself (not the early ones)."""
    spawned: list[int] = []
    real = hashing_helper.spawn

    def counting(fd: int, request: bytes, *, pipe_bytes: int = 0) -> subprocess.Popen[bytes]:
        spawned.append(fd)
        return real(fd, request, pipe_bytes=pipe_bytes)

    monkeypatch.setattr(hashing_helper, "spawn", counting)
    return spawned


def _digests(path: Path) -> list[tuple[int, bytes]]:
    """(index, digest) of every extent, by the threaded scan: the oracle."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [(e.index, e.digest) for e in iter_extents(fd, os.fstat(fd).st_size)]
    finally:
        os.close(fd)


def _change(path: Path, mibs: list[int]) -> None:
    with path.open("r+b") as f:
        for mib in mibs:
            f.seek(mib * MiB)
            f.write(os.urandom(64 * 1024))


def _scan_checked(path: Path, basis: list[tuple[int, bytes]], *, exact: bool = True) -> None:
    """A scan of ``path`` against ``basis`` gives the oracle's extents, with data exactly
    where the digest moved (not ``exact``: at least there, as where threads took over
    from a helper that failed, every extent read comes with its data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        old = b"".join(d for _, d in basis).ljust(DIGEST_SIZE * len(_digests(path)), b"\0")
        items = list(
            iter_extents_against(
                fd, size, lambda first, n: old[first * DIGEST_SIZE : (first + n) * DIGEST_SIZE]
            )
        )
    finally:
        os.close(fd)
    got = [e for e in items if isinstance(e, Extent)]
    rows = [(e.index, e.digest) for e in got]
    for holes in (e for e in items if isinstance(e, Holes)):  # each with the digest of zeros
        digests = hole_digests(size, DEFAULT_EXTENT, holes.first, holes.count)
        rows += [
            (holes.first + k, digests[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE])
            for k in range(holes.count)
        ]
    for run in (e for e in items if isinstance(e, Unchanged)):  # each as its basis says
        rows += [basis[i] for i in range(run.first, run.first + run.count)]
        assert b"".join(d for _, d in basis[run.first : run.first + run.count]) == run.digests
    assert sorted(rows) == _digests(path)
    moved = {e.index for e in got if e.index >= len(basis) or basis[e.index][1] != e.digest}
    with_data = {e.index for e in got if e.data is not None}
    must = {e.index for e in got if e.index in moved and e.state is ExtentState.DATA}
    assert with_data == must if exact else with_data >= must


def test_it_finds_the_image_of_a_send_and_nothing_else(tmp_path: Path) -> None:
    big = _image(tmp_path / "big.img", [])
    small = tmp_path / "small.img"
    small.write_bytes(b"x" * 4096)
    b, s = str(big), str(small)
    send = ["send", "--to", "h:1", "--job", "j", "--once", "--insecure"]
    assert early_hashing.image_named([*send, s, b]) == b  # the first large one
    assert early_hashing.image_named(["-v", "--log-format", "json", *send, b]) == b
    assert early_hashing.image_named(["--log-format=json", "-vv", "-q", *send, b]) == b
    for argv in (
        [],
        ["receive", "--dir", b],
        ["verify", b],
        ["--log-format", "send", "status", b],  # "send" as an option's value
        [*send, s],
        [*send, str(tmp_path)],  # a folder
        [*send, "--pre-hook", "fsfreeze -f /", b],  # must look after the freeze
        [*send, "--pre-hook=fsfreeze -f /", b],
        [*send, "--capture", "nbd", "--nbd-socket", "/run/x.sock", b],
        [*send, "--help", b],
    ):
        assert early_hashing.image_named(argv) is None, argv


def test_the_options_it_skips_before_the_command_are_the_programs() -> None:
    """cli/main.py's options that take a value, as early_hashing skips them."""
    root = typer.main.get_command(app)
    with_value = {
        name
        for param in root.params
        if not getattr(param, "is_flag", False) and not getattr(param, "count", False)
        for name in param.opts
    }
    assert with_value == early_hashing.GLOBAL_WITH_VALUE


def test_its_digest_size_is_the_protocols() -> None:
    assert early_hashing.DIGEST_SIZE == DIGEST_SIZE


def test_the_scan_takes_early_helpers_asked_what_it_would_ask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _image(tmp_path / "disk.img", [0, 5, 6, 7, 100, 127])
    basis = _digests(path)
    _change(path, [5, 100])
    early_hashing.start(["send", "--job", "j", str(path)])
    early = _early_procs()
    assert len(early) == read_plan.HELPERS
    spawned = _spawns(monkeypatch)
    _scan_checked(path, basis)
    assert spawned == []  # it started none of its own: it took the early ones
    assert not early_hashing._waiting
    for proc in early:
        assert proc.wait(timeout=10) in (0, -9)  # done, or killed at the scan's end


def test_an_early_helper_killed_before_the_scan_leaves_its_runs_to_the_threads(
    tmp_path: Path,
) -> None:
    """Killed while waiting (the OOM killer, an operator): the scan takes it, finds its
    output ended, and reads from that run on itself; the extents are the oracle's."""
    path = _image(tmp_path / "disk.img", [0, 5, 6, 7, 100, 127])
    basis = _digests(path)
    _change(path, [6, 127])
    early_hashing.start(["send", str(path)])
    early = _early_procs()
    assert len(early) == read_plan.HELPERS
    early[0].kill()
    early[0].wait(timeout=10)
    _scan_checked(path, basis, exact=False)
    assert not early_hashing._waiting


@pytest.mark.parametrize("change", ["another file", "allocated since", "grown since"])
def test_early_helpers_asked_otherwise_are_killed_and_the_scan_starts_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    path = _image(tmp_path / "disk.img", [0, 5])
    basis = _digests(path)
    early_hashing.start(["send", str(path)])
    early = _early_procs()
    assert early
    if change == "another file":  # same size and layout, another inode
        os.rename(path, tmp_path / "old.img")
        _image(path, [0, 5])
    elif change == "allocated since":  # the same file; its runs are not the ones asked
        _change(path, [50])
    else:
        with path.open("r+b") as f:
            f.truncate(SIZE + MiB)
    spawned = _spawns(monkeypatch)
    _scan_checked(path, basis)
    assert len(spawned) == read_plan.HELPERS
    assert not early_hashing._waiting
    for proc in early:
        assert proc.wait(timeout=10) in (0, -9)  # done, or killed when the scan took none


async def test_a_pre_hook_never_runs_with_early_helpers_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pre-hook freezes the guest: digests taken before it must not serve its epoch. The
    command line's sniffing starts none with ``--pre-hook``; the sender discards them anyway
    (a configuration the sniffing cannot see)."""
    disk = _image(tmp_path / "disk.img", [0, 3])
    receiver = Receiver(ReceiverConfig(tmp_path / "replicas", tmp_path / "rstate"))

    async def handle(conn: FramedConnection) -> None:
        await receiver.handle(conn)

    connector = MemoryConnector(handle)
    volumes = resolve_volumes([disk])
    try:
        first = Sender(SenderConfig("memory", 0, "job", volumes, tmp_path / "state"), connector)
        await first.run_once()
        with disk.open("r+b") as f:
            f.seek(MiB)
            f.write(os.urandom(64 * 1024))
        early_hashing.start(["send", str(disk)])
        early = _early_procs()
        assert early
        hooks: list[tuple[str, bool]] = []
        real_hook = Quiesce._run

        async def recording(
            self: Quiesce, phase: str, command: str | None, pre_result: str = ""
        ) -> None:
            hooks.append((phase, bool(early_hashing._waiting)))
            await real_hook(self, phase, command, pre_result)

        monkeypatch.setattr(Quiesce, "_run", recording)
        config = SenderConfig(
            "memory", 0, "job", volumes, tmp_path / "state", pre_hook="true", post_hook="true"
        )
        summary = await Sender(config, connector).run_once()
        assert hooks == [("pre", False), ("post", False)]
        assert summary.bytes_changed == 64 * 1024
        for proc in early:
            assert proc.wait(timeout=10) in (0, -9)  # done hashing, or killed before the hook
        replica = tmp_path / "replicas" / "job" / disk.name
        assert replica.read_bytes() == disk.read_bytes()
    finally:
        await connector.aclose()
        await receiver.aclose()


def test_at_exit_none_is_left(tmp_path: Path) -> None:
    """A ``send`` that ends before its scan (a refusal, an error) kills them at exit."""
    path = _image(tmp_path / "disk.img", [0, 5])
    script = (  # helpers that would hash on for a minute: only a kill ends them soon
        "import sys\n"
        "from replicator.engine import early_hashing, hashing_helper\n"
        "hashing_helper.COMMAND[:] = [sys.executable, '-c', 'import time; time.sleep(60)']\n"
        f"early_hashing.start(['send', {str(path)!r}])\n"
        "print(' '.join(str(p.pid) for g in early_hashing._waiting.values() for p in g))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pids = [int(pid) for pid in out.stdout.split()]
    assert len(pids) == read_plan.HELPERS
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in pids):
        assert time.monotonic() < deadline, [process_entry(pid) for pid in pids]
        time.sleep(0.02)
