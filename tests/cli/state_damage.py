"""The state-file damage sweep: every durable state file of both sides, damaged at rest in
every way a disk, an operator or a restore can damage it, then a real `send --once`.

One chain of real processes (a receiver, `send --once` of a qcow2, a vpc and a raw image
made with qemu-img and written with qemu-io): each case starts from a replica equal to its
source, damages one file (a bit flipped, a truncation, an older copy of it put back, the
file deleted), checks `status` at rest, writes more with qemu-io and sends again. The case
passes when the send exits 0 with every replica equal to its source (`qemu-img compare`
and blake3), or refuses (non-zero) with a message that names the file or the replica and
the next step, and that step (`send --resync`, `demote`) then converges. It fails on exit
0 with a replica that differs, a status that claims a consistency point the replica does
not hold, a hang, or a Python traceback. The replica is equal to its source again when
the next case starts, so cases follow each other without a new first sync.

The receiver keeps a job's state open between sessions: its files are damaged with the
receiver stopped (at rest), the sender's between runs.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.tools import (
    REPLICATOR,
    ReceiverProc,
    b3,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    start_receiver,
)

JOB = "sd"
MiB = 1024 * 1024
TIMEOUT = 90.0  # any command: past it, a hang
SMALL = 4096  # files up to this size get every byte flipped; larger ones SAMPLES positions
SAMPLES = 64
STRICT_STATUS = True
HEADER = 32  # the state files' header (journal/durable.py): every length in it is a case

# (format, file name, size): the sweep's disks; the raw one is filled with random bytes,
# so the sender's manifests hold 4 KiB of digests that do not compress, as a real disk's
DISKS = (("qcow2", "d1.qcow2", "8M"), ("vpc", "d2.vhd", "4M"), ("raw", "d3.raw", "16M"))

# the files the sweep damages: (side, name); "sender" ones are in the --state-dir,
# "receiver" ones in DIR/.replicator/JOB
FILES = (
    ("sender", "manifests.state"),
    ("sender", "peer.state"),
    ("sender", "peer_applied.state"),
    ("sender", "sender.json"),
    ("receiver", "applied.state"),
    ("receiver", "files.state"),
    ("receiver", "replica.id"),
    ("receiver", "promoted.state"),
)
PROMOTED = "promoted.state"  # its cases start from a job promoted by `failover --force`


@dataclass(frozen=True)
class Damage:
    """One way to damage one file. ``kind``: flip (``at``: the byte; bit ``at % 8``),
    truncate (``at``: the new length; -1 half of it), rollback (``at``: 0 the previous
    saved copy, 1 the oldest) or delete."""

    side: str
    name: str
    kind: str
    at: int = 0
    # the replica is also edited outside replication (a guest booted on it by hand) while
    # the file is damaged: the damage must not take away what tells the edit
    edit: bool = False

    def __str__(self) -> str:
        where = f" {self.at}" if self.kind != "delete" else ""
        return f"{self.side}:{self.name} {self.kind}{where}{' +edit' if self.edit else ''}"


@dataclass
class Outcome:
    damage: Damage
    result: str  # "recovered", "refused", "skipped", "FAILED"
    detail: str = ""


def positions(size: int, every: bool) -> list[int]:
    """The bytes to flip in a file of ``size``: all of them (``every`` and small), else a
    deterministic spread: the header's bytes, the checksum, first and last, and evenly
    spaced positions in between."""
    if size <= 0:
        return []
    if every and size <= SMALL:
        return list(range(size))
    chosen = {0, 4, 8, 16, 24, 31, size // 2, size - 1}
    step = max(1, size // SAMPLES)
    chosen.update(range(0, size, step))
    return sorted(p for p in chosen if p < size)[: SAMPLES + 8]


def damages(side: str, name: str, size: int, *, every: bool) -> list[Damage]:
    """Every damage of the sweep for one file of ``size`` bytes (``every``: the full one)."""
    cases = [Damage(side, name, "flip", p) for p in positions(size, every)]
    lengths = {0, -1, *range(1, min(HEADER, size) + 1)}
    cases += [Damage(side, name, "truncate", n) for n in sorted(lengths) if n < size]
    cases += [Damage(side, name, "rollback", 0), Damage(side, name, "rollback", 1)]
    cases.append(Damage(side, name, "delete"))
    if side == "receiver":
        cases += [Damage(side, name, k, at, edit=True) for k, at in EDITED if at < size]
    return cases


# the receiver's damages also tried with the replica edited meanwhile
EDITED = (("flip", 0), ("flip", 20), ("truncate", 0), ("rollback", 0), ("rollback", 1),
          ("delete", 0))  # fmt: skip
EDIT = b"guest wrote here"


@dataclass
class Rig:
    """The chain: disks, a receiver's folder, a sender's state folder, the receiver."""

    root: Path
    target: Path = field(init=False)
    state: Path = field(init=False)
    receiver: ReceiverProc | None = None
    history: dict[str, list[bytes]] = field(default_factory=dict)  # file -> saved copies
    writes: int = 0
    point_lsn: int = 0  # the LSN of the last completed send

    def __post_init__(self) -> None:
        self.target = self.root / "target"
        self.state = self.root / "state"
        self.log = self.root / "receiver.log"
        self.log_seen = 0

    # -- the pieces -------------------------------------------------------------------

    def disk(self, name: str) -> Path:
        return self.root / name

    def replica(self, name: str) -> Path:
        return self.target / JOB / name

    def path(self, side: str, name: str) -> Path:
        folder = self.state if side == "sender" else self.target / ".replicator" / JOB
        return folder / name

    def start(self) -> None:
        if self.receiver is None:
            self.receiver = start_receiver(self.target, log=self.log)

    def stop(self) -> None:
        if self.receiver is not None:
            code = self.receiver.stop()
            self.receiver = None
            assert code == 0, f"the receiver exited {code}: {self.receiver_log()[-3000:]}"

    def receiver_log(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def new_log(self) -> str:
        """What the receiver logged since the last call."""
        text = self.receiver_log()
        new, self.log_seen = text[self.log_seen :], len(text)
        return new

    def address(self) -> str:
        assert self.receiver is not None
        return self.receiver.address

    def send_args(self, *extra: str) -> list[str]:
        return [
            "send", "--to", self.address(), "--job", JOB, "--state-dir", str(self.state),
            "--once", "--json", "--insecure", *extra, *(str(self.disk(n)) for _, n, _ in DISKS),
        ]  # fmt: skip

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return replicator(*args, timeout=TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise CaseFailed(
                f"hang: `replicator {' '.join(args[:1])}` ran past {TIMEOUT} s"
            ) from exc

    def write_more(self) -> None:
        """A few writes with qemu-io, to one or two disks, different each time."""
        self.writes += 1
        n = self.writes
        for fmt, name, size in DISKS[n % 3 : n % 3 + 1 + n % 2]:
            limit = int(size.rstrip("M")) * MiB
            # never the last 64 KiB, where a case edits the replica (``edit_replica``)
            offset = (n * 7 * 65536 + 4096 * (n % 5)) % (limit - 139264)
            qemu_io(fmt, self.disk(name), f"write -P {n % 251 + 1} {offset} {4096 + n % 2 * 65536}")

    def edit_replica(self) -> None:
        """Write the raw replica's last bytes outside replication, as a guest would."""
        with self.replica("d3.raw").open("r+b") as f:
            f.seek(-len(EDIT) - 100, 2)
            f.write(EDIT)

    def identical(self) -> str:
        """Why the replicas differ from their sources ("" when every one is equal)."""
        for fmt, name, _ in DISKS:
            replica = self.replica(name)
            if not replica.exists():
                return f"{name}: no replica"
            cmp = qemu_compare(fmt, self.disk(name), replica, shared=True)
            if cmp.returncode != 0:
                return f"{name}: qemu-img compare: {cmp.stdout.strip()} {cmp.stderr.strip()}"
            if b3(self.disk(name)) != b3(replica):
                return f"{name}: blake3 differs"
        return ""

    def save_history(self) -> None:
        """Keep a copy of every state file as it is now (a converged run's)."""
        for side, name in FILES:
            path = self.path(side, name)
            if path.exists():
                data = path.read_bytes()
                copies = self.history.setdefault(f"{side}:{name}", [])
                if not copies or copies[-1] != data:
                    copies.append(data)

    # -- setting up ---------------------------------------------------------------------

    def build(self) -> None:
        """The disks, a first sync, two more sends with writes between: a history."""
        for fmt, name, size in DISKS:
            qemu_img("create", "-q", "-f", fmt, str(self.disk(name)), size)
            if fmt == "raw":
                self.disk(name).write_bytes(random.Random(7).randbytes(int(size[:-1]) * MiB))
            else:
                qemu_io(fmt, self.disk(name), f"write -P 0x5a 64k {size.rstrip('M')}00k")
        self.start()
        for _ in range(3):
            self.send_ok()
            self.save_history()
            self.write_more()
        self.send_ok()
        self.save_history()

    def converge(self) -> None:
        """Whatever a case left, the next one starts from replicas equal to their sources
        and a job that is not promoted."""
        demoted = self.path("receiver", PROMOTED).exists()
        if demoted:
            self.stop()
            out = self.run("demote", "--dir", str(self.target), "--job", JOB, "--discard-changes")
            assert out.returncode == 0, f"demote: {out.stderr[-3000:]}"
        self.start()
        if demoted or self.identical():  # a demoted job takes a --resync, as its hint says
            self.send_ok("--resync")
        self.save_history()

    def promote(self) -> None:
        """`failover --force` at rest: the job promoted, its promoted.state written."""
        if self.path("receiver", PROMOTED).exists():
            return
        self.stop()
        out = self.run("failover", "--dir", str(self.target), "--job", JOB, "--force", "--json")
        assert out.returncode == 0, f"failover: {out.stderr[-3000:]}"
        self.save_history()

    def send_ok(self, *extra: str) -> None:
        out = self.run(*self.send_args(*extra))
        assert out.returncode == 0, f"send {extra} failed ({out.returncode}): {out.stderr[-3000:]}"
        self.point_lsn = json.loads(out.stdout)["lsn"]
        assert not (why := self.identical()), why


class CaseFailed(Exception):
    """A case broke a promise (never raised for a refusal with a way out)."""


def damage_file(path: Path, damage: Damage, history: list[bytes]) -> str | None:
    """Apply ``damage`` to ``path``; None when it does not apply (say, no older copy)."""
    if not path.exists():
        return None
    data = path.read_bytes()
    if damage.kind == "flip":
        if damage.at >= len(data):
            return None
        with path.open("r+b") as f:
            f.seek(damage.at)
            f.write(bytes([data[damage.at] ^ (1 << (damage.at % 8))]))
    elif damage.kind == "truncate":
        length = len(data) // 2 if damage.at < 0 else damage.at
        if length >= len(data):
            return None
        with path.open("r+b") as f:
            f.truncate(length)
    elif damage.kind == "rollback":
        older = [c for c in history if c != data]
        if not older:
            return None
        path.write_bytes(older[-1] if damage.at == 0 else older[0])
    else:
        path.unlink()
    return hashlib.sha256(data).hexdigest()[:8]


def traceback_in(*texts: str) -> bool:
    return any("Traceback (most recent call last)" in t for t in texts)


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("replicator: error:")]
    return lines[-1] if lines else stderr.strip()[-600:]


def run_case(rig: Rig, damage: Damage) -> Outcome:
    try:
        return _run_case(rig, damage)
    except CaseFailed as exc:
        return Outcome(damage, "FAILED", str(exc))
    finally:
        rig.converge()


def _run_case(rig: Rig, damage: Damage) -> Outcome:
    receiver_side = damage.side == "receiver"
    if damage.name == PROMOTED:
        rig.promote()
    if receiver_side:
        rig.stop()
    path = rig.path(damage.side, damage.name)
    if damage_file(path, damage, rig.history.get(f"{damage.side}:{damage.name}", [])) is None:
        rig.start()
        return Outcome(damage, "skipped", "does not apply to the file as it is")
    if damage.edit:
        rig.edit_replica()
    note = "" if damage.edit else _check_status_at_rest(rig, receiver_side)
    rig.start()
    rig.write_more()
    out = rig.run(*rig.send_args())
    log = rig.new_log()
    if traceback_in(out.stderr, log):
        raise CaseFailed(f"traceback: {out.stderr[-3000:]}{log[-3000:]}")
    if out.returncode == 0:
        if damage.name == PROMOTED and damage.kind != "delete":
            raise CaseFailed("exit 0: a sender wrote a promoted replica")
        if why := rig.identical():
            raise CaseFailed(f"exit 0 but the replica differs: {why}")
        rig.point_lsn = json.loads(out.stdout)["lsn"]
        _check_status_running(rig)
        return Outcome(damage, "recovered", note + json.loads(out.stdout)["basis"])
    if out.returncode == 70:
        raise CaseFailed(f"exit 70 (a bug): {out.stderr[-3000:]}")
    message = _error_line(out.stderr)
    step = _documented_step(rig, message, damage)
    if step is None:
        raise CaseFailed(f"refused without a way out (exit {out.returncode}): {message}")
    step()
    rig.write_more()
    after = rig.run(*rig.send_args())
    if after.returncode != 0:
        raise CaseFailed(
            f"refused ({message}); after the documented step the send still fails: "
            f"{_error_line(after.stderr)}"
        )
    if why := rig.identical():
        raise CaseFailed(f"after the documented step, exit 0 but the replica differs: {why}")
    rig.point_lsn = json.loads(after.stdout)["lsn"]
    return Outcome(damage, "refused", f"{note}exit {out.returncode}: {message}")


def _names_what(message: str, damage: Damage) -> bool:
    """The message names the damaged file, or the replica files it guards."""
    return damage.name in message or any(name in message for _, name, _ in DISKS)


def _documented_step(rig: Rig, message: str, damage: Damage) -> Callable[[], None] | None:
    if not _names_what(message, damage) and "replica" not in message:
        return None
    if "demote" in message and "promoted" in message:

        def demote() -> None:
            rig.stop()
            out = rig.run("demote", "--dir", str(rig.target), "--job", JOB, "--discard-changes")
            assert out.returncode == 0, out.stderr
            rig.start()
            rig.send_ok("--resync")

        return demote
    if "--resync" in message:
        return lambda: rig.send_ok("--resync")
    return None


def _check_status_at_rest(rig: Rig, receiver_side: bool) -> str:
    """`status` at rest on the damaged side: no traceback, and no consistency point the
    replica does not hold (it holds the source as of the last send's point)."""
    if receiver_side:
        out = rig.run("status", "--dir", str(rig.target), "--json")
    else:
        out = rig.run("status", "--state-dir", str(rig.state), "--json")
    if traceback_in(out.stderr) or out.returncode == 70:
        raise CaseFailed(f"status at rest: traceback/exit {out.returncode}: {out.stderr[-3000:]}")
    if out.returncode != 0:
        return ""  # a refusal of status itself, with its message: allowed
    if receiver_side:
        for job in json.loads(out.stdout)["jobs"]:
            point = job["consistency_point"]
            if point["consistent"] and point["lsn"] != rig.point_lsn:
                if point.get("pending_lsn") == rig.point_lsn and job["recovery_pending"]:
                    continue  # the job's opening applies up to it first, as status says
                if STRICT_STATUS:
                    raise CaseFailed(
                        f"status at rest says consistent at lsn {point['lsn']}, the replica "
                        f"holds lsn {rig.point_lsn}"
                    )
                return f"STATUS-POINT {point['lsn']} != {rig.point_lsn}; "
    return ""


def _check_status_running(rig: Rig) -> None:
    out = rig.run("status", "--dir", str(rig.target), "--json")
    if out.returncode != 0 or traceback_in(out.stderr):
        raise CaseFailed(f"status: exit {out.returncode}: {out.stderr[-3000:]}")
    for job in json.loads(out.stdout)["jobs"]:
        point = job["consistency_point"]
        if point["consistent"] and point["lsn"] != rig.point_lsn:
            raise CaseFailed(
                f"status says consistent at lsn {point['lsn']}, the sender's point is "
                f"{rig.point_lsn}"
            )


def sweep(rig: Rig, cases: Iterator[Damage] | list[Damage]) -> list[Outcome]:
    return [run_case(rig, damage) for damage in cases]


def all_cases(rig: Rig, *, every: bool) -> list[Damage]:
    cases: list[Damage] = []
    for side, name in FILES:
        cases += file_cases(rig, side, name, every=every)
    return cases


def file_cases(rig: Rig, side: str, name: str, *, every: bool) -> list[Damage]:
    """The sweep's cases for one file, from its size as the chain has it now."""
    path = rig.path(side, name)
    if name == PROMOTED and not path.exists():
        rig.promote()  # for its size; each case promotes again
        size = path.stat().st_size
        rig.converge()
        return damages(side, name, size, every=every)
    return damages(side, name, path.stat().st_size if path.exists() else 0, every=every)


def table(outcomes: list[Outcome]) -> str:
    rows: dict[str, dict[str, int]] = {}
    for o in outcomes:
        row = rows.setdefault(f"{o.damage.side}:{o.damage.name}", {})
        row["cases"] = row.get("cases", 0) + 1
        row[o.result] = row.get(o.result, 0) + 1
    lines = [f"{'file':32} {'cases':>6} {'recov':>6} {'refus':>6} {'skip':>6} {'FAILED':>6}"]
    for name, row in rows.items():
        lines.append(
            f"{name:32} {row['cases']:6} {row.get('recovered', 0):6} {row.get('refused', 0):6} "
            f"{row.get('skipped', 0):6} {row.get('FAILED', 0):6}"
        )
    return "\n".join(lines)


__all__ = ["REPLICATOR", "Damage", "Outcome", "Rig", "all_cases", "sweep", "table"]
