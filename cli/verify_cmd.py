"""``replicator verify``: compare sources with their replicas, optionally repair."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from replicator.cli.common import (
    InsecureOption,
    TlsDirOption,
    TlsNameOption,
    TlsPeerOption,
    connector_for,
    fail,
    run,
    transport_security,
)
from replicator.cli.progress import progress_report
from replicator.cli.send import (
    JobOption,
    StateDirOption,
    ToOption,
    VolumesArgument,
    build_config,
)
from replicator.cli.shaping_opts import BurstOption, RateOption, make_shaping
from replicator.engine.control import ControlBusy
from replicator.engine.errors import ConfigError, ExitCode, ReplicatorError
from replicator.engine.imagelock import ImageTaken
from replicator.engine.sender import Sender, SenderConfig
from replicator.engine.tree import Tree
from replicator.engine.verify import VerifyResult, verify


@contextlib.contextmanager
def _state_for_verify(config: SenderConfig) -> Iterator[SenderConfig]:
    """The job's state folder, or a scratch one when it has none: verify only reads, so
    it leaves no state folder behind for a job that was never sent from here."""
    if config.state_dir.exists():
        yield config
        return
    with tempfile.TemporaryDirectory(prefix="replicator-verify-") as scratch:
        yield dataclasses.replace(config, state_dir=Path(scratch) / config.job)


def verify_command(
    to: ToOption,
    job: JobOption,
    volumes: VolumesArgument,
    state_dir: StateDirOption = None,
    insecure: InsecureOption = False,
    tls_dir: TlsDirOption = None,
    tls_name: TlsNameOption = None,
    tls_peer: TlsPeerOption = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Send the differing extents, then verify again.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    rate: RateOption = None,
    burst: BurstOption = None,
) -> None:
    """Read both sides afresh and compare blake3 extent manifests (exit 0 identical, 1 not).
    A FUSE job's folder, given as the one VOLUME, is compared whole: its files, and the
    replica folder's layout."""
    folder: Tree | None = None
    try:
        if len(volumes) == 1 and volumes[0].is_dir():  # a FUSE-captured job's folder
            from replicator.engine.fuse_folder import folder_job

            config, folder = folder_job(build_config(to, job, state_dir, None), volumes[0])
        else:
            config = build_config(to, job, state_dir, volumes)
        tls = transport_security(
            tls_dir=tls_dir,
            tls_name=tls_name,
            insecure=insecure,
            side="sender",
            host=config.host,
            tls_peer=tls_peer,
        )
        shaping = make_shaping(rate, burst, None)
    except ReplicatorError as exc:
        fail(exc)
    progress = progress_report("verify")

    async def main(stop: asyncio.Event) -> VerifyResult:
        try:
            return await verify(sender, repair=repair, progress=progress, folder=folder)
        except ConfigError as exc:
            taken = isinstance(exc, ControlBusy | ImageTaken)  # its state folder, or another's
            if not taken and "already runs" not in exc.message:
                raise
            raise ConfigError(
                exc.message,
                hint="verify needs the job to itself on both sides: stop that sender (SIGTERM "
                "finishes its work), run verify, then start the sender again",
            ) from exc

    with _state_for_verify(config) as config:
        sender = Sender(config, connector_for(config, tls, shaping.bucket))
        result = run(main, graceful=False)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "identical": result.identical,
                    "repaired_bytes": result.repaired,
                    "layout": result.layout,
                    "unapplied": None
                    if result.unapplied is None
                    else {"first_lsn": result.unapplied[0], "last_lsn": result.unapplied[1]},
                    "volumes": [
                        {
                            "volume": v.volume,
                            "source_size": v.source_size,
                            "replica_size": v.replica_size,
                            "differing_bytes": v.differing_bytes,
                            "extents": v.extents,
                        }
                        for v in result.volumes
                    ],
                }
            )
        )
    else:
        for difference in result.layout:
            typer.echo(difference)
        for v in result.volumes:
            if v.identical:
                typer.echo(f"{v.volume}: identical ({v.source_size} bytes)")
                continue
            if v.replica_size is None:
                typer.echo(f"{v.volume}: replica missing")
                continue
            size_note = (
                ""
                if v.replica_size == v.source_size
                else f", size {v.replica_size} != source {v.source_size}"
            )
            ranges = len(v.extents)
            typer.echo(
                f"{v.volume}: {ranges} differing ranges, {v.differing_bytes} bytes{size_note}"
            )
            for off, length in v.extents[:20]:
                typer.echo(f"  offset {off} length {length}")
            if len(v.extents) > 20:
                typer.echo(f"  ... {len(v.extents) - 20} more ranges")
        if result.repaired:
            typer.echo(f"repaired: sent {result.repaired} bytes")
        if result.unapplied is not None:
            first, last = result.unapplied
            typer.echo(
                f"note: the receiver holds lsn {first}-{last} past the last barrier it applied "
                f"(lsn {first - 1}): they wait for the next one a send ships, and were compared "
                "as they will leave the replica, which verify left as it was"
            )
    if not result.identical:
        if not as_json:
            typer.echo(
                "next: a change made on the source since the last send shows here until a "
                "send ships it (a running sender's next cycle, or `replicator send --once`); "
                "a replica written on the target, outside replication, makes a plain send "
                "refuse the job (diverged) until `replicator send --resync`; "
                "`replicator verify --repair` sends the differing extents now, either way"
            )
            if any(v.replica_size is None for v in result.volumes):
                # deleted on the target, a plain send refuses the job: saying only "a send
                # ships it" sent the admin to a refusal
                typer.echo(
                    "next: a replica missing on the target was deleted there (a plain send is "
                    "refused until `replicator send --resync`) or not sent yet; "
                    "`replicator verify --repair` makes it either way"
                )
        raise typer.Exit(int(ExitCode.DIFFERENT))
