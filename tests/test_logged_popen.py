"""``tests.tools.LoggedPopen``: a test's child that logs more than a pipe holds, with nobody
reading while it runs, is not blocked, and its whole stderr is still there for a message."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.tools import LoggedPopen, start_receiver, stop_and_read, wait_for

MIB = 1024 * 1024

# writes ``MiB`` MiB to its stderr in 4 KiB lines, then a last line, then exits 0
CHATTY = (
    "import sys\n"
    "line = 'x' * 4095 + '\\n'\n"
    "for _ in range(int(sys.argv[1]) * 256):\n"
    "    sys.stderr.write(line)\n"
    "sys.stderr.write('done\\n')\n"
)


def test_a_child_logging_more_than_a_pipe_holds_is_not_blocked() -> None:
    # through a pipe nobody reads, the child blocks at 64 KiB and never exits
    proc = LoggedPopen([sys.executable, "-c", CHATTY, "2"], stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=120) == 0
    assert proc.stderr is not None
    said = proc.stderr.read()
    assert len(said) == 2 * MIB + len("done\n")
    assert said.endswith("x\ndone\n")


def test_communicate_waits_for_what_the_child_says_as_it_stops() -> None:
    script = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        "    sys.stderr.write('stopping\\n')\n"
        "    sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "sys.stderr.write('ready\\n')\n"
        "sys.stderr.flush()\n"
        "time.sleep(600)\n"
    )
    proc = LoggedPopen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        stderr = proc.stderr
        wait_for(lambda: stderr.seek(0) == 0 and "ready" in stderr.read(), proc, "ready")
        stderr.seek(0)
        code, said = stop_and_read(proc)  # SIGTERM, then communicate()
    finally:
        proc.kill()
        proc.wait()
    assert (code, said) == (3, "ready\nstopping\n")
    assert stop_and_read(proc) == (3, "ready\nstopping\n")  # again: the same answer


def test_a_log_file_is_appended_to_and_stderr_reads_this_childs_part(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    log.write_text("an earlier child\n")
    proc = LoggedPopen([sys.executable, "-c", CHATTY, "1"], log=log, stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=120) == 0
    assert proc.stderr is not None
    expected = ("x" * 4095 + "\n") * 256 + "done\n"
    assert proc.stderr.read() == expected
    assert log.read_text() == "an earlier child\n" + expected


def test_a_receiver_started_by_the_helper_logs_to_a_file_not_a_pipe(tmp_path: Path) -> None:
    """What the kernel shows of its fd 2: a regular file, whose size no reader limits."""
    receiver = start_receiver(tmp_path / "target")
    try:
        assert stat.S_ISREG(os.stat(f"/proc/{receiver.proc.pid}/fd/2").st_mode)
    finally:
        assert receiver.stop() == 0
