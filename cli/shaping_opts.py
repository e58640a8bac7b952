"""``--rate``, ``--burst``, ``--schedule`` and ``--target-rpo``: the options, and the one
``Shaping`` a sending command builds from them (its token bucket goes to the connector, so
it outlives reconnects; its schedule and pacer run as a task beside the command)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

import typer

from replicator.engine.errors import ConfigError
from replicator.transport.schedule import SpecError
from replicator.transport.shaper import Shaping

RateOption = Annotated[
    str | None,
    typer.Option(
        "--rate",
        help="Cap on the wire: 50M or 50Mbit (bits/s), 12MB/s or 12MiB/s (bytes/s), unlimited.",
    ),
]
BurstOption = Annotated[
    str | None,
    typer.Option("--burst", help="Token-bucket size, e.g. 256K (default: 50 ms at the rate)."),
]
ScheduleOption = Annotated[
    str | None,
    typer.Option(
        "--schedule",
        help="Rates by day and time, e.g. 'mon-fri 08:00-18:00 20Mbit; sat,sun 50Mbit; "
        "* unlimited' (local time; first match wins; no match: --rate).",
    ),
]


TargetRpoOption = Annotated[
    str | None,
    typer.Option(
        "--target-rpo",
        help="Use the least bandwidth that keeps the lag under this many seconds (30, 5m), "
        "within --rate and --schedule; warns in the log, status and metrics when it cannot.",
    ),
]


def make_shaping(
    rate: str | None, burst: str | None, schedule: str | None, target_rpo: str | None = None
) -> Shaping:
    """The command's shaping; a bad option is a ConfigError (exit 3) quoting the bad part."""
    try:
        return Shaping.from_options(rate, burst, schedule, target_rpo)
    except SpecError as exc:
        raise ConfigError(str(exc), hint="see docs/OPERATIONS.md, 'Bandwidth'") from None


@contextlib.asynccontextmanager
async def following(shaping: Shaping) -> AsyncIterator[Shaping]:
    """Run the schedule and the target-RPO pacer (if any) while the body runs."""
    task = asyncio.create_task(shaping.run(), name="schedule")
    try:
        yield shaping
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
