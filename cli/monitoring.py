"""``--metrics-listen``, shared by ``send`` and ``receive`` (see engine/monitor.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from replicator.cli.common import UsageError, parse_endpoint
from replicator.engine.errors import ConfigError

MetricsListenOption = Annotated[
    str | None,
    typer.Option(
        "--metrics-listen",
        help="Serve Prometheus metrics on HOST:PORT (GET /metrics). Nothing listens without it.",
    ),
]


def metrics_endpoint(value: str | None) -> tuple[str, int] | None:
    """The metrics address, or None when not asked for; UsageError (exit 2) when malformed."""
    if value is None:
        return None
    try:
        return parse_endpoint(value, "--metrics-listen")
    except ConfigError as exc:
        raise UsageError(exc.message, hint="e.g. --metrics-listen 127.0.0.1:9308") from exc
