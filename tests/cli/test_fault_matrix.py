"""The fault matrix: ENOSPC and EIO at every durable step on both sides, as a user sees it.

Each case puts one side's folder on a faultfs mount (tests/faultfs: real syscalls that
really fail): the receiver's ``--dir`` (its journal, replicas and state files), or the
sender's ``--state-dir`` (its journal and manifests). A first ``send --once`` builds the
replica and the state; the source changes; a fault is armed at one step; ``send --once
--json`` runs. Then:

* the fault fired (a case whose fault never fires fails: it would prove nothing);
* the send either failed with the exit code OPERATIONS.md gives for it (the receiver's
  storage: 6, "receiver refused"; the sender's own disk: 9, "local storage error"), one
  line on stderr naming the problem and no "durable" summary on stdout; or it exited 0
  (the fault hit a step that was retried) and the replica equals the source right then;
* the receiver still runs, or it stopped and said why in its log (then it is restarted);
* once the fault is gone, at most two plain sends make the replica equal the source
  (blake3 and byte for byte), ``replicator verify`` exits 0, and the receiver stops
  cleanly with its replica marked consistent.

The default run covers every step at least once and both errnos across the set, faults
in the first (initial) send, and full disks (a space budget: ENOSPC arrives in the middle
of a write, after a short one). ``make test-long`` (``-m long``) runs every step with both
errnos at every position that step reaches in a send (``after``), in the first and in a
later send, once and until cleared, torn (half-written) writes, a receiver restarted
between the fault and the recovery, more steps (reads, trims, hole punching, creates,
closes) and more budgets. The module prints a line per case and how many cases ran and
faults fired (``pytest -s``).

Last, the sender's journal full in the other sense: an epoch larger than its
``--journal-max``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from replicator.engine import replica_state
from replicator.engine.errors import ExitCode
from tests.cli.faults import (
    KiB,
    LoggedReceiver,
    MiB,
    change_image,
    equal,
    error_lines,
    make_image,
    send,
    verify,
)
from tests.faultfs import FaultFS
from tests.tools import replicator

pytestmark = pytest.mark.timeout(300)

JOB = "fm"
EIO, ENOSPC = errno.EIO, errno.ENOSPC
Side = Literal["receiver", "sender"]
Phase = Literal["first", "second"]
# an 8 MiB cap makes 2 MiB sender segments: a send of a few MiB rolls and trims
SMALL_JOURNAL = ("--journal-max", "8M")


@dataclass(frozen=True)
class Step:
    """Where a fault is aimed: an op on paths matching a glob (relative to the mount).

    ``afters``: the ``after`` positions the long run tries in a later send (that send
    does the op more often than that: ``fs.count`` shows it); ``extra``: send options
    the step needs; ``first``/``second``: whether the step happens in the first send and
    in a later one.
    """

    side: Side
    name: str
    op: str
    path: str
    afters: tuple[int, ...] = (0, 1)
    extra: tuple[str, ...] = ()
    big: bool = False  # change 3 MiB more of the source (more writes; sender journal rolls)
    first: bool = True
    second: bool = True


_STEPS = (
    # receiver: --dir is the mount; state in .replicator/fm, replicas in fm/
    Step("receiver", "r-journal-append", "write", "*.seg", (0, 1, 3, 6), big=True),
    Step("receiver", "r-journal-fsync", "fsync", "*.seg", (0, 1), big=True),
    # 64 MiB segments: a receiver creates one when the job is first opened
    Step("receiver", "r-journal-create", "create", "*.seg", (0,), second=False),
    Step("receiver", "r-replica-write", "write", f"{JOB}/disk.img", (0, 1, 3)),
    Step("receiver", "r-replica-fsync", "fsync", f"{JOB}/disk.img", (0,)),
    Step("receiver", "r-applied-write", "write", "*applied.state*", (0, 1)),
    Step("receiver", "r-applied-rename", "rename", "*applied.state*", (0, 1)),
    Step("receiver", "r-files-write", "write", "*files.state*", (0,)),
    Step("receiver", "r-dir-fsync", "fsyncdir", "*", (0, 1, 2)),
    # sender: --state-dir is the mount; journal/ and manifests.state
    Step("sender", "s-journal-append", "write", "journal/*.seg", (0, 1, 3), big=True),
    Step("sender", "s-journal-fsync", "fsync", "journal/*.seg", (0, 1), big=True),
    Step("sender", "s-manifest-write", "write", "*manifests.state*", (0,)),
    Step("sender", "s-manifest-rename", "rename", "*manifests.state*", (0,)),
    # a later scan notes what it ships without the journal first (engine/direct_intent.py)
    Step("sender", "s-intent-write", "write", "*direct.intent*", (0, 1), first=False),
    Step("sender", "s-intent-fsync", "fsync", "*direct.intent*", (0, 1), first=False),
)
# beyond the list: run by the long set only
_MORE_STEPS = (
    Step("receiver", "r-applied-fsync", "fsync", "*applied.state*", (0, 1)),
    Step("receiver", "r-applied-create", "create", "*applied.state*", (0, 1)),
    Step("receiver", "r-applied-close", "flush", "*applied.state*", (0, 1)),
    Step("receiver", "r-files-fsync", "fsync", "*files.state*", (0,)),
    Step("receiver", "r-files-rename", "rename", "*files.state*", (0,)),
    Step("receiver", "r-replica-punch", "fallocate", f"{JOB}/disk.img", (0,), first=False),
    # --resync: the receiver hashes the replica (reads it) for the sender's basis
    Step("receiver", "r-replica-read", "read", f"{JOB}/*", (0, 1), ("--resync",), first=False),
    Step("receiver", "r-replica-create", "create", f"{JOB}/disk.img", (0,), second=False),
    Step("receiver", "r-replica-mkdir", "mkdir", JOB, (0,), second=False),
    Step("receiver", "r-state-mkdir", "mkdir", f".replicator/{JOB}*", (0, 1), second=False),
    Step("sender", "s-journal-create", "create", "journal/*.seg", (0, 1), SMALL_JOURNAL, True),
    Step("sender", "s-dir-fsync", "fsyncdir", "*", (0, 1, 3), SMALL_JOURNAL, True),
    Step("sender", "s-journal-read", "read", "journal/*.seg", (0, 1, 3), SMALL_JOURNAL),
    Step("sender", "s-journal-trim", "unlink", "journal/*.seg", (0, 1), SMALL_JOURNAL, True),
    Step("sender", "s-manifest-fsync", "fsync", "*manifests.state*", (0,)),
    Step("sender", "s-manifest-create", "create", "*manifests.state*", (0,)),
    Step("sender", "s-manifest-read", "read", "*manifests.state*", (0,), first=False),
    Step("sender", "s-intent-rename", "rename", "*direct.intent*", (0,), first=False),
    Step("sender", "s-intent-unlink", "unlink", "*direct.intent*", (0,), first=False),
)
STEPS: dict[str, Step] = {s.name: s for s in (*_STEPS, *_MORE_STEPS)}


@dataclass(frozen=True)
class Case:
    step: Step
    errno: int = EIO
    after: int = 0  # matching ops let through first
    times: int | None = 1  # None: until the fault is cleared
    phase: Phase = "second"  # the send the fault is armed for
    partial: bool = False  # a write rule writes half of the request, then fails
    budget: int | None = None  # a space budget (a full disk) instead of a rule
    restart: bool = False  # restart the receiver once the fault is gone (recovery from disk)

    @property
    def id(self) -> str:
        if self.budget is not None:
            return f"{self.step.side}-full-disk-{self.budget // KiB}k-{self.phase}"
        name = "ENOSPC" if self.errno == ENOSPC else "EIO"
        times = "always" if self.times is None else f"x{self.times}"
        torn = "-torn" if self.partial else ""
        restart = "-restart" if self.restart else ""
        return f"{self.step.name}-{name}{torn}-after{self.after}-{times}-{self.phase}{restart}"


def _case(
    step: str,
    err: int,
    *,
    after: int = 0,
    times: int | None = 1,
    phase: Phase = "second",
    partial: bool = False,
    restart: bool = False,
) -> Case:
    return Case(STEPS[step], err, after, times, phase, partial, restart=restart)


def _full_disk(side: Side, nbytes: int, phase: Phase) -> Case:
    step = STEPS["r-journal-append" if side == "receiver" else "s-journal-append"]
    return Case(step, ENOSPC, phase=phase, budget=nbytes)


# Every step of the issue at least once, both errnos across the set, faults that go away
# by themselves (x1) and ones that stay until cleared, faults in the first send on each
# side (a receiver's journal is created then, its replica written directly; a sender's
# disk is full), and a full disk on each side.
DEFAULT: list[Case] = [
    _case("r-journal-append", ENOSPC),
    _case("r-journal-fsync", EIO),
    _case("r-journal-create", ENOSPC, phase="first"),
    _case("r-replica-write", EIO, times=None),
    _case("r-replica-fsync", EIO),
    _case("r-applied-write", ENOSPC, after=1),  # the write that would move the applied LSN
    _case("r-applied-rename", EIO, after=1),
    _case("r-files-write", ENOSPC),
    _case("r-dir-fsync", EIO, after=1),
    _case("s-journal-append", EIO),
    _case("s-journal-fsync", ENOSPC, after=1),  # 0: the fsync at open; 1: a group commit
    _case("s-manifest-write", ENOSPC),
    _case("s-manifest-rename", EIO, times=None),
    _case("s-intent-write", ENOSPC, after=1),  # 0: the new file's head; 1: a batch's changes
    _case("s-intent-fsync", EIO),
    _full_disk("receiver", 300 * KiB, "second"),
    _full_disk("receiver", 1024 * KiB, "first"),  # a first sync: the replica fills it
    # no sync writes data to the sender's journal (docs/ARCHITECTURE.md, "Initial sync"; a
    # later scan notes its changes in a few bytes: engine/direct_intent.py): a full disk
    # there is one full at once
    _full_disk("sender", 0, "first"),
    _full_disk("sender", 0, "second"),
]


def _long_cases() -> list[Case]:
    seen = {c.id for c in DEFAULT}
    out: list[Case] = []

    def add(case: Case) -> None:
        if case.id not in seen:
            seen.add(case.id)
            out.append(case)

    for step in STEPS.values():
        for err in (ENOSPC, EIO):
            if step.first:
                add(_case(step.name, err, phase="first"))
                add(_case(step.name, err, phase="first", times=None))
            if not step.second:
                continue
            for after in step.afters:
                add(_case(step.name, err, after=after))
            add(_case(step.name, err, times=None))
            add(_case(step.name, err, after=step.afters[-1], times=None))
            if step.op == "write":
                add(_case(step.name, err, partial=True))
                add(_case(step.name, err, after=step.afters[-1], partial=True))
            if step.side == "receiver":
                add(_case(step.name, err, after=step.afters[-1], restart=True))
    sides: tuple[Side, ...] = ("receiver", "sender")
    phases: tuple[Phase, ...] = ("first", "second")
    for side in sides:
        for nbytes in (0, 64 * KiB, 300 * KiB, 1024 * KiB, 3072 * KiB):
            for phase in phases:
                if side == "sender" and nbytes:
                    continue  # a scan journals its EPOCH, and notes: nothing to fill
                add(_full_disk(side, nbytes, phase))
    return out


LONG = _long_cases()
PARAMS = [pytest.param(c, id=c.id) for c in DEFAULT] + [
    pytest.param(c, id=c.id, marks=pytest.mark.long) for c in LONG
]


@dataclass
class Tally:
    cases: dict[str, int] = field(default_factory=lambda: {"default": 0, "long": 0})
    faults: dict[str, int] = field(default_factory=lambda: {"default": 0, "long": 0})
    failed: int = 0
    zero_exits: int = 0
    lines: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    fired: int = 0  # how many times the fault fired
    exit: int | None = None  # the faulted send's exit code
    note: str = ""  # what happened; empty: the case failed


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    t = Tally()
    started = time.monotonic()
    yield t
    if not t.lines:
        return
    print("\n" + "\n".join(t.lines))
    print(
        f"fault matrix: {t.cases['default']} default cases ({t.faults['default']} faults "
        f"injected), {t.cases['long']} long cases ({t.faults['long']} faults injected), "
        f"{t.failed} failed; {t.zero_exits} faulted sends exited 0, each with the replica "
        f"equal to the source; {time.monotonic() - started:.0f} s"
    )


@pytest.mark.parametrize("case", PARAMS)
def test_fault(case: Case, tmp_path: Path, tally: Tally, request: pytest.FixtureRequest) -> None:
    kind = "long" if request.node.get_closest_marker("long") else "default"
    started = time.monotonic()
    outcome = Outcome()
    try:
        _run(case, tmp_path, outcome)
    finally:
        tally.cases[kind] += 1
        tally.faults[kind] += outcome.fired
        tally.failed += not outcome.note
        tally.zero_exits += outcome.exit == 0
        note = outcome.note or f"FAILED (faulted send exit {outcome.exit})"
        seconds = time.monotonic() - started
        tally.lines.append(f"{case.id}: {outcome.fired} fired, {note}, {seconds:.1f} s")


def _run(case: Case, tmp: Path, outcome: Outcome) -> None:
    """One case (see the module docstring); fills in ``outcome`` as it goes."""
    seed = zlib.crc32(case.id.encode())
    source = tmp / "src" / "disk.img"
    source.parent.mkdir()
    make_image(source, seed)
    step = case.step
    real, mnt = tmp / "real", tmp / "mnt"
    if step.side == "receiver":
        target, state, target_real = mnt, tmp / "state", real
    else:
        target, state, target_real = tmp / "target", mnt, tmp / "target"
    replica = target_real / JOB / "disk.img"
    log = tmp / "receiver.log"
    with contextlib.ExitStack() as stack:
        fs = stack.enter_context(FaultFS(real, mnt))
        receiver = LoggedReceiver.start(target, log)
        stack.callback(lambda: receiver.stop())  # the current one (it may be restarted)

        def send_now() -> subprocess.CompletedProcess[str]:
            return send(receiver.address, JOB, state, source, *step.extra)

        if case.phase == "second":
            out = send_now()
            assert out.returncode == 0, (
                f"first send failed ({out.returncode}): {out.stderr[-3000:]}"
            )
            assert equal(source, replica)
            change_image(source, seed + 1, big=step.big)
        refused = int(fs.stats()["budget_refusals"] or 0)
        if case.budget is not None:
            fs.budget(case.budget)
        else:
            rule = fs.add(
                step.op,
                case.errno,
                path=step.path,
                after=case.after,
                times=case.times,
                partial=case.partial,
            )
        faulted = send_now()
        outcome.exit = faulted.returncode
        if case.budget is not None:
            outcome.fired = int(fs.stats()["budget_refusals"] or 0) - refused
        else:
            outcome.fired = fs.hits()[str(rule)]
        assert outcome.fired > 0, (
            f"the fault never fired ({step.op} on {step.path} after {case.after}; ops seen "
            f"there: {fs.count(step.path)}); the send exited {faulted.returncode}"
        )
        alive = receiver.alive()
        _check_faulted_send(case, faulted, source, replica, alive)
        fs.clear()
        if not alive:  # it may stop, but it must say why, and a restart must recover
            said = [e for e in receiver.events() if e.get("level") in ("error", "critical")]
            assert said, f"the receiver died without a word:\n{log.read_text()[-3000:]}"
            receiver = LoggedReceiver.start(target, log)
        elif case.restart:  # recovery from what is on disk, not in a running process
            assert receiver.stop() == 0, log.read_text()[-3000:]
            receiver = LoggedReceiver.start(target, log)
        attempts: list[subprocess.CompletedProcess[str]] = []
        for _ in range(2):
            attempts.append(send_now())
            if attempts[-1].returncode == 0 and equal(source, replica):
                break
        assert attempts[-1].returncode == 0, _explain(attempts, log)
        assert equal(source, replica), "the send exited 0 but the replica differs from the source"
        checked = verify(receiver.address, JOB, state, source)
        assert checked.returncode == ExitCode.OK, checked.stdout + checked.stderr[-3000:]
        assert receiver.alive(), f"the receiver died:\n{log.read_text()[-3000:]}"
        assert receiver.stop() == 0, log.read_text()[-3000:]
    saved = replica_state.load(target_real / ".replicator" / JOB, JOB)
    assert saved is not None and saved.consistent and not saved.applying, saved
    message = error_lines(faulted.stderr)
    note = f"exit {faulted.returncode}"
    if message:
        note += f" {message[-1][:160]!r}"
    if not alive:
        note += ", receiver stopped"
    outcome.note = f"{note}, {len(attempts)} send(s) to converge"


# ENOSPC and EIO as the messages say them (strerror, or the receiver's own words)
_WORDS: dict[int, tuple[str, ...]] = {
    ENOSPC: ("No space left on device", "disk is full"),
    EIO: ("Input/output error",),
}


def _check_faulted_send(
    case: Case,
    out: subprocess.CompletedProcess[str],
    source: Path,
    replica: Path,
    receiver_alive: bool,
) -> None:
    rc = out.returncode
    where = f"exit {rc}, stdout {out.stdout[-500:]!r}, stderr:\n{out.stderr[-3000:]}"
    if rc == 0:  # a fault on a step that was retried: fine, if "durable" is true
        summary = json.loads(out.stdout)
        assert summary["job"] == JOB, where
        assert equal(source, replica), f"exit 0 (durable) but the replica differs: {where}"
        return
    assert out.stdout.strip() == "", f"a failed send printed a summary: {where}"
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and lines[0].startswith("replicator: error: "), where
    words = _WORDS[case.errno]
    if case.step.side == "receiver":
        # docs/OPERATIONS.md: "A failed apply (disk full, I/O error): the sender is told
        # why (exit 6)"; 4 only when the receiver is gone
        expected = {ExitCode.REFUSED} | (set() if receiver_alive else {ExitCode.CONNECT})
        if not receiver_alive:
            words += ("connection",)
    else:
        expected = {ExitCode.STORAGE}  # 9: "local disk full or I/O error"
    assert rc in expected, f"exit code {rc}, expected {sorted(expected)}: {where}"
    assert any(w in lines[0] for w in words), f"the message does not say {words}: {where}"


def _explain(attempts: list[subprocess.CompletedProcess[str]], log: Path) -> str:
    parts = [
        f"send {i + 1}: exit {a.returncode}: {a.stderr[-1500:]}" for i, a in enumerate(attempts)
    ]
    return "\n".join([*parts, "receiver log:", log.read_text()[-3000:]])


@pytest.mark.parametrize("cap", ["4M", "6M"])
def test_an_epoch_larger_than_a_small_journal_cap_is_sent(tmp_path: Path, cap: str) -> None:
    """The sender's own journal full (its cap, not the disk): docs/OPERATIONS.md says scan
    capture waits at the cap until the receiver acknowledges more. A cap the scan cannot
    work with may be refused up front (exit 2 or 3, naming --journal-max); it must never
    fail half way with exit 8, nor wait for acknowledgements that cannot come."""
    source = tmp_path / "disk.img"
    source.write_bytes(random.Random(6).randbytes(12 * MiB))
    receiver = LoggedReceiver.start(tmp_path / "target", tmp_path / "receiver.log")
    try:
        state = tmp_path / "state"
        # the first sync ships without the journal: it is the later ones that meet the cap
        first = send(receiver.address, JOB, state, source)
        assert first.returncode == 0, first.stderr[-2000:]
        source.write_bytes(random.Random(7).randbytes(12 * MiB))
        try:
            out = replicator(
                "send", "--to", receiver.address, "--job", JOB, "--state-dir", str(state),
                "--once", "--json", "--insecure", "--journal-max", cap, str(source), timeout=20,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"send --once --journal-max {cap} of 12 MiB still runs after 20 s")
        if out.returncode in (ExitCode.USAGE, ExitCode.CONFIG):
            assert "--journal-max" in out.stderr, out.stderr[-2000:]
            return
        assert out.returncode == 0, out.stderr[-2000:]
        assert equal(source, tmp_path / "target" / JOB / "disk.img")
    finally:
        receiver.stop()
