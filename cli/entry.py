"""The program's entry point: signals first, then the (slow) imports, then the command.

Importing the command line takes a few hundred milliseconds (typer, rich, the engine).
A Ctrl-C or SIGTERM in that time used to end in a KeyboardInterrupt traceback or a silent
death; nothing has started yet, so the process just says so and exits with the
documented code for an interruption. ``cli/common.run`` installs the real handlers once a
command runs. Kept apart from ``main.py`` so that importing the command line as a
library (tests, embedding) never touches the importer's signal handlers.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

INTERRUPTED = 130  # ExitCode.INTERRUPTED, without importing the engine yet


def _interrupted_early(signum: int, frame: FrameType | None) -> None:
    os.write(2, b"replicator: error: interrupted; run it again: it resumes\n")
    os._exit(INTERRUPTED)


def main() -> None:
    """Console-script and ``python -m replicator.cli`` entry point."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupted_early)
    from replicator.cli.main import main as run_command

    run_command()
