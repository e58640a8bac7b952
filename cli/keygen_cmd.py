"""``replicator keygen``: the CA and certificates for ``--tls-dir`` (see engine/keys.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from replicator.cli.common import fail
from replicator.engine.errors import ReplicatorError
from replicator.engine.tls import CA_CERT, CA_KEY, DEFAULT_DAYS, RECEIVER, SENDER, WITNESS


def keygen_command(
    out: Annotated[
        Path,
        typer.Option("--out", help="Folder for the keys (made with mode 0700; the CA lives here)."),
    ],
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Make one more certificate, NAME.crt and NAME.key (default: receiver and "
            "sender; `--name witness` for `replicator witness`). A host presents it with "
            "--tls-name NAME; --allow rules match NAME; a sender expects a receiver named "
            "NAME with --tls-peer NAME.",
        ),
    ] = None,
    days: Annotated[
        int,
        typer.Option(
            "--days",
            help="Days the certificates are valid (at most 36500: 100 years).",
            min=1,
            max=36500,  # an X.509 date ends at 9999; 3,000,000 ended in an OverflowError
        ),
    ] = DEFAULT_DAYS,
    force: Annotated[
        bool, typer.Option("--force", help="Replace existing certificates (never the CA).")
    ] = False,
) -> None:
    """Make a CA (once per folder) and certificates for mutual TLS (--tls-dir)."""
    from replicator.engine.keys import keygen  # cryptography: only this command needs it

    names = [name] if name is not None else [RECEIVER, SENDER]
    try:
        result = keygen(out, names, days=days, force=force)
    except ReplicatorError as exc:
        fail(exc)
    where = result.directory
    if result.ca_created:
        typer.echo(f"made a CA: {where / CA_CERT} (every host needs a copy)")
    typer.echo(
        f"the CA key {where / CA_KEY} signs new certificates (`--name NAME`): keep it here, "
        "off the replication hosts"
    )
    for made in result.written:
        use = {
            RECEIVER: "the receiving host (`replicator receive --tls-dir DIR`)",
            SENDER: "the sending host (`replicator send --tls-dir DIR`, `verify`)",
            WITNESS: "the witness's host (`replicator witness --tls-dir DIR`)",
        }.get(
            made,
            f"a host that runs with `--tls-dir DIR --tls-name {made}` (a receiver named so: "
            f"its senders give `--tls-peer {made}`)",
        )
        typer.echo(
            f"made {where / (made + '.crt')} and {made}.key (valid {days} days) for {use}: "
            f"copy both and {CA_CERT} into its DIR"
        )
