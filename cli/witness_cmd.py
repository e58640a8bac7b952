"""``replicator witness``: the tie-breaker for automatic failover (docs/WITNESS.md)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated

import structlog
import typer

from replicator.cli.common import (
    InsecureOption,
    fail,
    parse_endpoint,
    run,
    transport_security,
)
from replicator.engine.authz import parse_allow
from replicator.engine.errors import ConfigError, ReplicatorError, cannot_listen
from replicator.engine.statedir import StateDirLock
from replicator.engine.tls import WITNESS, TlsIdentity

log = structlog.get_logger()

DEFAULT_DIR = Path("/var/lib/replicator/witness")


def witness_command(
    listen: Annotated[str, typer.Option("--listen", help="Address to listen on, HOST:PORT.")],
    directory: Annotated[
        Path,
        typer.Option("--dir", help="Where the grants are kept (witness.state), durably."),
    ] = DEFAULT_DIR,
    insecure: InsecureOption = False,
    tls_dir: Annotated[
        Path | None,
        typer.Option(
            "--tls-dir",
            help="Mutual TLS 1.3 with the keys `replicator keygen --out DIR` made: DIR's "
            "ca.crt and the witness's certificate (witness.crt/.key, or --tls-name's).",
        ),
    ] = None,
    tls_name: Annotated[
        str | None,
        typer.Option(
            "--tls-name",
            help="Present NAME.crt and NAME.key from --tls-dir (default: witness; make them "
            "with `replicator keygen --out DIR --name witness`).",
        ),
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            help="NAME:JOB: only the certificate named NAME may renew or promote JOB ('*': "
            "every job); repeatable, one per side of each job. Default: any certificate "
            "signed by the --tls-dir CA, any job.",
        ),
    ] = None,
) -> None:
    """Decide, for automatic failover, which side of a job is primary; until SIGTERM."""
    from replicator.engine.witness_server import WitnessServer

    try:
        host, port = parse_endpoint(listen, "--listen")
        rules = [parse_allow(value) for value in allow or ()]
        if rules and tls_dir is None:
            raise ConfigError(
                "--allow needs --tls-dir: without TLS a peer has no certificate name",
                hint="make keys with `replicator keygen --out DIR --name witness`",
            )
        tls: TlsIdentity | None = transport_security(
            tls_dir=tls_dir, tls_name=tls_name or (WITNESS if tls_dir else None),
            insecure=insecure, side="receiver", host=host,
        )  # fmt: skip
    except ReplicatorError as exc:
        fail(exc)

    async def main(stop: asyncio.Event) -> None:
        with contextlib.ExitStack() as owned:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"cannot create --dir {directory}: {exc.strerror or exc}",
                    hint="give a folder this user may write",
                ) from exc
            owned.enter_context(StateDirLock(directory, "a witness"))
            witness = WitnessServer(directory, rules)
            try:
                server = await asyncio.start_server(
                    witness.handle, host, port, ssl=tls.context() if tls else None
                )
            except OSError as exc:
                raise cannot_listen(listen, exc, who="witness", option="--listen") from exc
            bound = [s.getsockname() for s in server.sockets]
            where = ", ".join(f"{a[0]}:{a[1]}" for a in bound)
            log.info(
                "witness.listening",
                addresses=where,
                state=str(witness.path),
                allow=[str(rule) for rule in rules] or "any certificate of the CA, any job",
            )
            typer.echo(f"witness listening on {where}", err=True)
            try:
                await stop.wait()
            finally:
                server.close()
                await server.wait_closed()

    run(main, graceful=True)
