"""``send --job-file`` and ``receive --config``: the file's values become the command's
defaults (click's ``default_map``), so the command line overrides the file, and every
option is checked exactly as it is when typed.

The file is read before click processes the parameters (``parse_args``, after a first,
side-effect-free pass of click's own parser to see what the command line gives), because
the file decides whether required options such as ``--to`` are present. A send job file
with several jobs and no ``--job`` runs each job in a child process of its own
(``jobfile_fanout``).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer._click import Context  # what click's Command.parse_args is typed with
from typer.core import TyperCommand

from replicator.cli.common import fail
from replicator.engine.errors import ConfigError, ReplicatorError

if TYPE_CHECKING:
    from replicator.cli.jobfile import ConfigFile

# The file's reader and checks (replicator.cli.jobfile, jobfile_checks, jobfile_fanout) are
# imported when a file is given: every send and receive imports this module for its option,
# and they took ~6 ms of each start (bench/RESULTS.md, "2026-12-04, last session").

JobFileOption = Annotated[
    Path | None,
    typer.Option(
        "--job-file",
        help="TOML job file (docs/JOBFILES.md): options per job (jobs.NAME tables); the "
        "command line overrides it. With several jobs and no --job, every job runs.",
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML file of receive options (docs/JOBFILES.md); the command line overrides it.",
    ),
]
# options that name one job's own things: given on the command line, they cannot apply to
# several jobs at once (two senders would fight over them)
PER_JOB = ("volumes", "state_dir", "mount", "nbd_socket", "nbd_listen", "metrics_listen")
_HELP = ("-h", "--help")


def _given(opts: Mapping[str, Any]) -> set[str]:
    """The parameters the command line sets (click's parser leaves absent arguments None)."""
    return {name for name, value in opts.items() if value not in (None, (), [])}


class _FileCommand(TyperCommand, metaclass=abc.ABCMeta):
    """A command whose defaults come from a TOML file named by one of its options."""

    file_param = ""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if not any(arg in _HELP for arg in args):  # -h shows help, whatever the file holds
            opts, _, _ = self.make_parser(ctx).parse_args(args=list(args))
            path = opts.get(self.file_param)
            if path is not None:
                try:
                    ctx.default_map = self.defaults(ctx, Path(path), opts, args)
                except ReplicatorError as exc:
                    fail(exc)
        return super().parse_args(ctx, args)

    @abc.abstractmethod
    def defaults(
        self, ctx: Context, path: Path, opts: Mapping[str, Any], args: list[str]
    ) -> dict[str, Any]:
        """The command's defaults from the file at ``path`` (``opts``: the command line)."""


class SendCommand(_FileCommand):
    """``replicator send``: ``--job-file F [--job NAME]``."""

    file_param = "job_file"

    def defaults(
        self, ctx: Context, path: Path, opts: Mapping[str, Any], args: list[str]
    ) -> dict[str, Any]:
        from replicator.cli.jobfile import load_send
        from replicator.cli.jobfile_checks import check_capture, check_together, check_values

        given = _given(opts)
        command_line = {name: opts[name] for name in given}
        jobs = load_send(path, self, given)
        name = opts.get("job")
        if name is None and len(jobs.sections) > 1:
            raise typer.Exit(self._several(jobs, command_line, args))
        if name is None:
            name = next(iter(jobs.sections))
        section = jobs.sections.get(name)
        if section is None:
            raise ConfigError(
                f"{path} has no job {name!r}",
                hint="its jobs: " + ", ".join(jobs.sections) + "; or leave out --job to run all",
            )
        check_values(jobs, section, given)
        check_capture(jobs, section, command_line)
        check_together(jobs, section, command_line)
        return {**section.values, "job": name}

    @staticmethod
    def _several(jobs: ConfigFile, command_line: dict[str, Any], args: list[str]) -> int:
        from replicator.cli.jobfile_checks import (
            check_capture,
            check_jobs_apart,
            check_together,
            check_values,
        )
        from replicator.cli.jobfile_fanout import run_jobs

        given = set(command_line)
        clash = [name for name in PER_JOB if name in given]
        if clash:
            which = ", ".join(
                "VOLUMEs" if n == "volumes" else "--" + n.replace("_", "-") for n in clash
            )
            raise ConfigError(
                f"{which} on the command line would apply to all {len(jobs.sections)} jobs "
                f"of {jobs.path}",
                hint="pick one job with --job NAME, or set it per job in the file",
            )
        for section in jobs.sections.values():  # all of them, before any job starts
            check_values(jobs, section, given)
            check_capture(jobs, section, command_line)
            check_together(jobs, section, command_line)
        check_jobs_apart(jobs, command_line)
        return run_jobs(jobs.path, list(jobs.sections), args)


class ReceiveCommand(_FileCommand):
    """``replicator receive``: ``--config F``."""

    file_param = "config_file"

    def defaults(
        self, ctx: Context, path: Path, opts: Mapping[str, Any], args: list[str]
    ) -> dict[str, Any]:
        from replicator.cli.jobfile import load_receive
        from replicator.cli.jobfile_checks import check_together, check_values

        given = _given(opts)
        config = load_receive(path, self, given)
        check_values(config, config.sections[""], given)
        check_together(config, config.sections[""], {name: opts[name] for name in given})
        return config.sections[""].values
