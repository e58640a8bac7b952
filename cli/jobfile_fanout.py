"""``send --job-file F`` without ``--job`` when F holds several jobs: one child process per
job (``replicator send ... --job NAME``), so a job that fails cannot take the others down,
and each job's exit code is its own.

The children run in their own process group: signals reach them through this process only,
once each (SIGINT and SIGTERM forwarded as they came, so a second Ctrl-C still means
"stop now"; SIGHUP as SIGTERM). Under systemd the unit uses ``KillMode=mixed`` for the
same reason (contrib/replicator-send@.service). Should this process die without passing
a signal on (SIGKILL), each child gets SIGTERM and stops as it would on one. This process
exits with 0 when every job did, else with the exit code of the first job, in file order,
that failed; a line on stderr names every job that failed and its code.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import typer

from replicator.cli.logging_setup import json_logs, quiet
from replicator.engine.errors import ExitCode


def child_argv(args: list[str], job: str) -> list[str]:
    """This process's command line (global options, ``send``, ``args``) plus ``--job``."""
    full = sys.argv[1:]
    prefix = full[: len(full) - len(args)] if full[len(full) - len(args) :] == args else ["send"]
    tail = list(args)
    at = tail.index("--") if "--" in tail else len(tail)
    tail[at:at] = ["--job", job]
    return [sys.executable, "-m", "replicator.cli", *prefix, *tail]


def _stop_with(parent: int) -> Callable[[], None]:
    """Run in each child before it starts: SIGTERM it when this process dies. Without
    it, a runner killed outside systemd (SIGKILL, the OOM killer) left its jobs running
    unsupervised in their own process group, and its restart found every state folder
    held ("already runs"). Forked from this (main) thread, which lives as long as the
    process: PR_SET_PDEATHSIG fires when the forking thread ends."""

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # died before the line above: no signal will come
            os._exit(128 + signal.SIGTERM)  # not yet started: nothing to stop gracefully

    return arm


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _log() -> Any:
    """structlog's logger, imported when a line is logged (as ``configure_logging`` does)."""
    import structlog

    return structlog.get_logger()


def _meaning(code: int) -> str:
    try:
        return ExitCode(code).name.lower().replace("_", " ")
    except ValueError:
        return f"killed by signal {-code}" if code < 0 else "unexpected"


def run_jobs(path: Path, jobs: list[str], args: list[str]) -> int:
    """Run every job of ``path`` at once, each in a child process; their combined exit code."""
    if not quiet():  # -q: warnings and errors only
        typer.echo(
            f"replicator: running {len(jobs)} jobs from {path}, one process each: "
            f"{', '.join(jobs)}",
            err=True,
        )
        if json_logs():  # log collectors read the children's JSON lines: this one too
            _log().info("send.jobs_started", job_file=str(path), jobs=jobs)
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)  # jobs not started yet are not started
        sent = signal.SIGTERM if signum == signal.SIGHUP else signum
        for child in children.values():
            if child.poll() is None:
                child.send_signal(sent)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    for job in jobs:
        if stopping:
            break
        children[job] = subprocess.Popen(
            child_argv(args, job),
            stdin=subprocess.DEVNULL,
            process_group=0,
            preexec_fn=_stop_with(os.getpid()),
        )
    codes = {job: child.wait() for job, child in children.items()}
    failed = [(job, code) for job, code in codes.items() if code != 0]
    for job, code in failed:
        typer.echo(
            f"replicator: job {job} ended with exit code {code} ({_meaning(code)})", err=True
        )
        if json_logs():
            _log().error("send.job_failed", job=job, exit_code=code, meaning=_meaning(code))
    if not failed:
        return ExitCode.INTERRUPTED if len(codes) < len(jobs) else 0
    code = failed[0][1]
    return code if code > 0 else 128 - code  # a child killed by signal N: 128 + N
