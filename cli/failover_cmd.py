"""``replicator failover`` and ``replicator demote``: the target takes over a job, or gives
it back to replication."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from replicator.cli.common import fail, finite, run
from replicator.engine.errors import ConfigError, ConnectError, ExitCode, ReplicatorError
from replicator.engine.names import RECEIVER_STATE_NAME, printable

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
    return ReceiverConfig(directory, state_dir or directory / RECEIVER_STATE_NAME)


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
    allow_inconsistent: Annotated[
        bool,
        typer.Option(
            "--allow-inconsistent",
            help="With --force: promote even a replica that is not at a consistency point "
            "(a comparison cut short, its state lost), as it is. For when the source is gone "
            "for good and this is the best copy left; check its file systems before use.",
        ),
    ] = False,
    planned: Annotated[
        bool,
        typer.Option(
            "--planned",
            help="The source is up: its sender stops capture and ships everything, then the "
            "replicas are promoted at exactly that point (zero loss). Needs the receiver "
            "running and the sender connected.",
        ),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=1,
            callback=finite,
            help="--planned: how long to wait for the sender to connect and to hand over.",
        ),
    ] = 60.0,
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
        if planned and force:
            raise ConfigError("--planned and --force exclude each other", hint="pick one")
        if allow_inconsistent and not force:
            raise ConfigError(
                "--allow-inconsistent goes with --force only",
                hint="a planned failover promotes the source's own final point",
            )
        if not force and not planned:
            raise ConfigError(
                "say which failover: --planned (the source is up: it ships everything, "
                "zero loss) or --force (the source is gone: promote what was received)",
            )
        config = _config(directory, state_dir)
    except ReplicatorError as exc:
        fail(exc)

    async def main(stop: asyncio.Event) -> dict[str, object]:
        from replicator.engine import control

        socket_path = config.state_root / control.SOCKET_NAME
        extra: dict[str, object] = {"planned": True, "wait": timeout} if planned else {}
        if allow_inconsistent:
            extra["allow_inconsistent"] = True
        try:  # a running receiver promotes (it holds the folder)
            answer = await control.request_async(
                socket_path, "failover", timeout=FAILOVER_TIMEOUT + timeout,
                job=job, exec=exec_cmd, **extra,
            )  # fmt: skip
        except control.ControlUnavailable as exc:
            if planned:
                raise ConnectError(
                    f"no receiver answers on {socket_path}: a planned failover goes through "
                    "the running receiver, with the source's sender connected; nothing was "
                    "promoted",
                    hint="start `replicator receive` here (and `send` on the source), or, if "
                    "the source is gone, use `replicator failover --force`",
                ) from exc
            result = await failover_at_rest(
                config,
                job,
                exec_cmd=exec_cmd,
                started=started,
                allow_inconsistent=allow_inconsistent,
            )
            return result.as_dict()
        answer = _done(answer)  # or a failover that did not happen, and why
        answer["rto_seconds"] = round(time.monotonic() - started, 3)  # as this command saw it
        answer["through"] = "the running receiver"
        answer["planned"] = planned
        return answer

    result = run(main, graceful=False)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    missing = result.get("missing_seconds")
    held = (
        f"hold the consistency point at lsn {result['point_lsn']} "
        f"(source time {result['point_time'] or 'unknown'}"
        + ("" if missing is None else f"; at most {missing} s of source writes missing")
        + ")"
        if result.get("consistent", True)
        else "are NOT at a consistency point: taken as they were (--allow-inconsistent); "
        "check their file systems before trusting them"
    )
    typer.echo(
        f"job {result['job']} promoted (generation {result['generation']}): replicas in "
        f"{printable(str(result['replica_dir']))} {held}; RTO {result['rto_seconds']} s"
        + (" (it was already promoted)" if result["already_promoted"] else "")
    )
    for path in result["rewritten"]:  # type: ignore[attr-defined]
        typer.echo(f"  pointed {printable(str(path))} at the replicas")
    for step in result["next_steps"]:  # type: ignore[attr-defined]
        typer.echo(f"  next: {step}")
    for problem in result.get("warnings", ()):  # type: ignore[attr-defined]
        typer.echo(f"  warning: {printable(str(problem))}")


def _done(answer: object) -> dict[str, object]:
    """The running receiver's answer to a request; its refusal (``{"error", "exit_code"}``:
    nothing was done, and why) raised."""
    assert isinstance(answer, dict)
    if "error" in answer:
        code = answer.get("exit_code")
        error = ReplicatorError(str(answer["error"]))
        error.exit_code = ExitCode(code) if code in set(ExitCode) else ExitCode.CONNECT
        raise error
    return answer


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
    overwrites what differs). Through the running receiver, or on the folder at rest."""
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
        from replicator.engine import control

        socket_path = config.state_root / control.SOCKET_NAME
        try:  # a running receiver demotes (it holds the folder)
            answer = await control.request_async(socket_path, "demote", job=job)
        except control.ControlUnavailable:
            return await demote_at_rest(config, job)
        generation = _done(answer)["generation"]
        assert isinstance(generation, int)
        return generation

    generation = run(main, graceful=False)
    typer.echo(
        f"job {job} is a replica again (generation {generation}); on the source run "
        "`replicator send --resync ...` to overwrite what differs"
    )
