"""``replicator send``: replicate volumes to a receiver (snapshot-diff capture)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress

from replicator.cli.common import fail, parse_endpoint, require_insecure, run
from replicator.engine.errors import ReplicatorError
from replicator.engine.names import check_job_name
from replicator.engine.scan import Progress
from replicator.engine.sender import Sender, SenderConfig, Summary
from replicator.engine.statedir import default_state_dir
from replicator.engine.volumes import DEFAULT_EXTENT, resolve_volumes

ToOption = Annotated[str, typer.Option("--to", help="Receiver address, HOST:PORT.")]
JobOption = Annotated[
    str, typer.Option("--job", help="Job name: the replica folder on the receiver (DIR/JOB).")
]
StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Sender state (journal, manifests). Default: /var/lib/replicator/send/JOB as root.",
    ),
]
InsecureOption = Annotated[
    bool, typer.Option("--insecure", help="No TLS or authentication (trusted networks only).")
]
VolumesArgument = Annotated[
    list[Path],
    typer.Argument(help="Disk images (VHD, VHDX, qcow2, raw) and small configuration files."),
]


def build_config(
    to: str,
    job: str,
    state_dir: Path | None,
    volumes: list[Path],
    *,
    pre_hook: str | None = None,
    post_hook: str | None = None,
    resync: bool = False,
    extent_size: int = DEFAULT_EXTENT,
) -> SenderConfig:
    host, port = parse_endpoint(to, "--to")
    check_job_name(job)
    specs = resolve_volumes(volumes)
    return SenderConfig(
        host=host,
        port=port,
        job=job,
        volumes=specs,
        state_dir=state_dir or default_state_dir("send", job),
        extent_size=extent_size,
        pre_hook=pre_hook,
        post_hook=post_hook,
        resync=resync,
    )


@contextlib.contextmanager
def scan_progress(*, enabled: bool) -> Iterator[Progress | None]:
    """A rich progress bar on stderr while scanning, when stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    columns = (
        TextColumn("scanning"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with RichProgress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("scan", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def print_summary(summary: Summary, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), sort_keys=True))
        return
    typer.echo(
        f"job {summary.job}: epoch {summary.epoch} durable on the receiver (lsn {summary.lsn}, "
        f"basis {summary.basis})\n"
        f"  scanned {_mib(summary.bytes_scanned)}, changed {_mib(summary.bytes_changed)} "
        f"in {summary.extents_changed} extents, {summary.files_changed} files, "
        f"zeroed {_mib(summary.bytes_zeroed)}\n"
        f"  sent {_mib(summary.payload_bytes)} of records as {_mib(summary.wire_bytes)} on the "
        f"wire (compression {summary.compression_ratio:.2f}x) in {summary.seconds:.2f} s"
    )


def send(
    to: ToOption,
    job: JobOption,
    volumes: VolumesArgument,
    state_dir: StateDirOption = None,
    once: Annotated[
        bool, typer.Option("--once", help="Bring the replica up to date once, then exit.")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", help="Seconds between scans when continuous.", min=0.1)
    ] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    insecure: InsecureOption = False,
    capture: Annotated[
        str, typer.Option("--capture", help="Capture method: scan (snapshot diff).")
    ] = "scan",
    pre_hook: Annotated[
        str | None, typer.Option("--pre-hook", help="Shell command run before each scan (freeze).")
    ] = None,
    post_hook: Annotated[
        str | None, typer.Option("--post-hook", help="Shell command run after each scan (thaw).")
    ] = None,
    resync: Annotated[
        bool,
        typer.Option("--resync", help="Compare with the replica itself instead of local state."),
    ] = False,
) -> None:
    """Replicate VOLUMES to a receiver: changed extents only, in write order, durably."""
    try:
        require_insecure(insecure)
        if capture != "scan":
            raise ReplicatorError(
                f"--capture {capture} is not available in this version; use --capture scan"
            )
        config = build_config(
            to, job, state_dir, volumes, pre_hook=pre_hook, post_hook=post_hook, resync=resync
        )
    except ReplicatorError as exc:
        fail(exc)
    sender = Sender(config)
    if once:
        with scan_progress(enabled=not as_json) as progress:

            async def main_once(stop: asyncio.Event) -> Summary:
                return await sender.run_once(progress)

            summary = run(main_once, graceful=False)
        print_summary(summary, as_json)
        return

    async def main_forever(stop: asyncio.Event) -> None:
        await sender.run_forever(interval, stop)

    run(main_forever, graceful=True)
