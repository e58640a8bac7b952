"""``replicator rate``: change a running sender's bandwidth cap, without reconnecting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from replicator.cli.common import fail
from replicator.engine.errors import ConfigError, ReplicatorError


def rate_command(
    rate: Annotated[
        str, typer.Argument(metavar="RATE", help="50Mbit, 12MB/s, unlimited, or 0 (pause).")
    ],
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="The running sender's state folder.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the new shaping as JSON.")] = False,
) -> None:
    """Set the rate of a running `send` now. It holds until its --schedule's next change
    (for good without a schedule); a restarted sender starts from its options again."""
    from replicator.engine import control
    from replicator.transport.schedule import SpecError, parse_rate

    try:
        try:
            parse_rate(rate)  # a bad rate is the user's mistake: say so before asking
        except SpecError as exc:
            raise ConfigError(f"RATE: {exc}", hint="e.g. 50Mbit, 12MB/s, unlimited") from None
        path = state_dir / control.SOCKET_NAME
        try:
            result = control.request(path, "rate", rate=rate)
        except control.ControlUnavailable as exc:
            raise ConfigError(
                f"no sender answers in {state_dir}: {exc.message}",
                hint="start `replicator send` with this --state-dir first; a sender started "
                "later takes its rate from --rate/--schedule",
            ) from exc
    except ReplicatorError as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(f"rate now {result['rate']} ({result['source']})")
