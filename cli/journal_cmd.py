"""``replicator journal ...``: look inside a journal directory."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Inspect write-order journals.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
)
