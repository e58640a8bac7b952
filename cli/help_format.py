"""``-h`` that reads well at 80 columns: plain click help, with value names, not types.

Typer labels every value with its Python type (``<str>``, ``<path>``, ``<float range>``,
``<list[Path]>``); an admin wants to know *what* to give (HOST:PORT, SECONDS, SIZE). Every
command of the program is looked up through ``HelpGroup.get_command``, which gives each
option without an explicit ``metavar`` one from ``METAVARS`` (by option name) or from its
type, before click renders the help or parses the line (metavars do not change parsing).
"""

from __future__ import annotations

import typer.core
from typer import _click as click  # typer carries its own click
from typer._click import types as click_types
from typer._types import TyperChoice
from typer.models import TyperPath

# by option name: what the value is, in the words docs/OPERATIONS.md uses
METAVARS = {
    "--to": "HOST:PORT",
    "--from": "HOST:PORT",
    "--witness": "ADDRESS",
    "--listen": "HOST:PORT",
    "--metrics-listen": "HOST:PORT",
    "--nbd-listen": "HOST:PORT",
    "--job": "NAME",
    "--tls-name": "NAME",
    "--tls-peer": "NAME",
    "--witness-peer": "NAME",
    "--name": "NAME",
    "--dir": "DIR",
    "--tls-dir": "DIR",
    "--out": "PATH",
    "--state-dir": "PATH",
    "--mount": "MOUNTPOINT",
    "--nbd-socket": "PATH",
    "--nbd-size": "BYTES",
    "--journal-max": "SIZE",
    "--in-flight-max": "SIZE",
    "--interval": "SECONDS",
    "--timeout": "SECONDS",
    "--target-rpo": "SECONDS",
    "--witness-interval": "SECONDS",
    "--fence-after": "SECONDS",
    "--auto-failover-after": "SECONDS",
    "--fence-exec": "CMD",
    "--pre-hook": "CMD",
    "--post-hook": "CMD",
    "--exec": "CMD",
    "--rate": "RATE",
    "--burst": "SIZE",
    "--schedule": "SPEC",
    "--allow": "NAME:JOB",
    "--days": "N",
    "--log-format": "auto|json|console",
}
# by click type, for the rest (ranges are subclasses of their number types)
_BY_TYPE: tuple[tuple[type[click_types.ParamType], str], ...] = (
    (TyperPath, "PATH"),
    (click_types.IntParamType, "N"),
    (click_types.FloatParamType, "NUMBER"),
    (click_types.StringParamType, "TEXT"),
)


def _metavar(param: typer.core.TyperOption | typer.core.TyperArgument) -> str | None:
    for name in param.opts:
        if name in METAVARS:
            return METAVARS[name]
    if isinstance(param, typer.core.TyperArgument):
        # typer prints an explicit metavar as given: the "..." that says "one or more" too
        name = (param.name or "value").upper().removesuffix("S")
        return f"{name}..." if param.nargs != 1 else name
    if isinstance(param.type, TyperChoice):
        return None  # typer shows the choices
    return next((name for kind, name in _BY_TYPE if isinstance(param.type, kind)), "VALUE")


def name_values(command: click.Command) -> None:
    """Give ``command``'s values readable metavars (flags take none), and its
    subcommands' (``journal inspect``)."""
    if isinstance(command, typer.core.TyperGroup):
        for sub in command.commands.values():
            name_values(sub)
    for param in command.params:
        if isinstance(param, typer.core.TyperOption) and (param.is_flag or param.count):
            continue
        if (
            isinstance(param, typer.core.TyperOption | typer.core.TyperArgument)
            and param.metavar is None
        ):
            param.metavar = _metavar(param)
        if isinstance(param, typer.core.TyperArgument):
            # the name says it all; "<list[Path]>" after it is Python, not help
            setattr(param, "display_type_rich", _no_type)  # noqa: B010 (a method, per object)


def _no_type(ctx: click.Context) -> str:
    return ""


class HelpGroup(typer.core.TyperGroup):
    """The program's command group: its commands' values get names (see the module doc)."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        name_values(self)  # the root options (--log-format)
        super().format_help(ctx, formatter)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            name_values(command)
        return command
