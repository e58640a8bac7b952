"""``replicator discover``: the VMs under some paths, their disks and files, as a job file.

The finding is engine/discover.py's; this module prints it (a table, or JSON with
``--json``), prints the warnings to stderr and writes the job file (``--out``).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from replicator.cli.common import fail, table_console
from replicator.engine.errors import ConfigError, ReplicatorError, StorageError
from replicator.engine.units import human_size
from replicator.journal.durable import atomic_write

if TYPE_CHECKING:
    from replicator.engine.discover import VM, Discovery


def _engine() -> ModuleType:
    """engine.discover, imported when the command runs (start-up time of every command)."""
    from replicator.engine import discover

    return discover


def discover_command(
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="PATH...",
            help="Folders to search (libvirt domain XMLs, Hyper-V VM folders, disk images) "
            "or single files.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write a job file (TOML, one job per VM) here."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the --out file if it exists.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Find the VMs under PATHs: their disks (format and virtual size from the image
    headers) and configuration files; optionally write them as a job file."""
    try:
        if out is not None:
            _check_out(out, force)
        found = _engine().discover(paths)
    except ReplicatorError as exc:
        fail(exc)
    for warning in found.warnings:
        typer.echo(f"replicator: warning: {_engine().printable(warning)}", err=True)
    written = None
    if found.vms and out is not None:
        try:
            written = _write(out, found)
        except ReplicatorError as exc:
            fail(exc)
    if as_json:
        answer = found.to_json()
        answer["job_file"] = written
        typer.echo(json.dumps(answer, indent=2))
    elif found.vms:
        console = _console()
        console.print(render_table(found))
        if written is not None:
            console.print(Text(f"wrote {len(found.vms)} job(s) to {_engine().printable(written)}"))
        else:
            console.print(Text("write them as a job file with --out FILE"))
    if not found.vms:
        fail(
            ConfigError(
                "no VM or disk image found under "
                + ", ".join(map(_engine().printable, found.paths)),
                hint="libvirt domain XMLs, Hyper-V VM folders and disk images are looked for",
            )
        )


def _check_out(out: Path, force: bool) -> None:
    """Fail before the search when the job file cannot be written."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder", hint="name the job file to write")
    if (out.exists() or out.is_symlink()) and not force:
        raise ConfigError(f"--out {out} exists", hint="pass --force to replace it")
    if not out.absolute().parent.is_dir():
        raise ConfigError(f"the folder of --out {out} does not exist")


def _write(out: Path, found: Discovery) -> str:
    target = out.absolute()
    header = [
        f"Written by `replicator discover` on {socket.gethostname()}, "
        + time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "from " + ", ".join(found.paths),
        "",
    ]
    text = _engine().render_job_file(found, header=header)
    try:
        atomic_write(target, text.encode(), mode=0o644)
    except OSError as exc:
        raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return os.fspath(target)


def _console() -> Console:
    """The terminal's width on a terminal; no wrapping otherwise (paths stay whole)."""
    return table_console(1000)


def render_table(found: Discovery) -> Table:
    table = Table(title="VMs found", title_justify="left", show_lines=False)
    table.add_column("VM (job)", overflow="fold")
    table.add_column("what")
    table.add_column("path", overflow="fold")  # paths are never cut short: folded
    table.add_column("format")
    table.add_column("virtual", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("notes", overflow="fold")
    for vm in found.vms:
        _vm_rows(table, vm)
    total = sum(vm.total_bytes for vm in found.vms)
    table.caption = f"{len(found.vms)} VM(s), {human_size(total)} to replicate"
    return table


def _vm_rows(table: Table, vm: VM) -> None:
    label = vm.name if vm.job == vm.name else f"{vm.name} ({vm.job})"
    rows: list[list[Text]] = []
    for disk in vm.disks:
        notes = [_problem(disk.problem, disk.named_by)] if disk.problem else []
        if disk.resolved:
            notes.append(f"-> {disk.resolved}")
        notes += disk.notes
        what = disk.role + (f" {disk.target}" if disk.target else "")
        if not disk.included and disk.role != "cdrom":
            what += " (left out)"
        rows.append(
            [
                Text(what),
                Text(_engine().printable(disk.path)),
                Text(_engine().describe_format(disk)),
                Text(human_size(disk.virtual_size)),
                Text(human_size(disk.file_size)),
                Text(_engine().printable("; ".join(notes))),
            ]
        )
    for config in vm.files:
        notes = [_problem(config.problem, config.named_by)] if config.problem else []
        if config.resolved:
            notes.append(f"-> {config.resolved}")
        rows.append(
            [
                Text(config.role + ("" if config.included else " (left out)")),
                Text(_engine().printable(config.path)),
                Text("config"),
                Text("-"),
                Text(human_size(config.size)),
                Text(_engine().printable("; ".join(notes))),
            ]
        )
    rows.append(
        [
            Text("total"),
            Text(f"{len(vm.volumes)} disk(s), {len(vm.config_files)} file(s)"),
            Text(""),
            Text(human_size(sum(d.virtual_size or 0 for d in vm.disks if d.included))),
            Text(human_size(vm.total_bytes)),
            Text(f"{len(vm.warnings)} warning(s)" if vm.warnings else ""),
        ]
    )
    left = [_engine().printable(label), vm.kind.value]  # the VM column: its name, then its kind
    for i, row in enumerate(rows):
        cell = Text(left[i] if i < len(left) else "")
        table.add_row(cell, *row, end_section=i == len(rows) - 1)


def _problem(problem: str, named_by: str | None) -> str:
    if problem != "missing":
        return problem
    return "MISSING" + (f" (named by {named_by})" if named_by else "")
