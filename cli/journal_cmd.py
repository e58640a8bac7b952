"""``replicator journal ...``: look inside a journal directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from replicator.engine.errors import ExitCode
from replicator.journal.inspect import JournalReport, format_report, scan_journal

app = typer.Typer(
    help="Inspect write-order journals.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
)


@app.callback()
def journal() -> None:
    """Inspect write-order journals."""


@app.command("inspect")
def inspect(
    directory: Annotated[
        Path, typer.Argument(help="Journal directory (holds the *.seg segment files).")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Verify every record and show segments, LSN ranges, counts and the first problem.

    Read-only: a torn tail is reported, not cut. Exit status 0 when clean, 8 when a
    problem was found.
    """
    if not directory.is_dir():
        typer.echo(f"error: journal directory {directory} does not exist", err=True)
        raise typer.Exit(ExitCode.CONFIG)
    try:
        report = scan_journal(directory, verify_sealed=True)
    except OSError as exc:
        typer.echo(f"error: cannot read journal {directory}: {exc}", err=True)
        raise typer.Exit(ExitCode.STORAGE) from exc
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    elif sys.stdout.isatty():
        _print_rich(report)
    else:
        typer.echo(format_report(report))
    raise typer.Exit(ExitCode.OK if report.clean else ExitCode.JOURNAL)


def _print_rich(report: JournalReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"journal {report.path}")
    for column in ("file", "first lsn", "last lsn", "records", "bytes", "state"):
        table.add_column(column, justify="left" if column in ("file", "state") else "right")
    for s in report.segments:
        table.add_row(
            s.name,
            str(s.first_lsn) if s.count else "-",
            str(s.last_lsn) if s.count else "-",
            str(s.count),
            str(s.size),
            "sealed" if s.sealed else "active",
        )
    console = Console()
    console.print(table)
    # the summary lines are the plain-text report's, after its table
    summary = format_report(report).splitlines()[len(report.segments) + 2 :]
    for line in summary:
        style = "bold red" if line.startswith("problem:") and not report.clean else None
        console.print(line, style=style, highlight=False, markup=False)
