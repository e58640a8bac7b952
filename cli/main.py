"""The ``replicator`` command: a root callback for global options; the commands, one module
each, are loaded by name when used (``cli/commands.py``)."""

from __future__ import annotations

import errno
from typing import Annotated

import typer

from replicator.cli.commands import CommandGroup
from replicator.cli.logging_setup import LogFormat, configure_logging

app = typer.Typer(
    name="replicator",
    help="Continuous, write-order replication of VM disks and configuration files.",
    # help wraps to the terminal, up to 120 columns (80 when not a terminal: $COLUMNS)
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # plain click help: every default shown in full and wrapped to the terminal (80
    # columns when not a terminal), no "<bool>" type column (rich tables cut text off)
    rich_markup_mode=None,
    cls=CommandGroup,  # each command imported when it runs (cli/commands.py)
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # 30 ms: only when asked

    try:
        return version("replicator")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def _print_version(value: bool) -> None:
    if value:
        from replicator.transport.version import PROTOCOL_VERSION  # no wire code loaded

        # the release's number does not change with every protocol: the protocol is what
        # must match between the hosts (exit 5 otherwise)
        typer.echo(f"replicator {_version()} (protocol {PROTOCOL_VERSION})")
        raise typer.Exit()


@app.callback()
def root(
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            help="Log rendering: console on a TTY, JSON otherwise (auto).",
            envvar="REPLICATOR_LOG_FORMAT",
            case_sensitive=False,
        ),
    ] = LogFormat.auto,
    verbose: Annotated[
        int,
        typer.Option("--verbose", "-v", count=True, help="More logs: debug events too."),
    ] = 0,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="Warnings and errors only; no progress bars or progress lines.",
            envvar="REPLICATOR_QUIET",
        ),
    ] = False,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Continuous, write-order replication of VM disks and configuration files."""
    configure_logging(log_format, verbose, quiet=quiet)


def main() -> None:
    """Console-script entry point.

    A command that runs on the event loop reports its own errors (``common.run``); what
    escapes a command that does not, such as its output failing to go out (stdout on a full
    disk), is reported the same way: one line and its exit code, not a traceback."""
    try:
        app()
    except Exception as exc:
        from replicator.cli.common import fail
        from replicator.engine.errors import StorageError, unwrap

        error = unwrap(exc)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno in _FULL_OR_FAILED:
            error = StorageError(  # a write to no named file: the command's own output
                f"could not write the command's output: {exc.strerror}",
                hint="free space where its standard output goes, or send it elsewhere",
            )
        try:
            fail(error)
        except typer.Exit as done:
            raise SystemExit(done.exit_code) from None


_FULL_OR_FAILED = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
