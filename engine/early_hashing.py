"""A ``send`` starts its scan's hashing helpers before it imports the rest of itself.

``replicator send --once`` spends its first ~0.1 s starting Python and importing (one vCPU
busy, the others idle), then keeps every vCPU busy hashing the image against its basis.
The hashing helpers need only the image, its size and the extent size, so the entry point
(``cli/entry.py``) calls ``start`` before any other import: when the command line names a
large regular file, two helpers start hashing it at once, on the vCPU the imports leave
idle (bench/RESULTS.md, "2026-12-04, late": 21-30 ms of a 0.3 s cycle of a 1% change).

Nothing here decides what a scan uses. A scan takes the early helpers (``take``) only when
they were asked exactly what it would ask them: the same file (device and inode), size,
extent size, digest size and runs; it then reads their digests as its own helpers'. Any not
taken are killed (``discard``): when the sender's first scan ends, before a pre-hook runs
(digests from before a freeze must not serve the frozen epoch; a command line with
``--pre-hook`` starts none anyway), and at exit. Their digests describe the bytes at the
moment they looked, as the scan's own helpers' do: a scan without a freeze makes no promise
about writes during it, and an extent whose digest differs from the basis is read again.

Imports only the standard library and ``read_plan``/``hashing_helper`` (the same): the
point is to start before the imports that take the time.
"""

from __future__ import annotations

import atexit
import os
import stat
import threading

from replicator.engine import hashing_helper
from replicator.engine.read_plan import DEFAULT_EXTENT, HELPER_MIN_SIZE, HELPERS, Run, helper_plan

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess

# Room for a helper to run ahead of a scan not started yet: 64 Ki digests (4 GiB of 64 KiB
# extents); the Linux default for /proc/sys/fs/pipe-max-size.
PIPE_BYTES = 1024 * 1024
DIGEST_SIZE = 16  # transport.messages.DIGEST_SIZE (not imported: it brings the protocol)
# The program's options (cli/main.py, before the command) that take a value
GLOBAL_WITH_VALUE = frozenset({"--log-format"})
# Options after which a ``send`` scans no image with a basis, or must look only later
_NOT_NOW = frozenset({"--pre-hook", "--capture", "--help", "-h"})

_Key = tuple[int, int, int, int, int, tuple[tuple[Run, ...], ...]]
_lock = threading.Lock()
_waiting: dict[_Key, list[subprocess.Popen[bytes]]] = {}


def start(argv: list[str]) -> None:
    """Start helpers for the image that ``argv`` (the command line after the program) names,
    if it is a ``send`` that will scan one. Never raises: at worst nothing starts."""
    try:
        path = image_named(argv)
        if path is not None:
            _start(path)
    except Exception:  # an optimisation: whatever fails here, the send goes on without it
        discard()


def image_named(argv: list[str]) -> str | None:
    """The first argument of a ``send`` that names a regular file large enough for helpers;
    None for another command, or a ``send`` with an option in ``_NOT_NOW``."""
    at = 0
    while at < len(argv) and argv[at].startswith("-"):  # the program's own options first
        at += 2 if argv[at] in GLOBAL_WITH_VALUE else 1
    if argv[at : at + 1] != ["send"]:
        return None
    args = argv[at + 1 :]
    if any(arg.split("=", 1)[0] in _NOT_NOW for arg in args):
        return None
    for arg in args:
        if arg.startswith("-"):
            continue
        try:
            st = os.stat(arg)
        except (OSError, ValueError):  # not a path (a job name, an address)
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size >= HELPER_MIN_SIZE:
            return arg
    return None


def _start(path: str) -> None:
    # O_NONBLOCK: were the path swapped for a FIFO since its stat, this must not wait
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        _, shares = helper_plan(fd, st.st_size, DEFAULT_EXTENT, HELPERS)
        if not shares:
            return
        key = _key(st, st.st_size, DEFAULT_EXTENT, DIGEST_SIZE, shares)
        atexit.register(discard)
        procs: list[subprocess.Popen[bytes]] = []
        with _lock:
            _waiting[key] = procs  # registered first: discard() finds any started
            for share in shares:
                request = hashing_helper.request(st.st_size, DEFAULT_EXTENT, DIGEST_SIZE, share)
                procs.append(hashing_helper.spawn(fd, request, pipe_bytes=PIPE_BYTES))
    finally:
        os.close(fd)  # each helper has its own


def take(
    fd: int, size: int, extent_size: int, digest_size: int, shares: list[list[Run]]
) -> list[subprocess.Popen[bytes]] | None:
    """The early helpers for this scan of ``fd``, one per share, if they were asked exactly
    this; None otherwise. Those not taken are killed: no later scan would take them."""
    with _lock:
        if not _waiting:
            return None
        key = _key(os.fstat(fd), size, extent_size, digest_size, shares)
        procs = _waiting.pop(key, None)  # one per share: a failed start discarded them all
    discard()
    return procs


def discard() -> None:
    """Kill every early helper not taken (a pre-hook is about to run, the first scan ended,
    or the process exits); each is reaped in a thread of its own."""
    with _lock:
        procs = [proc for group in _waiting.values() for proc in group]
        _waiting.clear()
    for proc in procs:
        hashing_helper.stop(proc)


def _key(
    st: os.stat_result, size: int, extent_size: int, digest_size: int, shares: list[list[Run]]
) -> _Key:
    return (
        st.st_dev,
        st.st_ino,
        size,
        extent_size,
        digest_size,
        tuple(tuple(hand) for hand in shares),
    )
