"""``replicator verify``: compare sources with their replicas, optionally repair."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

from replicator.cli.common import (
    InsecureOption,
    TlsDirOption,
    TlsNameOption,
    connector_for,
    fail,
    run,
    transport_security,
)
from replicator.cli.send import (
    JobOption,
    StateDirOption,
    ToOption,
    VolumesArgument,
    build_config,
)
from replicator.cli.shaping_opts import BurstOption, RateOption, make_shaping
from replicator.engine.errors import ExitCode, ReplicatorError
from replicator.engine.sender import Sender
from replicator.engine.verify import VerifyResult, verify


def verify_command(
    to: ToOption,
    job: JobOption,
    volumes: VolumesArgument,
    state_dir: StateDirOption = None,
    insecure: InsecureOption = False,
    tls_dir: TlsDirOption = None,
    tls_name: TlsNameOption = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Send the differing extents, then verify again.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    rate: RateOption = None,
    burst: BurstOption = None,
) -> None:
    """Read both sides afresh and compare blake3 extent manifests (exit 0 identical, 1 not)."""
    try:
        config = build_config(to, job, state_dir, volumes)
        tls = transport_security(
            tls_dir=tls_dir, tls_name=tls_name, insecure=insecure, side="sender", host=config.host
        )
        shaping = make_shaping(rate, burst, None)
    except ReplicatorError as exc:
        fail(exc)
    sender = Sender(config, connector_for(config, tls, shaping.bucket))

    async def main(stop: asyncio.Event) -> VerifyResult:
        return await verify(sender, repair=repair)

    result = run(main, graceful=False)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "identical": result.identical,
                    "repaired_bytes": result.repaired,
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
    if not result.identical:
        raise typer.Exit(int(ExitCode.DIFFERENT))
