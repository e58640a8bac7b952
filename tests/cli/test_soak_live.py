"""Soak (make test-long): live NBD capture under fio while either side is SIGKILLed at random."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli.test_nbd_capture import _converges, _start_live, _stop, _uri
from tests.tools import qemu_img, require_tool, start_receiver


@pytest.mark.long
def test_fio_with_random_kills_of_either_side_converges(tmp_path: Path) -> None:
    require_tool("fio")
    disk, sock = tmp_path / "disk.img", tmp_path / "nbd.sock"
    qemu_img("create", "-q", "-f", "raw", str(disk), "64M")
    target, state = tmp_path / "target", tmp_path / "state"
    receiver = start_receiver(target)
    sender = _start_live(receiver, state, sock, disk)
    rng = random.Random(20261125)
    uri = _uri(sock, "disk.img")
    try:
        for round_no in range(12):
            fio = subprocess.Popen(
                ["fio", f"--name=soak{round_no}", "--ioengine=nbd", f"--uri={uri}",
                 "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=64M", "--time_based",
                 "--runtime=2", "--verify_state_save=0"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
            )  # fmt: skip
            time.sleep(rng.uniform(0.3, 1.5))
            if rng.random() < 0.5:
                receiver.stop(signal.SIGKILL)
                fio.wait(timeout=60)
                receiver = start_receiver(target, receiver.port)
            else:
                sender.send_signal(signal.SIGKILL)  # fio loses its server mid-run
                sender.wait()
                fio.wait(timeout=60)
                sock.unlink(missing_ok=True)
                sender = _start_live(receiver, state, sock, disk)
        _converges("raw", disk, target / "live" / "disk.img", timeout=120)
    except BaseException:
        for name, proc in (("sender", sender), ("receiver", receiver.proc)):
            said = proc.stderr.read() if proc.stderr is not None else ""  # a file: what is there
            print(f"--- the last {name}'s log ---\n{said[-5000:]}")
        raise
    finally:
        _stop(sender)
        receiver.stop()
