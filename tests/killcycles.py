"""Kill cycles: a write workload whose every state is known, and a check that a replica is
one of those states.

Every write fills one 4 KiB block with its own sequence number (``tagged(i)``), one write at
a time, so the source passes through states S_0, S_1, ... where S_k holds, in each block, the
last write to it numbered <= k. ``prefix_state`` reads a replica and answers which S_k it
is, or None when it is a state the source never had (a block from write 5,925 next to
write 7,463 of a block that 5,925 should not have seen yet, a torn block, a block of zeros
where a write had landed). A replica observed at rest must always be some S_k, and a k at
a consistency point where the capture mode has explicit ones (scan: the freeze points).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 4096
PAGE = os.sysconf("SC_PAGE_SIZE")  # writes are split (FUSE) and torn (SIGKILL) at pages
_TAG = struct.Struct("<Q")

# NBD (fixed newstyle; https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)
_NBDMAGIC = 0x4E42444D41474943
_IHAVEOPT = 0x49484156454F5054
_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698
_OPT_GO = 7
_REP_ACK = 1
_REP_INFO = 3
_CMD_WRITE = 1
_FLAG_FUA = 1
_CMD_FLUSH = 3
_CMD_DISC = 2


def seeded(what: str) -> random.Random:
    """A random generator with a fresh seed, printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"{what} seed {seed}")
    return random.Random(seed)


def writeback(rng: random.Random) -> int | None:
    """A power cut's seed: half the time a random writeback keeps part of what no fsync
    covered (faultfs ``power_cut(seed)``), else None: none of it (the worst case)."""
    return rng.randrange(1 << 32) if rng.random() < 0.5 else None


def tagged(index: int) -> bytes:
    """The 4 KiB a write numbered ``index`` puts in its block."""
    return _TAG.pack(index) * (BLOCK // _TAG.size)


def block_tags(path: Path, blocks: int) -> list[int] | None:
    """The write number each block of ``path`` holds (0: never written), or None when a
    block is neither zeros nor one whole tagged write (torn or foreign bytes)."""
    data = path.read_bytes() if path.exists() else b""
    data = data.ljust(blocks * BLOCK, b"\0")
    tags: list[int] = []
    for b in range(blocks):
        chunk = data[b * BLOCK : (b + 1) * BLOCK]
        (index,) = _TAG.unpack_from(chunk)
        if chunk != (tagged(index) if index else b"\0" * BLOCK):
            return None
        tags.append(index)
    return tags


def flushed_writes_kept(
    tags: list[int] | None, before: list[int], log: list[tuple[int, int]], flushed: int
) -> str:
    """Why ``tags`` (an image after a power cut) lost a write a FLUSH had made durable, or
    "" when each block holds what it held durably ``before`` the run the cut ended, or
    its last write up to ``flushed`` of that run (``log``), or a later write.

    Only writes of the run that was cut count: a write acknowledged and lost at an
    earlier cut is gone for good, and no later FLUSH covers it."""
    if tags is None:
        return "a block is torn or holds foreign bytes"
    durable = list(before)
    for index, block in log:
        if index > flushed:
            break
        durable[block] = index
    for block, (tag, need) in enumerate(zip(tags, durable, strict=True)):
        if tag < need:
            return f"block {block} holds write {tag}, but write {need} was flushed"
    return ""


def prefix_state(tags: list[int] | None, log: list[tuple[int, int]]) -> int | None:
    """k when ``tags`` are exactly S_k of the write ``log`` [(index, block), ...], else None."""
    if tags is None:
        return None
    k = max(tags, default=0)
    expected = [0] * len(tags)
    for index, block in log:
        if index > k:
            break
        expected[block] = index
    return k if expected == tags else None


class NbdWriter:
    """One NBD client writing tagged blocks, one at a time, through a replicator NBD shim.

    A write whose reply never came (the sender was killed) is sent again with the same
    number once the socket answers again, so whatever became of the first attempt, the
    source goes through S_0, S_1, ... in order. ``log`` lists the acknowledged writes.

    With ``flush_every`` (a probability), a write is followed by an NBD FLUSH that often;
    ``flushed`` is the number of the last write a FLUSH covered whose reply came: every
    write up to it was promised durable, a power cut included. ``pace`` (seconds) is a
    pause after each write, for a writer the far side must keep up with over many cycles.
    """

    def __init__(
        self,
        socket_path: Path,
        export: str,
        blocks: int,
        seed: int,
        flush_every: float = 0.0,
        pace: float = 0.0,
    ) -> None:
        self.socket_path = socket_path
        self.export = export
        self.blocks = blocks
        self.rng = random.Random(seed)
        self.flush_every = flush_every
        self.flushed = 0
        self.pace = pace
        self.log: list[tuple[int, int]] = []
        self.inflight: tuple[int, int] | None = None  # sent, its reply not seen yet
        self.reconnects = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._run = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.error: BaseException | None = None

    # -- control ------------------------------------------------------------------------
    def start(self) -> None:
        self._run.set()
        self._thread.start()

    def pause(self) -> None:
        """Stop between two writes; returns once no write is in flight."""
        self._idle.clear()
        self._run.clear()
        if not self._idle.wait(60):
            raise AssertionError("the NBD writer did not pause (a write hangs)")

    def resume(self) -> None:
        self._run.set()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No writes inside the block (the one in flight finishes first)."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def history(self) -> list[tuple[int, int]]:
        """The writes the source may hold by now: acknowledged, and the one in flight."""
        with self._lock:
            return self.log + ([self.inflight] if self.inflight else [])

    def stop(self) -> None:
        self._stop.set()
        self._run.set()
        if self._thread.ident is not None:  # started (``write_now`` alone does not)
            self._thread.join(60)
        self._close()
        if self.error is not None:
            raise self.error

    # -- the loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        index = 0
        try:
            while not self._stop.is_set():
                if not self._run.is_set():
                    self._idle.set()
                    self._run.wait()
                    continue
                index += 1
                block = self.rng.randrange(self.blocks)
                with self._lock:
                    self.inflight = (index, block)
                while not self._stop.is_set():
                    try:
                        self._write(block, tagged(index))
                        break
                    except OSError:  # the sender died: same write again once it is back
                        self._close()
                        time.sleep(0.05)
                else:
                    return
                with self._lock:
                    self.log.append((index, block))
                    self.inflight = None
                if self.flush_every and self.rng.random() < self.flush_every:
                    try:
                        self._flush()
                    except OSError:  # no reply, or an error: nothing promised
                        self._close()
                    else:
                        with self._lock:
                            self.flushed = index
                if self.pace:
                    time.sleep(self.pace)
        except BaseException as exc:
            self.error = exc
        finally:
            self._idle.set()

    def write_now(self, block: int, data: bytes, *, fua: bool = False) -> None:
        """One write from the calling thread (the writer's own not started), answered:
        with ``fua``, durable in the journal once answered, and no barrier after it."""
        self._write(block, data, _FLAG_FUA if fua else 0)

    def _write(self, block: int, data: bytes, flags: int = 0) -> None:
        sock = self._connect()
        sock.sendall(
            struct.pack(">IHHQQI", _REQUEST_MAGIC, flags, _CMD_WRITE, 1, block * BLOCK, len(data))
            + data
        )
        magic, error, _ = struct.unpack(">IIQ", _recv(sock, 16))
        if magic != _SIMPLE_REPLY_MAGIC or error:
            raise OSError(f"NBD write failed: magic {magic:#x} error {error}")

    def _flush(self) -> None:
        sock = self._connect()
        sock.sendall(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, _CMD_FLUSH, 2, 0, 0))
        magic, error, _ = struct.unpack(">IIQ", _recv(sock, 16))
        if magic != _SIMPLE_REPLY_MAGIC or error:
            raise OSError(f"NBD flush failed: magic {magic:#x} error {error}")

    def flushed_history(self) -> tuple[list[tuple[int, int]], int]:
        """The acknowledged writes and the last one a FLUSH made durable."""
        with self._lock:
            return list(self.log), self.flushed

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        try:
            sock.connect(str(self.socket_path))
            magic, opt, _ = struct.unpack(">QQH", _recv(sock, 18))
            if (magic, opt) != (_NBDMAGIC, _IHAVEOPT):
                raise OSError("not an NBD server")
            sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
            name = self.export.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
            sock.sendall(struct.pack(">QII", _IHAVEOPT, _OPT_GO, len(data)) + data)
            while True:
                _, _, rep, length = struct.unpack(">QIII", _recv(sock, 20))
                _recv(sock, length)
                if rep == _REP_ACK:
                    break
                if rep >= 1 << 31:
                    raise OSError(f"NBD option refused ({rep:#x})")
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.reconnects += 1
        return sock

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _recv(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionResetError("NBD server closed the connection")
        out += chunk
    return bytes(out)


HOOK_POLLS = 30_000  # the pre-hook waits for the writer's answer at most this many 2 ms polls


class FileWriter:
    """Tagged writes straight into a source file, paused at the sender's freeze points.

    The sender's pre-hook creates ``freeze.req`` and waits for ``freeze.ok``; the writer,
    between two writes, notes the write number reached (the state the scan will see) and
    answers. The post-hook removes both files.
    """

    def __init__(self, path: Path, blocks: int, seed: int, control: Path) -> None:
        self.path = path
        self.blocks = blocks
        self.rng = random.Random(seed)
        self.control = control
        self.log: list[tuple[int, int]] = []
        self.freezes: list[int] = [0]  # write numbers the source was frozen at
        self._writing = threading.Event()
        self._writing.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.error: BaseException | None = None

    @property
    def hooks(self) -> tuple[str, str]:
        # each freeze has its own token, and the hook waits for the writer to answer that
        # token: an answer left over from the last freeze (the writer can race the post-
        # hook's rm) must not let a scan start while the writer still writes
        req, ok = self.control / "freeze.req", self.control / "freeze.ok"
        pre = (
            f"t=$$-$(date +%s%N); echo $t > {req}.tmp && mv {req}.tmp {req} && "
            f'n=0; while [ "$(cat {ok} 2>/dev/null)" != "$t" ]; do sleep 0.002; '
            # a sender killed during its hook leaves the hook behind: give up in time
            f"n=$((n+1)); [ $n -lt {HOOK_POLLS} ] || exit 1; done"
        )
        return pre, f"rm -f {req} {ok}"

    def thaw(self) -> None:
        """The sender died between its hooks: nobody else will thaw the writer."""
        for name in ("freeze.req", "freeze.ok"):
            (self.control / name).unlink(missing_ok=True)

    def start(self) -> None:
        self._thread.start()

    def quiesce(self) -> None:
        """No more writes; freezes are still answered (the sender keeps scanning)."""
        self._writing.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        req, ok = self.control / "freeze.req", self.control / "freeze.ok"
        fd = os.open(self.path, os.O_WRONLY)
        index = 0
        try:
            answered = ""
            while not self._stop.is_set():
                try:
                    token = req.read_text().strip()
                except FileNotFoundError:
                    token = ""
                if token:
                    if token != answered:  # a new freeze: note where we are, then answer
                        self.freezes.append(index)
                        tmp = ok.with_name(ok.name + ".tmp")
                        tmp.write_text(token + "\n")
                        os.replace(tmp, ok)
                        answered = token
                    time.sleep(0.001)
                    continue
                if not self._writing.is_set():
                    time.sleep(0.002)
                    continue
                index += 1
                block = self.rng.randrange(self.blocks)
                os.pwrite(fd, tagged(index), block * BLOCK)
                self.log.append((index, block))
                time.sleep(0.0005)
        except BaseException as exc:
            self.error = exc
        finally:
            os.close(fd)


@dataclass
class Tally:
    """What a kill-cycle run did, for the figures in the closing note."""

    cycles: int = 0
    kills: dict[str, int] = field(default_factory=dict)
    observed_at_rest: int = 0
    observed_mid_apply: int = 0
    observed_mid_write: int = 0  # a folder holding part of a write (FUSE: TreeWriter)
    states: set[int] = field(default_factory=set)
    undone: int = 0  # changes of file data a power cut took back (no fsync had covered)
    names_undone: int = 0  # entries made, renamed or removed that no folder fsync covered
    flushes_checked: int = 0  # power cuts after which flushed writes were looked for

    def kill(self, what: str) -> None:
        self.kills[what] = self.kills.get(what, 0) + 1

    def report(self, name: str) -> str:
        return json.dumps(
            {
                "run": name,
                "cycles": self.cycles,
                "kills": self.kills,
                "observed_at_rest": self.observed_at_rest,
                "observed_mid_apply": self.observed_mid_apply,
                "observed_mid_write": self.observed_mid_write,
                "distinct_states_seen": len(self.states),
                "unsynced_changes_undone": self.undone,
                "unsynced_names_undone": self.names_undone,
                "flushed_writes_checked": self.flushes_checked,
                "bytes_lost_or_misapplied": 0,
            },
            sort_keys=True,
        )


# -- a folder (FUSE capture) ---------------------------------------------------------------


def tree_contents(root: Path) -> dict[str, bytes]:
    """What a folder holds, keyed by kind and path relative to ``root``: ``"d PATH"`` for
    a directory (b""), ``"f PATH"`` for a file (its bytes), ``"l PATH"`` for a symlink (its
    target), ``"s PATH"`` for anything else (a socket, a FIFO: b"")."""
    out: dict[str, bytes] = {}
    for dirpath, _, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[f"d {rel}"] = b""
        for name in filenames:
            full = os.path.join(dirpath, name)
            path = os.path.normpath(os.path.join(rel, name))
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                out[f"l {path}"] = os.fsencode(os.readlink(full))
            elif not stat.S_ISREG(mode):
                out[f"s {path}"] = b""
            else:
                with open(full, "rb") as f:
                    out[f"f {path}"] = f.read()
    return out


def digest_of(contents: dict[str, bytes]) -> str:
    """One digest of what ``tree_contents`` returned."""
    import blake3

    h = blake3.blake3()
    for key in sorted(contents):
        h.update(f"{key} {blake3.blake3(contents[key]).hexdigest()}\n".encode())
    return str(h.hexdigest())


def tree_digest(root: Path) -> str:
    """What a folder holds (paths, kinds, contents, link targets), as one digest."""
    return digest_of(tree_contents(root))


def wait_written(
    path: Path, ended: Callable[[], bool] = lambda: False, timeout: float = 60
) -> None:
    """Wait until something writes into ``path`` (its mtime moves; it may not exist
    yet), or ``ended()`` says nothing will (the writer is done)."""

    def mtime() -> int:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    first, deadline = mtime(), time.monotonic() + timeout
    while mtime() == first and not ended():
        assert time.monotonic() < deadline, f"nothing wrote into {path.name} for {timeout:.0f} s"
        time.sleep(0.002)


def digest_or_none(path: Path) -> str | None:
    """``tree_digest``, or None when the receiver changed the folder under the walk."""
    try:
        return tree_digest(path)
    except FileNotFoundError:
        return None


def tree_difference(replica: Path, source: Path) -> str:
    """Which entries of ``replica`` differ from ``source`` now (sizes and the first
    differing 4 KiB block), for a failure message."""

    def size(data: bytes | None) -> str:
        return "missing" if data is None else f"{len(data)} B"

    mine, theirs = tree_contents(replica), tree_contents(source)
    lines = []
    for key in sorted(mine.keys() | theirs.keys()):
        a, b = mine.get(key), theirs.get(key)
        if a == b:
            continue
        x, y = a or b"", b or b""
        first = next(
            (
                i
                for i in range(0, max(len(x), len(y)), BLOCK)
                if x[i : i + BLOCK] != y[i : i + BLOCK]
            ),
            None,
        )
        lines.append(
            f"{key}: replica {size(a)}, source {size(b)}, first differing block at {first}"
        )
    return "; ".join(lines) or "nothing differs from the source now"


class TreeWriter:
    """Serial file-system operations through a FUSE mount: writes, creates, truncates,
    renames (over existing files too), unlinks, mkdir and rmdir.

    Each operation is retried until it has taken effect exactly once (an operation cut off
    by the sender's death is looked at in the real folder: a rename whose source is gone and
    whose target holds its bytes happened), so the folder goes through a sequence of states
    whose digests ``states`` lists, in order.
    """

    DIRS = ("a", "b", "a/c")
    MAX_FILE = 128 * 1024

    def __init__(self, mount: Path, source: Path, seed: int) -> None:
        self.mount = mount
        self.source = source
        self.rng = random.Random(seed)
        self.states: list[str] = [tree_digest(source)]
        self.partial: set[str] = set()  # states in ``states`` holding part of a write
        self.ops: dict[str, int] = {}
        self._root_fd: int | None = None
        self._lock = threading.Lock()
        self._run = threading.Event()
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._run.set()
        self._thread.start()

    def pause(self) -> None:
        self._idle.clear()
        self._run.clear()
        if not self._idle.wait(120):
            raise AssertionError("the tree writer did not pause")

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self._run.set()

    def stop(self) -> None:
        self._stop.set()
        self._run.set()
        self._thread.join(120)
        self._drop_root()
        if self.error is not None:
            raise self.error

    def _partly_written(self, path: str, payload: bytes, offset: int) -> list[str]:
        """The folder with the write of ``payload`` at ``offset`` into ``path`` done up to
        each page boundary inside it: states the source can pass through.

        The kernel sends an unaligned write into pages it does not cache as several FUSE
        requests (the first ends with the first page), which the filter journals and
        makes one at a time, and the sender's ticker may journal a barrier between them;
        SIGKILL can also cut the filter's own write of the source between two pages.
        Either way the source holds a page-aligned prefix of the write for a while."""
        contents = tree_contents(self.source)
        key = f"f {os.path.normpath(path)}"
        before = contents.get(key)
        if before is None:
            return []
        states = []
        for boundary in range((offset // PAGE + 1) * PAGE, offset + len(payload), PAGE):
            data = bytearray(before.ljust(offset, b"\0"))
            data[offset:boundary] = payload[: boundary - offset]
            states.append(digest_of({**contents, key: bytes(data)}))
        return states

    def history(self) -> list[str]:
        with self._lock:
            return list(self.states)

    def _files(self) -> list[str]:
        out = []
        for dirpath, _, filenames in os.walk(self.source):
            rel = os.path.relpath(dirpath, self.source)
            out += [name if rel == "." else f"{rel}/{name}" for name in filenames]
        return sorted(out)

    def _dirs(self) -> list[str]:
        return sorted(d for d in self.DIRS if (self.source / d).is_dir())

    def _pick_op(self) -> tuple[str, tuple[str, ...]]:
        files, dirs = self._files(), self._dirs()
        rng = self.rng
        where = rng.choice(["", *dirs])
        fresh = f"{where}/f{rng.randrange(12)}" if where else f"f{rng.randrange(12)}"
        choices: list[tuple[str, tuple[str, ...]]] = [("create", (fresh,))]
        if files:
            f = rng.choice(files)
            choices += [("write", (f,))] * 4 + [("truncate", (f,)), ("unlink", (f,))]
            choices.append(("rename", (f, fresh)))
        missing = [d for d in self.DIRS if d not in dirs and os.path.dirname(d) in ("", *dirs)]
        if missing:
            choices.append(("mkdir", (rng.choice(missing),)))
        empty = [d for d in dirs if not os.listdir(self.source / d)]
        if empty:
            choices.append(("rmdir", (rng.choice(empty),)))
        return rng.choice(choices)

    def _root(self) -> int:
        """A descriptor of the mount's root, once a live filter is mounted there.

        Every operation goes through it (``dir_fd``): by path, an operation made after a
        dead mount was detached would land in the bare folder underneath."""
        if self._root_fd is None:
            parent = os.stat(self.mount.parent).st_dev
            if os.stat(self.mount).st_dev == parent:  # not mounted (yet)
                raise OSError("the filter is not mounted")
            self._root_fd = os.open(self.mount, os.O_RDONLY | os.O_DIRECTORY)
        return self._root_fd

    def _drop_root(self) -> None:
        if self._root_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._root_fd)
            self._root_fd = None

    def _apply(self, op: str, args: tuple[str, ...], payload: bytes, offset: int) -> None:
        root = self._root()
        if op == "create":
            os.close(os.open(args[0], os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=root))
        elif op in ("write", "truncate"):
            fd = os.open(args[0], os.O_WRONLY, dir_fd=root)
            try:
                if op == "write":
                    os.pwrite(fd, payload, offset)
                else:
                    os.ftruncate(fd, offset)
            finally:
                os.close(fd)
        elif op == "unlink":
            with contextlib.suppress(FileNotFoundError):  # retried after it happened
                os.unlink(args[0], dir_fd=root)
        elif op == "rename":
            try:
                os.rename(args[0], args[1], src_dir_fd=root, dst_dir_fd=root)
            except FileNotFoundError:
                if (self.source / args[0]).exists() or not (self.source / args[1]).exists():
                    raise
        elif op == "mkdir":
            with contextlib.suppress(FileExistsError):
                os.mkdir(args[0], dir_fd=root)
        elif op == "rmdir":
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(args[0], dir_fd=root)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._run.is_set():
                    self._idle.set()
                    self._run.wait()
                    continue
                op, args = self._pick_op()
                payload = self.rng.randbytes(self.rng.choice((1, 512, 4096, 20000)))
                offset = self.rng.randrange(self.MAX_FILE - len(payload))
                if op == "write":
                    partial = self._partly_written(args[0], payload, offset)
                    with self._lock:
                        self.states += partial
                        self.partial.update(partial)
                deadline = time.monotonic() + 120
                while True:
                    try:
                        self._apply(op, args, payload, offset)
                        break
                    except OSError as exc:  # the mount is gone (sender killed): again later
                        self._drop_root()
                        if self._stop.is_set():
                            return
                        if time.monotonic() > deadline:
                            raise AssertionError(f"{op}{args} keeps failing: {exc}") from exc
                        time.sleep(0.05)
                with self._lock:
                    self.states.append(tree_digest(self.source))
                    self.ops[op] = self.ops.get(op, 0) + 1
        except BaseException as exc:
            self.error = exc
        finally:
            self._idle.set()
