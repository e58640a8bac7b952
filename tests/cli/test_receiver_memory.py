"""A receiver's memory with many senders at once stays within ``--in-flight-max``.

Real processes: one ``replicator receive`` and 8 ``replicator send --once`` first syncs at
once on loopback. Each session may hold up to its credit window (66 MiB) of records read
and not yet durable (a first sync's direct writes wait for 32 MiB before their commit),
so without a bound on all sessions together 8 of them took the receiver 123-153 MiB above
its start (peak RSS, VmHWM), growing with the number of senders. With ``--in-flight-max
16M`` the sessions wait for each other's syncs instead: 39-43 MiB, within the budget plus
what each connection holds outside it (the frame it read and waits to have counted, its
transport buffers: a few MiB).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    distinct_random_disk,
    one_line_error,
    qemu_compare,
    qemu_img,
    replicator,
    start_receiver,
)

MIB = 1024 * 1024
SENDERS = 8
BUDGET_MIB = 16
PER_CONNECTION_MIB = 6  # outside the budget: one frame read (2 MiB) and its buffers


def sender(address: str, k: int, state: Path, disk: Path) -> subprocess.Popen[str]:
    """``send --once`` of ``disk`` as job vm``k``, running."""
    return LoggedPopen(
        [*REPLICATOR, "send", "--to", address, "--job", f"vm{k}", "--state-dir", str(state),
         "--once", "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_many_senders_stay_within_the_in_flight_budget(tmp_path: Path) -> None:
    disks = []
    for k in range(SENDERS):
        disk = tmp_path / f"disk{k}.raw"
        qemu_img("create", "-f", "raw", str(disk), "64M")
        distinct_random_disk(disk, 64 * MIB)
        disks.append(disk)
    rcv = start_receiver(
        tmp_path / "target", security=("--insecure", "--in-flight-max", f"{BUDGET_MIB}M")
    )
    try:
        start = vm_hwm_mib(rcv.proc.pid)
        senders = [sender(rcv.address, k, tmp_path / f"state{k}", d) for k, d in enumerate(disks)]
        for proc in senders:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
        grown = vm_hwm_mib(rcv.proc.pid) - start
        # and status says the budget held them back (nothing else told an operator)
        out = replicator("status", "--dir", str(rcv.dir), "--json")
        budget = json.loads(out.stdout)["in_flight"]
        assert budget["limit"] == BUDGET_MIB * MIB and budget["waits"] > 0, budget
        assert 0 < budget["peak"] <= BUDGET_MIB * MIB and budget["used"] == 0, budget
        table = replicator("status", "--dir", str(rcv.dir)).stdout
        assert f"in-flight budget: {budget['waits']} waits since start" in " ".join(table.split())
    finally:
        assert rcv.stop() == 0
    for k, disk in enumerate(disks):
        same = qemu_compare("raw", disk, tmp_path / "target" / f"vm{k}" / disk.name)
        assert same.returncode == 0, same.stdout + same.stderr
    bound = BUDGET_MIB + SENDERS * PER_CONNECTION_MIB
    assert grown <= bound, (
        f"{SENDERS} first syncs at once took the receiver {grown:.0f} MiB above its start "
        f"(--in-flight-max {BUDGET_MIB}M: at most {bound} MiB)"
    )


def test_an_in_flight_budget_too_small_is_refused(tmp_path: Path) -> None:
    out = replicator(
        "receive", "--listen", "127.0.0.1:1", "--dir", str(tmp_path), "--insecure",
        "--in-flight-max", "1M",
    )  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert "--in-flight-max 1M is too small: at least 4M" in one_line_error(out.stderr)
