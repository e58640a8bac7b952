"""The options the docs and the ``-h`` texts name exist: an admin who follows them never
meets "No such option" (``bench -h`` told how to record a workload with ``send --nbd``,
an option that never existed; the flag is ``--capture nbd``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from typer import _click as click
from typer.core import TyperGroup, TyperOption

from replicator.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w-])")

# other programs' options the docs quote (rsync, nbdcopy, nbdinfo, fio, bindfs, nbdkit, systemd,
# qemu-img, cp, the benchmark scripts in bench/), and the data-flow diagram's "--scan-->" arrow
FOREIGN = {
    "--inplace", "--no-whole-file", "--daemon", "--connections", "--ioengine",
    "--multithreaded", "--filter", "--full", "--now", "--punch-hole", "--strict",
    "--runtime", "--size-mib", "--repeat", "--scan", "--map",
    "--shrink", "--preallocation", "--reflink", "--sparse", "--remove-destination",
}  # fmt: skip


def _commands() -> dict[str, click.Command]:
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    ctx = click.Context(group, info_name="replicator")
    found: dict[str, click.Command] = {"": group}
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        found[name] = command
        if isinstance(command, TyperGroup):
            sub_ctx = click.Context(command, info_name=name, parent=ctx)
            for sub in command.list_commands(sub_ctx):
                sub_command = command.get_command(sub_ctx, sub)
                assert sub_command is not None, sub
                found[f"{name} {sub}"] = sub_command
    return found


def _options(command: click.Command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        if isinstance(param, TyperOption):
            names.update(n for n in (*param.opts, *param.secondary_opts) if n.startswith("--"))
    return names


COMMANDS = _commands()
EVERY_OPTION = set().union(*(_options(c) for c in COMMANDS.values())) | {"--help"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_names_only_options_that_exist(name: str) -> None:
    command = COMMANDS[name]
    ctx = click.Context(command, info_name=f"replicator {name}".strip())
    named = set(OPTION.findall(command.get_help(ctx))) - FOREIGN
    assert named <= EVERY_OPTION, sorted(named - EVERY_OPTION)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_only_options_that_exist(doc: Path) -> None:
    named = set(OPTION.findall(doc.read_text())) - FOREIGN
    assert named <= EVERY_OPTION, sorted(named - EVERY_OPTION)


def test_every_option_is_documented() -> None:
    """A new option gets a word in the docs (the check above cannot see one left out)."""
    text = "\n".join(doc.read_text() for doc in DOCS)
    named = set(OPTION.findall(text))
    missing = {o for o in EVERY_OPTION - named if not o.startswith("--no-")} - {"--help"}
    assert not missing, sorted(missing)


def test_witness_help_names_the_witness_certificate() -> None:
    """The witness presents witness.crt: its -h named the sender's and receiver's pairs."""
    command = COMMANDS["witness"]
    text = " ".join(
        command.get_help(click.Context(command, info_name="replicator witness")).split()
    )
    tls_dir = text[text.index("--tls-dir DIR") : text.index("--tls-name")]
    assert "witness.crt" in tls_dir and "sender.crt" not in tls_dir, tls_dir


@pytest.mark.parametrize("name", ["send", "verify", "failback"])
def test_state_dir_help_names_both_defaults(name: str) -> None:
    """Not root, the default is under ~/.local/state (engine/statedir.py), as
    docs/OPERATIONS.md says; -h named only root's."""
    command = COMMANDS[name]
    text = " ".join(command.get_help(click.Context(command, info_name=name)).split())
    assert "/var/lib/replicator/send/JOB as root" in text and "~/.local/state" in text, text


def test_every_json_key_of_a_command_result_is_documented() -> None:
    """`send --once --json`, `failover --json`, `failback --json` print these objects'
    fields; docs/OPERATIONS.md names each, so a script author finds what a key means."""
    import dataclasses

    from replicator.engine.api import FailbackResult, FailoverResult, Summary

    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for result in (Summary, FailoverResult, FailbackResult):
        missing = [f.name for f in dataclasses.fields(result) if f"`{f.name}`" not in text]
        assert not missing, (result.__name__, missing)
