"""The program's commands, each imported only when it runs (or when help lists them).

Building every typer command and importing what each one needs (the engine, TLS, the
benchmark, the FUSE and NBD capture) took most of a second before any command started,
``replicator --version`` and ``replicator status`` included. The root group knows the
commands by name here and loads one when click asks for it.
"""

from __future__ import annotations

import difflib
import importlib
import os
from typing import Any

import typer
import typer.main
from typer import _click as click  # typer carries its own click
from typer._click.exceptions import NoSuchOption, UsageError

from replicator.cli.help_format import HelpGroup

# name: (module of replicator.cli, its attribute, the command class as (module, name) or None);
# in the order `replicator -h` lists them
COMMANDS: dict[str, tuple[str, str, tuple[str, str] | None]] = {
    "send": ("send", "send", ("jobfile_command", "SendCommand")),
    "receive": ("receive", "receive", ("jobfile_command", "ReceiveCommand")),
    "verify": ("verify_cmd", "verify_command", None),
    "status": ("status_cmd", "status_command", None),
    "keygen": ("keygen_cmd", "keygen_command", None),
    "failover": ("failover_cmd", "failover_command", None),
    "demote": ("failover_cmd", "demote_command", None),
    "failback": ("failback_cmd", "failback_command", None),
    "witness": ("witness_cmd", "witness_command", None),
    "rate": ("rate_cmd", "rate_command", None),
    "discover": ("discover_cmd", "discover_command", None),
    "check-config": ("check_config_cmd", "check_config_command", None),
    "bench": ("bench_cmd", "bench_command", None),
    "journal": ("journal_cmd", "app", None),
}


def _module(name: str) -> Any:
    return importlib.import_module(f"replicator.cli.{name}")


def load(name: str) -> click.Command:
    """The click command ``replicator NAME`` runs, built now."""
    module, attribute, cls = COMMANDS[name]
    target = getattr(_module(module), attribute)
    if isinstance(target, typer.Typer):  # a group of its own (journal)
        command = typer.main.get_command(target)
    else:
        # built as a one-command program: typer then returns the command itself; plain
        # click help, as the root's (cli/help_format.py)
        one = typer.Typer(rich_markup_mode=None, add_completion=False)
        extra = {} if cls is None else {"cls": getattr(_module(cls[0]), cls[1])}
        one.command(name, **extra)(target)
        command = typer.main.get_command(one)
    command.name = name
    return command


class CommandGroup(HelpGroup):
    """The root group: commands loaded by name when click looks one up."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_empty(args)
        return super().parse_args(ctx, expand_home(args))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NoSuchOption as exc:
            raise _misplaced(self, ctx, exc) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *(name for name in self.commands if name not in COMMANDS)]

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        """typer's "Did you mean ...?" for a mistyped command looks among the commands
        loaded so far, none here (they load by name): `replicator recieve` got no hint,
        where `replicator journal inspec` did. Look among all of them."""
        try:
            return super().resolve_command(ctx, args)
        except UsageError as exc:
            if args and "Did you mean" not in exc.message:
                matches = difflib.get_close_matches(args[0], self.list_commands(ctx))
                if matches:
                    names = ", ".join(repr(m) for m in matches)
                    exc.message = f"{exc.message.rstrip('.')}. Did you mean {names}?"
            raise

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            self.add_command(load(cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)


def _misplaced(root: HelpGroup, ctx: click.Context, exc: NoSuchOption) -> NoSuchOption:
    """A command refused an option of the program itself (``replicator status -v``,
    ``replicator send ... --log-format json``): say where it goes instead of "No such
    option". Any other unknown option is passed on as click made it."""
    if exc.ctx is None or exc.ctx is ctx:
        return exc
    param = next((p for p in root.params if exc.option_name in (*p.opts, *p.secondary_opts)), None)
    if not isinstance(param, typer.core.TyperOption):
        return exc
    command = exc.ctx.command_path.removeprefix(f"{ctx.command_path} ")  # python -m too
    value = "" if param.is_flag or param.count else f" {param.make_metavar(ctx)}"
    example = f"replicator {exc.option_name}{value}"
    if not param.is_eager:  # --version runs alone
        example += f" {command} ..."
    return NoSuchOption(
        exc.option_name,
        f"{exc.option_name} is an option of replicator itself, not of {command}: "
        f"give it before the command ({example})",
        ctx=exc.ctx,
    )


def expand_home(args: list[str]) -> list[str]:
    """``--state-dir=~/x`` as ``--state-dir ~/x`` is: the shell expands a ``~`` only at
    the start of a word, not after ``--option=``, and the value reached us as ``~/x``, a
    folder named ``~`` in the current one (where a later ``rm -rf ~`` to tidy it up
    removes the home folder). Every ``--option=~...`` value is expanded as the shell
    would have (``os.path.expanduser``); a separate ``~`` argument the shell left alone
    was quoted, and stays as written."""
    expanded: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":
            return expanded + args[index:]
        option, sep, value = arg.partition("=")
        if option.startswith("--") and sep and value.startswith("~"):
            arg = f"{option}={os.path.expanduser(value)}"
        expanded.append(arg)
    return expanded


def refuse_empty(args: list[str]) -> None:
    """An empty value (``--dir ""``, ``--dir=``) is what an unset variable in a script or
    a unit file gives; as a path it would be ``.``, the current folder (``/`` for a
    service): a receiver's replicas and state would land there. No option takes one, so
    every empty argument is refused (exit 2), naming its option."""
    for index, arg in enumerate(args):
        if arg == "--":
            return
        if arg.startswith("--") and arg.endswith("=") and len(arg) > 3:
            option = arg[:-1]
        elif arg == "":
            before = args[index - 1] if index else ""
            option = before if before.startswith("-") and "=" not in before else ""
        else:
            continue
        what = f"{option} is given an empty value" if option else "an argument is empty"
        raise UsageError(
            f"{what} (an unset variable in a script or a unit file?): give it a value, or "
            "leave the option out"
        )
