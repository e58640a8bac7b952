"""The program's entry point: signals first, then the (slow) imports, then the command.

Importing the command line takes a few hundred milliseconds (typer, rich, the engine).
A Ctrl-C or SIGTERM in that time used to end in a KeyboardInterrupt traceback or a silent
death; nothing has started yet, so the process just says so and exits with the
documented code for an interruption. ``cli/common.run`` installs the real handlers once a
command runs. Kept apart from ``main.py`` so that importing the command line as a
library (tests, embedding) never touches the importer's signal handlers.

A finished command leaves without tearing the interpreter down (``_leave``): freeing every
module and object took 50-90 ms of a 0.8 s command (bench/RESULTS.md, start-up), and
nothing is left to do by then. Exit handlers still run and the standard streams are
flushed, as at a normal exit; if a thread that is not a daemon is still running, the
normal exit (which waits for it) is taken instead.

A fatal signal (a crash in native code: SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) writes
every thread's Python stack to stderr before the process dies (``faulthandler``), so a
service's log says where it was; nothing else about it changes (the exit status is the
signal's). A process started with stderr (or stdin, stdout) closed gets ``/dev/null``
there first (``_standard_fds``).

A ``send`` whose command line names a large image starts hashing it before anything else
is imported (``engine/early_hashing.py``): the imports take ~0.1 s of one vCPU, and the
scan's helpers use the others meanwhile.

structlog is imported first, while rich cannot be imported (``_import_structlog``):
structlog loads rich's console, traceback and pretty-printing modules at import for its
rich exception renderer only, which our processors never reach (``format_exc_info`` turns
an exception into plain text before the renderer sees it); they took ~0.1 s of every
command's start. Commands that draw with rich (a progress bar, ``status``'s table) import
it when they do.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, cast

INTERRUPTED = 130  # ExitCode.INTERRUPTED, without importing the engine yet


def _interrupted_early(signum: int, frame: FrameType | None) -> None:
    os.write(2, b"replicator: error: interrupted; run it again: it resumes\n")
    os._exit(INTERRUPTED)


def main() -> None:
    """Console-script and ``python -m replicator.cli`` entry point."""
    _standard_fds()
    _enable_crash_stacks()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted_early)
    if "send" in sys.argv:  # (no other command pays for the import)
        _hash_early(sys.argv[1:])
    _import_structlog()
    from replicator.cli.main import main as run_command

    try:
        run_command()
    except SystemExit as stop:
        _leave(stop.code)
    _leave(0)


def _standard_fds() -> None:
    """Started with stdin, stdout or stderr closed (``2>&-``, a careless supervisor), open
    ``/dev/null`` in its place, as daemons do.

    Otherwise the first file the command opens takes that number: a journal segment or a
    replica at fd 2 would receive whatever writes "to stderr" (a log line, a native
    library's warning, a child process's messages). And the command ran with
    ``sys.stderr`` None, which its first log line turned into a failure (exit 1, for
    ``--version`` too). Output to a closed stream is lost, as with any program.
    """
    for fd, flags in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, flags)  # the lowest free number: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdin is None:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's stream, never closed
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(2, "w", errors="backslashreplace", closefd=False)  # noqa: SIM115


def _hash_early(argv: list[str]) -> None:
    """A ``send`` that names a large image starts hashing it now, on the vCPU that the
    imports below leave idle (engine/early_hashing.py; the scan takes the helpers only if
    they were asked what it would ask)."""
    from replicator.engine import early_hashing

    early_hashing.start(argv)


def _enable_crash_stacks() -> None:
    """A crash in native code (SIGSEGV, SIGABRT...) writes every thread's stack to stderr.
    Started without a stderr (fd 2 closed) there is nowhere to write: the command goes on
    without them instead of failing at its first line."""
    with contextlib.suppress(RuntimeError, ValueError, OSError):  # sys.stderr None, bad fd
        faulthandler.enable()


# What structlog imports for rich tracebacks only (structlog/dev.py, structlog/tracebacks.py)
_UNUSED_BY_STRUCTLOG = ("rich", "rich.traceback", "rich.pretty")


def _import_structlog() -> None:
    """Import structlog while rich cannot be imported.

    structlog then falls back to plain tracebacks for the renderer we do not use. rich is
    importable again afterwards: only structlog's own import skips it.
    """
    if "structlog" in sys.modules or any(n in sys.modules for n in _UNUSED_BY_STRUCTLOG):
        return  # imported already (a test, an embedding): nothing to save
    modules = cast(dict[str, Any], sys.modules)
    for name in _UNUSED_BY_STRUCTLOG:
        modules[name] = None  # the import system's "cannot be imported" marker
    try:
        import structlog  # noqa: F401 - imported for its side effect: loaded once, lighter
    finally:
        for name in _UNUSED_BY_STRUCTLOG:
            if modules.get(name, 0) is None:
                del modules[name]


def _leave(code: str | int | None) -> None:
    """Exit with ``code`` as ``sys.exit`` would, skipping the interpreter's teardown."""
    if any(
        t.is_alive() and not t.daemon
        for t in threading.enumerate()
        if t is not threading.main_thread()
    ):
        sys.exit(code)  # the normal exit waits for it
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()  # what a normal exit runs first (in typeshed, not in the docs)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream
            status = status or 120  # what Python exits with when the final flush fails
    os._exit(status)
