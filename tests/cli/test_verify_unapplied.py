"""`replicator verify` (no --repair) after a continuous sender was SIGKILLed with records
past its last barrier durable on the receiver: the replica keeps its consistency point
(`status`, `failover --force` take it), and the answer is about the replica as those
records will leave it, with a note that says so. Real processes: an NBD capture, a raw NBD
client's FUA write (durable in the sender's journal at once, its barrier 20 ms later), a
SIGKILL before that barrier."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.killcycles import NbdWriter, tagged
from tests.tools import LiveNbdSender, ReceiverProc, replicator, start_receiver, status_json

BLOCKS = 16384  # the 64 MiB image, in 4 KiB blocks


def _job(rcv: ReceiverProc) -> dict[str, Any]:
    job: dict[str, Any] = status_json(directory=rcv.dir)["jobs"][0]
    return job


def _journal_last(state: Path) -> int:
    out = replicator("journal", "inspect", str(state), "--json")
    last: int = json.loads(out.stdout)["last_lsn"]
    return last


def _settled_job(rcv: ReceiverProc) -> dict[str, Any]:
    """The receiver's job once its session has ended and its last apply round with it: the
    round for a barrier received just before the kill runs on after the connection is gone
    (its applied LSN moves seconds later on a loaded machine), so one read after the
    disconnect can find that barrier not yet applied. Settled: just one record past the
    applied LSN (nothing more can come), or nothing moved for two seconds."""
    deadline = time.monotonic() + 60
    job, moved = _job(rcv), time.monotonic()
    while True:
        lsn = job["lsn"]
        if not job["connected"] and (
            lsn["received"] == lsn["applied"] + 1 or time.monotonic() - moved >= 2
        ):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
        last, job = job, _job(rcv)
        if job["connected"] or job["lsn"] != last["lsn"]:
            moved = time.monotonic()


def _killed_past_a_barrier(tmp_path: Path, rcv: ReceiverProc) -> tuple[LiveNbdSender, Any]:
    """A sender killed with one record, its FUA write, past the last barrier the receiver
    applied, and nothing more in its journal to ship; the receiver's job then. The capture
    journals a barrier 20 ms after a write: a kill that came later is tried again, and so
    is one that cut the receiver's last sync short (its barriers are applied only with the
    next one, as records past the one applied)."""
    for attempt in range(8):
        sender = LiveNbdSender(tmp_path, rcv, fresh=attempt == 0)
        writer = NbdWriter(sender.sock, "disk.raw", BLOCKS, seed=attempt)
        try:
            sender.write(f"write -P {0x21 + attempt} 0 1M")  # a consistency point: its flush
            writer.write_now(1000 + attempt, tagged(attempt + 1), fua=True)
        finally:
            sender.proc.kill()
            sender.proc.wait(timeout=60)
            writer.stop()
            sender.sock.unlink(missing_ok=True)  # a restart waits for its own
        job = _settled_job(rcv)
        received, applied = job["lsn"]["received"], job["lsn"]["applied"]
        if received == applied + 1 and _journal_last(sender.state) == received:
            return sender, job
    raise AssertionError("no kill left just its write past the last barrier in 8 attempts")


def test_verify_leaves_the_point_and_compares_what_the_records_will_make(tmp_path: Path) -> None:
    rcv = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    try:
        sender, before = _killed_past_a_barrier(tmp_path, rcv)
        point, tail = before["lsn"]["applied"], before["lsn"]["received"]
        assert (
            before["consistency_point"]["consistent"]
            and before["consistency_point"]["lsn"] == point
        )
        args = ("verify", "--to", rcv.address, "--job", "vm1", "--state-dir", str(sender.state),
                "--insecure")  # fmt: skip
        same = replicator(*args, str(sender.source), timeout=120)
        after = _job(rcv)
        assert after["consistency_point"] == before["consistency_point"]  # still at its point
        assert after["lsn"] == before["lsn"]  # and nothing applied
        assert same.returncode == 0, same.stdout + same.stderr
        assert "disk.raw: identical" in same.stdout  # the source is what the record makes it
        assert (
            f"note: the receiver holds lsn {tail}-{tail} past the last barrier it applied "
            f"(lsn {point})" in same.stdout
        )
        as_json = replicator(*args, "--json", str(sender.source), timeout=120)
        assert as_json.returncode == 0, as_json.stderr
        answer = json.loads(as_json.stdout)
        assert answer["identical"] and answer["unapplied"] == {"first_lsn": tail, "last_lsn": tail}
        with sender.source.open("r+b") as f:  # a change no record carries
            f.seek(40 << 20)
            f.write(b"behind replication's back")
        differs = replicator(*args, str(sender.source), timeout=120)
        assert differs.returncode == 1, differs.stdout + differs.stderr
        assert f"offset {40 << 20} length 65536" in differs.stdout
        assert "next: a change made on the source since the last send" in differs.stdout
        assert "`replicator verify --repair`" in differs.stdout
        last = _job(rcv)
        assert (last["lsn"], last["consistency_point"]) == (
            after["lsn"],
            after["consistency_point"],
        )
    finally:
        assert rcv.stop() == 0
    promoted = replicator("failover", "--dir", str(rcv.dir), "--job", "vm1", "--force", "--json")
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout)["point_lsn"] == point
