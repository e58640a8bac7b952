"""Source self-fencing (docs/WITNESS.md, "Fencing") with real processes: a `send --witness`
whose path to the built-in witness stalls (a WanEmulator between them) fences itself
within --fence-after, runs --fence-exec, shows it in `status`, holds NBD writes, and
goes on when the witness answers again; or, when the target was promoted meanwhile,
fails the held writes and stops (exit 11)."""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator.engine import replica_id as replica_ids
from replicator.engine.control import SOCKET_NAME, ControlUnavailable, request
from replicator.engine.errors import ExitCode
from replicator.engine.names import RECEIVER_STATE_NAME
from replicator.engine.witness_client import BuiltinWitness
from replicator.engine.witness_state import fence_wait
from replicator.journal.durable import read_state
from tests.cli.faults import log_events
from tests.cli.test_network_faults import ProxyThread
from tests.cli.test_witness import (
    LEASE,
    disk,  # noqa: F401 - a fixture
    procs,  # noqa: F401 - a fixture
    receiver_job,
    replicating_pair,
    start_witness,
    wait_for,
)
from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    ReceiverProc,
    free_port,
    one_line_error,
    qemu_img,
    replicator,
    require_tool,
    start_receiver,
)

# --witness-interval of the senders here: 1 s. With the 0.3 s of the other witness tests
# (a 0.6 s fence_after), a sender starved of the CPU for a moment on a loaded machine
# missed a renewal and fenced itself, rightly, while these tests expected it renewing
FENCE_LEASE = ("--witness-interval", "1.0")
INTERVAL = float(FENCE_LEASE[1])
FENCE_AFTER = 2 * INTERVAL  # the default


@pytest.fixture
def witness_path(
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],  # noqa: F811
) -> Iterator[tuple[str, ProxyThread]]:
    """A built-in witness (its direct address) and a WAN emulator in front of it, which
    the sender is given: stalling it cuts the source off from the witness only."""
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    host, port = address.rsplit(":", 1)
    proxy = ProxyThread((host, int(port)))
    try:
        yield address, proxy
    finally:
        proxy.close()


def sender_job(state: Path) -> dict[str, Any] | None:
    """The running sender's job status (its control socket), None while it does not answer."""
    try:
        answer = request(state / SOCKET_NAME, "status", timeout=5)
    except ControlUnavailable:
        return None
    jobs = answer["jobs"]
    return jobs[0] if jobs else None


def fenced(state: Path) -> bool:
    job = sender_job(state)
    return job is not None and job["state"] == "fenced" and job["fence"]["fenced"] is True


def stall(proxy: ProxyThread) -> None:
    proxy.call(lambda: proxy.wan.stall())


def test_a_source_cut_off_from_the_witness_fences_itself_and_goes_on_when_it_is_back(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
    witness_path: tuple[str, ProxyThread],
) -> None:
    _, proxy = witness_path
    marker = tmp_path / "fenced"
    script = f'echo "$REPLICATOR_JOB" >> {shlex.quote(str(marker))}'
    via = f"127.0.0.1:{proxy.address[1]}"
    rcv = start_receiver(tmp_path / "target")
    procs.append(rcv.proc)
    # the sender through the proxy; the receiver is not the point here (no auto-failover)
    sender = LoggedPopen(
        [*REPLICATOR, "send", "--to", rcv.address, "--job", "vm1", "--state-dir",
         str(tmp_path / "state"), "--insecure", "--interval", "0.2", "--witness", via, *FENCE_LEASE,
         "--fence-exec", f"sh -c {shlex.quote(script)}", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    procs.append(sender)
    state = tmp_path / "state"
    assert wait_for(lambda: (sender_job(state) or {}).get("connected") is True, 60)
    time.sleep(3 * INTERVAL)  # renewing: not fenced
    job = sender_job(state)
    assert job is not None and job["fence"]["fenced"] is False, job
    assert job["fence"]["fence_after"] == FENCE_AFTER
    assert not marker.exists()

    stall(proxy)
    cut = time.monotonic()
    assert wait_for(marker.exists, FENCE_AFTER + 3, step=0.02), sender_job(state)
    took = time.monotonic() - cut
    # fenced no earlier than fence_after after the last successful renewal (at most one
    # interval before the stall), and within fence_after + ~1 s (the command's start)
    assert FENCE_AFTER - INTERVAL < took < FENCE_AFTER + 1.0, took
    assert wait_for(lambda: fenced(state), 2)
    shown = replicator("status", "--state-dir", str(state))
    assert shown.returncode == 0, shown.stderr
    assert "no lease renewal at the witness" in " ".join(shown.stdout.split()), shown.stdout
    time.sleep(1.0)
    assert marker.read_text().splitlines() == ["vm1"]  # once per fencing
    assert sender.poll() is None

    proxy.call(proxy.wan.resume)
    assert wait_for(lambda: not fenced(state), 10), sender_job(state)
    job = sender_job(state)
    assert job is not None and job["state"] != "fenced" and job["fence"]["fenced"] is False
    sender.terminate()
    _, err = sender.communicate(timeout=30)
    events = [e["event"] for e in log_events(err)]
    assert "sender.fenced" in events and "sender.unfenced" in events, events
    assert events.index("sender.fenced") < events.index("sender.unfenced")
    fence = next(e for e in log_events(err) if e["event"] == "sender.fenced")
    assert fence["level"] == "error" and "failback" in fence["action"]
    assert rcv.stop() == 0


def test_fence_options_are_checked_at_start(tmp_path: Path, disk: Path) -> None:  # noqa: F811
    base = ("send", "--to", f"127.0.0.1:{free_port()}", "--job", "vm1", "--state-dir",
            str(tmp_path / "s"), "--insecure")  # fmt: skip
    late = replicator(*base, "--witness", "127.0.0.1:1", *LEASE, "--fence-after", "0.9", str(disk))
    assert late.returncode == ExitCode.CONFIG, late.stderr
    line = one_line_error(late.stderr)
    assert "--fence-after 0.9 is not below the lease" in line and "--witness-interval" in line
    alone = replicator(*base, "--fence-exec", "virsh suspend vm1", str(disk))
    assert alone.returncode == ExitCode.CONFIG and "--witness" in one_line_error(alone.stderr)
    empty = replicator(*base, "--witness", "127.0.0.1:1", "--fence-exec", " ", str(disk))
    assert empty.returncode == ExitCode.CONFIG and "is empty" in one_line_error(empty.stderr)


# -- NBD capture: writes are held while fenced ------------------------------------------------


def start_nbd_sender(
    rcv: ReceiverProc, state: Path, sock: Path, image: Path, witness: str
) -> subprocess.Popen[str]:
    proc = LoggedPopen(
        [*REPLICATOR, "send", "--to", rcv.address, "--job", "live", "--state-dir", str(state),
         "--capture", "nbd", "--nbd-socket", str(sock), "--insecure", "--witness", witness,
         *FENCE_LEASE, str(image)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    assert wait_for(lambda: (sender_job(state) or {}).get("state") == "replicating", 60), (
        proc.poll(),
        sender_job(state),
    )
    # "replicating" is said once the first sync is done, before the export is served (its
    # socket is made listening): a write at once found no export on a loaded machine
    assert wait_for(sock.exists, 60), (proc.poll(), sender_job(state))
    return proc


def nbd_write(sock: Path, pattern: int) -> subprocess.Popen[str]:
    """qemu-io writing 64 KiB of ``pattern`` at offset 1 MiB through the export."""
    return subprocess.Popen(
        [require_tool("qemu-io"), "-f", "raw", "-c", f"write -P {pattern:#x} 1M 64k",
         f"nbd+unix:///vm1.img?socket={sock}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def at_1m(image: Path) -> bytes:
    with image.open("rb") as f:
        f.seek(1 << 20)
        return f.read(64 * 1024)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "vm1.img"
    qemu_img("create", "-q", "-f", "raw", str(path), "8M")
    return path


def test_nbd_writes_are_held_while_fenced_and_land_after(
    tmp_path: Path,
    image: Path,
    procs: list[subprocess.Popen[str]],  # noqa: F811
    witness_path: tuple[str, ProxyThread],
) -> None:
    _, proxy = witness_path
    rcv = start_receiver(tmp_path / "target")
    procs.append(rcv.proc)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    sender = start_nbd_sender(rcv, state, sock, image, f"127.0.0.1:{proxy.address[1]}")
    procs.append(sender)
    done = nbd_write(sock, 0x22)  # not fenced: acknowledged at once
    assert done.wait(timeout=30) == 0 and "error" not in done.communicate()[0].lower()

    stall(proxy)
    assert wait_for(lambda: fenced(state), FENCE_AFTER + 15), sender_job(state)
    writer = nbd_write(sock, 0x33)
    procs.append(writer)
    time.sleep(1.5)
    assert writer.poll() is None, writer.communicate()  # held: not acknowledged
    assert at_1m(image) == b"\x22" * 65536  # nor written

    proxy.call(proxy.wan.resume)
    out, _ = writer.communicate(timeout=15)
    assert writer.returncode == 0 and "error" not in out.lower(), out
    assert at_1m(image) == b"\x33" * 65536
    # unfenced before the held write went on (SourceFence.renewed); a loaded machine may
    # miss a renewal within the tests' 0.6 s fence_after and fence it again meanwhile
    assert wait_for(lambda: not fenced(state), 30), sender_job(state)
    sender.terminate()
    assert sender.wait(timeout=60) == 0
    assert rcv.stop() == 0


def test_a_fenced_source_whose_target_was_promoted_fails_the_held_writes(
    tmp_path: Path,
    image: Path,
    procs: list[subprocess.Popen[str]],  # noqa: F811
    witness_path: tuple[str, ProxyThread],
) -> None:
    """The split brain this prevents: the source is cut off from the witness, the target
    asks for promotion; the witness refuses until the source must have fenced itself,
    then grants. The held write never lands, and the source stops (exit 11)."""
    address, proxy = witness_path
    rcv = start_receiver(tmp_path / "target")
    procs.append(rcv.proc)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    sender = start_nbd_sender(rcv, state, sock, image, f"127.0.0.1:{proxy.address[1]}")
    procs.append(sender)
    job = sender_job(state)
    assert job is not None
    generation = job["generation"]
    host, port = address.rsplit(":", 1)
    target = BuiltinWitness(host, int(port), who="target", tls=None)
    # as the receiver asks: naming its replica, which the source may have declared already
    id_file = rcv.dir / RECEIVER_STATE_NAME / "live" / replica_ids.FILE_NAME
    assert wait_for(id_file.exists, 30)
    replica = (read_state(id_file) or {})["id"]
    # the source declares it at its session's start, in a renewal that may still be on its
    # way when the sender says "replicating": cut off before it lands, the witness knows
    # the job as unbound and refuses for that reason instead
    book = tmp_path / "witness" / "witness.state"
    assert wait_for(lambda: (read_state(book) or {}).get("replicas") == {"live": replica}, 10)

    def ask() -> tuple[bool, str]:
        decision = asyncio.run(target.may_promote("live", generation, 0.2, replica=replica))
        return decision.granted, decision.reason

    stall(proxy)
    cut = time.monotonic()
    granted, reason = ask()  # the target's own `after` (0.2 s) is not enough
    assert not granted and "until the source has fenced itself" in reason, reason
    assert wait_for(lambda: fenced(state), FENCE_AFTER + 15)
    writer = nbd_write(sock, 0x44)
    procs.append(writer)
    assert wait_for(lambda: ask()[0], fence_wait(FENCE_AFTER) + 15)
    # granted no earlier than fence_after + margin after the stall
    assert time.monotonic() - cut > fence_wait(FENCE_AFTER) - INTERVAL
    assert writer.poll() is None  # still held

    proxy.call(proxy.wan.resume)  # the source hears "promoted"
    out, _ = writer.communicate(timeout=30)
    assert writer.returncode != 0 or "error" in out.lower(), out
    _, err = sender.communicate(timeout=60)
    assert sender.returncode == ExitCode.SPLIT_BRAIN, err[-2000:]
    assert at_1m(image) == bytes(65536)  # the held write never landed
    assert rcv.stop() == 0


def test_the_pair_helper_still_replicates_with_fencing(
    tmp_path: Path,
    disk: Path,  # noqa: F811
    procs: list[subprocess.Popen[str]],  # noqa: F811
) -> None:
    """With the defaults, a renewing source never fences (the automatic failover tests
    run with it on)."""
    witness, address = start_witness(tmp_path / "witness")
    procs.append(witness)
    rcv, sender = replicating_pair(
        tmp_path, disk, procs, address, send_args=("--fence-after", "0.5")
    )
    time.sleep(5 * float(LEASE[1]))  # the pair's own lease
    job = sender_job(tmp_path / "state")
    assert job is not None and job["state"] != "fenced", job
    assert job["fence"]["fenced"] is False and job["fence"]["fence_after"] == 0.5
    assert receiver_job(rcv)["promoted"] is False
    assert sender.poll() is None
    assert rcv.stop() == 0
