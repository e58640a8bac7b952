"""``--rate``, ``--burst``, ``--schedule`` and ``--target-rpo``: the options, and the one
``Shaping`` a sending command builds from them (its token bucket goes to the connector, so
it outlives reconnects; its schedule and pacer run as a task beside the command)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

import structlog
import typer

from replicator.engine.errors import ConfigError
from replicator.transport.schedule import SpecError, format_rate, parse_size
from replicator.transport.shaper import Shaping

log = structlog.get_logger()

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


# a --burst worth more seconds than this at the slowest rate given is warned about
BURST_WARNING_SECONDS = 10.0


def make_shaping(
    rate: str | None, burst: str | None, schedule: str | None, target_rpo: str | None = None
) -> Shaping:
    """The command's shaping; a bad option is a ConfigError (exit 3) quoting the bad part."""
    try:
        shaping = Shaping.from_options(rate, burst, schedule, target_rpo)
    except SpecError as exc:
        raise ConfigError(str(exc), hint="see docs/OPERATIONS.md, 'Bandwidth'") from None
    if burst is not None:
        warning = burst_warning(shaping, burst, parse_size(burst))
        if warning is not None:
            log.warning("shaping.burst_large", burst=burst, why=warning)
            typer.echo(f"replicator: WARNING: {warning}", err=True)
    return shaping


def burst_warning(shaping: Shaping, burst: str, size: int) -> str | None:
    """Why ``--burst`` looks like a mistake: after a quiet spell the whole bucket goes at
    the link's full speed, and one worth many seconds at the rate (``--burst 1G`` with
    ``--rate 10Mbit``: 14 minutes' worth) floods the link the rate was meant to protect."""
    rates = [] if shaping.bucket.rate is None else [shaping.bucket.rate]
    if shaping.scheduler is not None:
        plan = shaping.scheduler.schedule
        rates += [rule.rate for rule in plan.rules if rule.rate is not None]
        rates += [] if plan.default is None else [plan.default]
    slowest = min((r for r in rates if r > 0), default=None)
    if slowest is None or size / slowest <= BURST_WARNING_SECONDS:
        return None
    return (
        f"--burst {burst} is {size / slowest:,.0f} s of sending at "
        f"{format_rate(slowest)}: after a quiet spell that much goes at the link's full "
        "speed, unshaped. Leave --burst out (50 ms at the rate) unless the link can take it"
    )


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
