"""``replicator journal ...``: look inside a journal directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from replicator.cli.common import fail, table_console
from replicator.engine.errors import ConfigError, ExitCode, ReplicatorError, StorageError
from replicator.engine.names import printable
from replicator.journal.inspect import JournalReport, format_report, scan_journal

app = typer.Typer(
    help="Inspect write-order journals.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    # plain click help and no completion options, as every other command (cli/main.py)
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


@app.callback()
def journal() -> None:
    """Inspect write-order journals."""


@app.command("inspect")
def inspect(
    directory: Annotated[
        Path,
        typer.Argument(
            help="Journal directory (holds the *.seg segment files), or a sender's state "
            "folder or a receiver's folder with one job: the journal it holds."
        ),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Verify every record and show segments, LSN ranges, counts and the first problem.

    Read-only: a torn tail is reported, not cut. Exit status 0 when clean, 8 when a
    problem was found.
    """
    try:
        report = _report(directory)
    except ReplicatorError as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    elif sys.stdout.isatty():
        _print_rich(report)
    else:
        typer.echo(_plain(report))
    raise typer.Exit(ExitCode.OK if report.clean else ExitCode.JOURNAL)


_WHICH = (
    "name a journal directory (the one holding *.seg files), a sender's --state-dir, or a "
    "receiver's --dir or --state-dir holding one job"
)


def _report(directory: Path) -> JournalReport:
    """The report of the journal ``directory`` is or holds; ConfigError when it is neither."""
    if not directory.exists():
        raise ConfigError(f"{directory} does not exist", hint=_WHICH)
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a folder", hint=_WHICH)
    report = _scan(directory)
    if report.segments or report.spares:
        return report
    held = journals_held(directory)
    if len(held) > 1:
        listed = ", ".join(str(path) for path in held)
        raise ConfigError(
            f"{directory} holds {len(held)} journals", hint=f"inspect one of them: {listed}"
        )
    if held:
        typer.echo(f"{directory} is not a journal; inspecting the one it holds", err=True)
        return _scan(held[0])
    if directory.name != "journal":  # where the product keeps one, an empty folder is damage
        raise ConfigError(f"{directory} holds no journal (no *.seg segment files)", hint=_WHICH)
    return report


def _scan(directory: Path) -> JournalReport:
    try:
        return scan_journal(directory, verify_sealed=True)
    except OSError as exc:
        raise StorageError(
            f"cannot read journal {directory}: {exc.strerror or exc}",
            hint="check the folder's permissions and the disk",
        ) from exc


def journals_held(folder: Path) -> list[Path]:
    """The journals inside ``folder``, which is not a journal itself: a sender's state
    folder (``STATE/journal``), a receiver's ``--dir`` (``DIR/.replicator/JOB/journal``) or
    its ``--state-dir`` (``STATE/JOB/journal``). An operator knows these folders; the
    journal's own is one level further down."""
    found = [folder / "journal"]
    found += sorted(folder.glob(".replicator/*/journal")) + sorted(folder.glob("*/journal"))
    return [path for path in found if path.is_dir()]


def _plain(report: JournalReport) -> str:
    """``format_report`` with the folder's name escaped (``printable``): a newline or an
    escape sequence in it would split the heading or reach the terminal."""
    head = f"journal {report.path}"
    text = format_report(report)
    assert text.startswith(head)
    return f"journal {printable(report.path)}{text[len(head) :]}"


def _print_rich(report: JournalReport) -> None:
    from rich.table import Table

    table = Table(title=f"journal {printable(report.path)}")
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
    console = table_console()
    console.print(table)
    # the summary lines are the plain-text report's, after its table
    summary = format_report(report).splitlines()[len(report.segments) + 2 :]
    for line in summary:
        style = "bold red" if line.startswith("problem:") and not report.clean else None
        console.print(line, style=style, highlight=False, markup=False)
