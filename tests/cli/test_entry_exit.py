"""The entry point leaves without the interpreter's teardown, and loses nothing by it.

``cli/entry._leave`` ends a finished command with ``os._exit``: these run it in a child
Python and check what a normal exit would have given: the status for every kind of exit
code, output still buffered in a pipe, exit handlers, and a running non-daemon thread
(which the normal exit waits for, so ``_leave`` takes the normal exit then).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.tools import ENV, REPLICATOR, free_port, replicator, start_receiver, wait_port


def _child(body: str) -> subprocess.CompletedProcess[str]:
    code = "from replicator.cli.entry import _leave\n" + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as usual
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


@pytest.mark.parametrize(("code", "status"), [("None", 0), ("0", 0), ("3", 3), ("130", 130)])
def test_status_is_what_sys_exit_gives(code: str, status: int) -> None:
    assert _child(f"_leave({code})").returncode == status


def test_a_message_is_printed_and_exits_1() -> None:
    out = _child("_leave('replicator: error: nothing to do')")
    assert out.returncode == 1
    assert out.stderr.strip() == "replicator: error: nothing to do"


def test_buffered_output_and_exit_handlers_are_not_lost() -> None:
    out = _child(
        """
        import atexit, sys
        atexit.register(lambda: print("handler ran", file=sys.stderr))
        sys.stdout.write("x" * 100_000)  # a pipe: block-buffered, most of it still buffered
        sys.stdout.write("end")
        _leave(0)
        """
    )
    assert out.returncode == 0
    assert out.stdout == "x" * 100_000 + "end"
    assert out.stderr.strip() == "handler ran"


def test_a_running_thread_is_waited_for() -> None:
    out = _child(
        """
        import threading, time
        def work():
            time.sleep(0.5)
            print("thread finished", flush=True)
        threading.Thread(target=work).start()
        _leave(4)
        """
    )
    assert out.returncode == 4
    assert out.stdout.strip() == "thread finished"


def test_the_program_exits_with_its_documented_codes() -> None:
    """Through the console entry point: a usage error (2), a success with output (0)."""
    bad = replicator("send", "--bogus", timeout=60)
    assert bad.returncode == 2, bad.stderr
    assert "--bogus" in bad.stderr
    good = replicator("--version", timeout=60)
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip()


def test_structlog_is_imported_without_rich_and_still_logs_tracebacks() -> None:
    out = _child(
        """
        import sys
        from replicator.cli.entry import _import_structlog
        _import_structlog()
        import structlog
        assert not [m for m in sys.modules if m.split(".")[0] == "rich"]
        import rich.traceback, rich.progress  # importable again afterwards
        from replicator.cli.logging_setup import LogFormat, configure_logging
        for fmt in (LogFormat.console, LogFormat.json):
            configure_logging(fmt)
            try:
                raise ValueError("the detail")
            except ValueError:
                structlog.get_logger().exception("it.failed")
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("Traceback (most recent call last)") == 2, out.stderr
    assert out.stderr.count("ValueError: the detail") == 2, out.stderr


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_bug_exits_70_with_its_traceback(fmt: str) -> None:
    """An error no exit code names (a bug) says so, and logs where it happened in either
    log format: a one-line TypeError with no traceback is all an operator got before."""
    out = _child(
        f"""
        from replicator.cli.common import fail
        from replicator.cli.logging_setup import LogFormat, configure_logging
        configure_logging(LogFormat.{fmt})
        def a_broken_step():
            return tuple(object())
        import sys, typer
        try:
            try:
                a_broken_step()
            except TypeError as exc:
                fail(exc)
        except typer.Exit as done:  # what typer's runner turns into the exit status
            sys.exit(done.exit_code)
        """
    )
    assert out.returncode == 70, out.stderr
    assert "Traceback (most recent call last)" in out.stderr, out.stderr
    assert "a_broken_step" in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-2:]
    assert last[0] == "replicator: unexpected error: TypeError: 'object' object is not iterable"
    assert "This is a bug in replicator" in last[1], last


def test_a_crash_in_native_code_leaves_every_stack_in_the_log(tmp_path: Path) -> None:
    """A receiver killed by SIGSEGV (as a crash in a C extension would) writes its Python
    stacks to stderr before it dies, and still dies of the signal."""
    rcv = start_receiver(tmp_path / "target")
    rcv.proc.send_signal(signal.SIGSEGV)
    _, err = rcv.proc.communicate(timeout=60)
    assert rcv.proc.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in err
    assert "most recent call first" in err and "File " in err


def test_crash_stacks_are_skipped_without_a_stderr() -> None:
    """No stderr (fd 2 closed: ``sys.stderr`` is None): nowhere to write the stacks, and
    that must not be the command's first failure."""
    out = _child(
        """
        import sys
        from replicator.cli.entry import _enable_crash_stacks
        sys.stderr = None
        _enable_crash_stacks()
        print("ran on")
        """
    )
    assert out.returncode == 0 and out.stdout == "ran on\n", out.stderr


def _with_fds_closed(fds: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
    """The command started with some of its standard streams closed (``fds``: ``2>&-``)."""
    command = " ".join(shlex.quote(arg) for arg in [*REPLICATOR, *args])
    return subprocess.Popen(
        ["sh", "-c", f"exec {command} {fds}"], text=True, env=ENV, stdout=subprocess.PIPE, **popen
    )


@pytest.mark.parametrize("fds", ["2>&-", "<&- 2>&-"])
def test_commands_run_without_a_stderr(tmp_path: Path, fds: str) -> None:
    """Started with fd 2 closed, a command did its job before: the first log line found
    ``sys.stderr`` None and `--version`, `status`, `receive` and `send` all exited 1."""
    version = _with_fds_closed(fds, "--version")
    assert version.communicate(timeout=60)[0].startswith("replicator ")
    assert version.returncode == 0
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    port = free_port()
    rcv = _with_fds_closed(
        fds, "receive", "--listen", f"127.0.0.1:{port}", "--dir", str(tmp_path / "t"), "--insecure"
    )
    try:
        wait_port(port, rcv)
        send = _with_fds_closed(
            fds, "send", "--to", f"127.0.0.1:{port}", "--job", "vm", "--once", "--insecure",
            "--state-dir", str(tmp_path / "state"), str(image),
        )  # fmt: skip
        out, _ = send.communicate(timeout=120)
        assert send.returncode == 0, out
        assert "durable on the receiver" in out
        assert (tmp_path / "t" / "vm" / "disk.raw").read_bytes() == image.read_bytes()
        status = _with_fds_closed(fds, "status", "--state-dir", str(tmp_path / "state"))
        assert "not running" in status.communicate(timeout=60)[0]
        assert status.returncode == 0
    finally:
        rcv.send_signal(signal.SIGTERM)
        rcv.communicate(timeout=60)
    assert rcv.returncode == 0


def test_a_closed_stderr_is_reopened_before_anything_can_take_its_number(tmp_path: Path) -> None:
    """Otherwise the first file opened becomes fd 2, and what is written "to stderr" (by
    a native library, a child process) lands in it: a journal segment, a replica."""
    out = _child(
        f"""
        import os, sys
        os.close(2)
        sys.stderr = None
        from replicator.cli.entry import _standard_fds
        _standard_fds()
        fd = os.open({str(tmp_path / "segment")!r}, os.O_CREAT | os.O_WRONLY)
        os.write(2, b"to stderr\\n")
        print("a log line", file=sys.stderr, flush=True)
        print(fd)
        """
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 2
    assert (tmp_path / "segment").read_bytes() == b""


def test_output_that_cannot_be_written_is_an_error_with_its_exit_code(tmp_path: Path) -> None:
    """``keygen > /dev/full``: one line saying so and exit 9, not a traceback and
    exit 1 (which `verify` uses for "the replica differs")."""
    (tmp_path / "keys").mkdir()
    with open("/dev/full", "w") as full:
        out = subprocess.run(
            [*REPLICATOR, "keygen", "--out", str(tmp_path / "keys"), "--name", "a"],
            stdout=full, stderr=subprocess.PIPE, text=True, env=ENV, timeout=60, check=False,
        )  # fmt: skip
    assert out.returncode == 9, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("replicator: error: could not write the command's output"), last
