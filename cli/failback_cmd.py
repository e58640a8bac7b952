"""``replicator failback``: on the old source, take a job back from its promoted target
without a full copy (engine/failback.py), then `send` resumes in the original direction."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

from replicator.cli.common import (
    InsecureOption,
    TlsDirOption,
    TlsNameOption,
    TlsPeerOption,
    connector_for,
    fail,
    parse_endpoint,
    run,
    transport_security,
)
from replicator.cli.send import JobOption, StateDirOption, VolumesArgument, build_config
from replicator.engine.control import ControlBusy
from replicator.engine.errors import ConfigError, ReplicatorError
from replicator.engine.imagelock import ImageTaken

FromOption = Annotated[
    str,
    typer.Option("--from", help="The target's receiver, HOST:PORT (where the job was promoted)."),
]


def failback_command(
    source: FromOption,
    job: JobOption,
    volumes: VolumesArgument,
    state_dir: StateDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    insecure: InsecureOption = False,
    tls_dir: TlsDirOption = None,
    tls_name: TlsNameOption = None,
    tls_peer: TlsPeerOption = None,
) -> None:
    """Bring VOLUMES (the ones this source sends, its VM stopped) to the promoted replica's
    state, moving only the extents that differ, and hand the job back: the target becomes
    a replica again and `replicator send` resumes without a full resync. Stop the VM on
    the target first. Safe to run again after an interruption."""
    from replicator.engine.failback import failback

    try:
        tls = transport_security(
            tls_dir=tls_dir,
            tls_name=tls_name,
            tls_peer=tls_peer,
            insecure=insecure,
            side="sender",
            host=parse_endpoint(source, "--from")[0],
        )
        config = build_config(source, job, state_dir, volumes)
    except ReplicatorError as exc:
        fail(exc)

    async def main(stop: asyncio.Event) -> dict[str, object]:
        try:
            result = await failback(config, connector_for(config, tls))
        except ConfigError as exc:  # a sender runs: its advice would not do here
            taken = isinstance(exc, ControlBusy | ImageTaken)  # its state folder, its images
            if not taken and "already runs" not in exc.message:
                raise
            raise ConfigError(
                exc.message,
                hint="failback needs the job to itself, with the --state-dir that sender "
                "uses (not one of its own): stop that sender (SIGTERM), run the failback, "
                "then start the sender again",
            ) from exc
        return result.as_dict()

    result = run(main, graceful=False)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    if result["already_done"]:
        typer.echo(f"job {job}: the failback had finished on the target; nothing was left to move")
    else:
        moved = int(result["bytes_moved"])  # type: ignore[call-overload]
        compared = int(result["bytes_compared"])  # type: ignore[call-overload]
        typer.echo(
            f"job {job} failed back: {moved} bytes moved ({result['extents_changed']} extents "
            f"differed, {compared} bytes compared) in {result['seconds']} s; the target is a "
            f"replica again (generation {result['generation']})"
        )
    differing = result["files_differing"]
    assert isinstance(differing, list)
    for name in differing:
        typer.echo(
            f"  note: {name} differs on the target (changed there, or pointed at the replicas "
            "by failover) and is not brought back: the next send replaces it with this "
            "host's copy; copy what you want to keep from the target's first"
        )
    typer.echo(f"  next: replicator send --to {source} --job {job} ... (as before)")
