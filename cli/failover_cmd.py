"""``replicator failover`` and ``replicator demote``: the target takes over a job, or gives
it back to replication."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from replicator.cli.common import fail, run
from replicator.engine.errors import ConfigError, ReplicatorError

if TYPE_CHECKING:
    from replicator.engine.job_replica import ReceiverConfig

FAILOVER_TIMEOUT = 600.0  # a receiver may have a backlog of complete epochs to apply first

DirOption = Annotated[
    Path, typer.Option("--dir", help="The receiver's folder: replicas are in DIR/JOB/.")
]
JobNameOption = Annotated[str, typer.Option("--job", help="The job to act on.")]
StateOption = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Receiver state, if not DIR/.replicator."),
]


def _config(directory: Path, state_dir: Path | None) -> ReceiverConfig:
    from replicator.engine.job_replica import ReceiverConfig

    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a folder", hint="give the receiver's --dir")
    return ReceiverConfig(directory, state_dir or directory / ".replicator")


def failover_command(
    directory: DirOption,
    job: JobNameOption,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="The source is gone: promote at the last complete consistency point received.",
        ),
    ] = False,
    planned: Annotated[
        bool,
        typer.Option("--planned", help="Not available yet: stop the source's sender first."),
    ] = False,
    exec_cmd: Annotated[
        str | None,
        typer.Option("--exec", help="Command to start once promoted (e.g. `virsh start VM`)."),
    ] = None,
    state_dir: StateOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Promote a job's replicas on this target: replication stops writing them, the VM can
    start here. Through the running receiver, or on the folder at rest."""
    started = time.monotonic()
    from replicator.engine.failover import failover_at_rest

    try:
        if planned:
            raise ConfigError(
                "--planned failover is not built yet",
                hint="stop the VM and `replicator send` on the source (SIGTERM: it ships "
                "everything first), then run `replicator failover --force` here",
            )
        if not force:
            raise ConfigError(
                "say which failover: --force (the source is gone or stopped: promote what "
                "was received)",
                hint="a planned failover is: stop the source's sender, then --force",
            )
        config = _config(directory, state_dir)
    except ReplicatorError as exc:
        fail(exc)

    async def main(stop: asyncio.Event) -> dict[str, object]:
        from replicator.engine import control

        socket_path = config.state_root / control.SOCKET_NAME
        try:  # a running receiver promotes (it holds the folder)
            answer = await asyncio.to_thread(
                control.request, socket_path, "failover", timeout=FAILOVER_TIMEOUT,
                job=job, exec=exec_cmd,
            )  # fmt: skip
        except control.ControlUnavailable:
            result = await failover_at_rest(config, job, exec_cmd=exec_cmd, started=started)
            return result.as_dict()
        assert isinstance(answer, dict)
        answer["rto_seconds"] = round(time.monotonic() - started, 3)  # as this command saw it
        answer["through"] = "the running receiver"
        return answer

    result = run(main, graceful=False)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(
        f"job {result['job']} promoted (generation {result['generation']}): replicas in "
        f"{result['replica_dir']} hold the consistency point at lsn {result['point_lsn']} "
        f"(source time {result['point_time'] or 'unknown'}); RTO {result['rto_seconds']} s"
        + (" (it was already promoted)" if result["already_promoted"] else "")
    )
    for path in result["rewritten"]:  # type: ignore[attr-defined]
        typer.echo(f"  pointed {path} at the replicas")
    for step in result["next_steps"]:  # type: ignore[attr-defined]
        typer.echo(f"  next: {step}")


def demote_command(
    directory: DirOption,
    job: JobNameOption,
    discard: Annotated[
        bool,
        typer.Option(
            "--discard-changes",
            help="Required: what the promoted side wrote will be overwritten by the source.",
        ),
    ] = False,
    state_dir: StateOption = None,
) -> None:
    """Give a promoted job back to replication (the source's next `send --resync`
    overwrites what differs). Run with the receiver stopped."""
    from replicator.engine.failover import demote_at_rest

    try:
        if not discard:
            raise ConfigError(
                "demote throws away what the promoted side wrote: say so with --discard-changes",
                hint="to keep those changes, bring the source up to date from here first",
            )
        config = _config(directory, state_dir)
    except ReplicatorError as exc:
        fail(exc)

    async def main(stop: asyncio.Event) -> int:
        return await demote_at_rest(config, job)

    generation = run(main, graceful=False)
    typer.echo(
        f"job {job} is a replica again (generation {generation}); on the source run "
        "`replicator send --resync ...` to overwrite what differs"
    )
