"""``replicator check-config FILE``: check a send job file or a receive config without
running anything, and say what it holds.

The file is read exactly as ``send --job-file`` and ``receive --config`` read it (same keys,
same type checks, derived from the commands' own options), then each job is checked the
way the command checks it before moving data: the addresses parse, the volumes exist and
can be replicated, TLS keys load (or ``insecure`` is set), sizes parse. Nothing is written,
locked or connected to. Exit 0 when it is usable, 3 (with the file, line and key) when not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from replicator.cli.common import fail, parse_endpoint, transport_security
from replicator.cli.jobfile import ConfigFile, Section, kind_of, load_receive, load_send
from replicator.cli.jobfile_checks import (
    at,
    at_item,
    check_capture,
    check_jobs_apart,
    check_together,
    check_values,
)
from replicator.engine.errors import ConfigError, ReplicatorError
from replicator.engine.image_deps import unreplicated
from replicator.engine.names import RECEIVER_STATE_NAME
from replicator.engine.volumes import VolumeKind, resolve_volumes


def _command(ctx: typer.Context, name: str) -> TyperCommand:
    root = ctx.find_root().command
    command = root.get_command(ctx, name) if isinstance(root, typer.core.TyperGroup) else None
    assert isinstance(command, TyperCommand), name
    return command


def _check_send_job(config: ConfigFile, section: Section) -> list[str]:
    """Raise the job's first problem as a ConfigError; its description when it has none."""
    check_values(config, section)
    values = section.values
    host, port = parse_endpoint(values["to"], "to")
    capture = str(values.get("capture", "scan")).lower()
    check_capture(config, section, {})  # as `send --job-file` refuses it
    check_together(config, section, {})
    paths = [Path(p) for p in values["volumes"]]
    if capture != "fuse":
        for path in paths:  # each first alone, at the key that gave it (`volumes`, `files`)
            with at_item(config, section, "volumes", str(path)):
                resolve_volumes([path])
    with at(config, section, "volumes"):
        if capture == "fuse":
            if len(paths) != 1 or not paths[0].is_dir():
                raise ConfigError(
                    "capture 'fuse' takes exactly one volume: the VM's folder, which must exist"
                )
            listed = [f"folder {paths[0]}"]
        else:
            specs = resolve_volumes(paths)
            listed = [f"{spec.kind.value} {spec.path}" for spec in specs]
            disks = [spec.path for spec in specs if spec.kind is VolumeKind.DISK]
            listed += [f"warning: {problem}" for problem in unreplicated(disks)]
    security = _security(config, section, "sender", host)
    return [
        f"job {section.name}: to {host}:{port}, capture {capture}, {security}{_metrics(values)}"
    ] + [f"  {item}" for item in listed]


def _metrics(values: dict[str, Any]) -> str:
    listen = values.get("metrics_listen")
    return f", metrics on http://{listen}/metrics" if listen else ""


def _security(config: ConfigFile, section: Section, side: str, host: str) -> str:
    values = section.values
    with at(config, section, "tls_dir" if values.get("tls_dir") else "insecure"):
        tls = transport_security(
            tls_dir=Path(values["tls_dir"]) if values.get("tls_dir") else None,
            tls_name=values.get("tls_name"),
            insecure=bool(values.get("insecure")),
            side="sender" if side == "sender" else "receiver",
            host=host,
            tls_peer=values.get("tls_peer") if side == "sender" else None,
        )
    if tls is None:
        return "insecure (no TLS)"
    to = f" to {tls.peer!r}" if tls.peer is not None else ""
    return f"TLS as {tls.name!r}{to} from {values['tls_dir']}"


def _check_receive(config: ConfigFile, section: Section) -> list[str]:
    check_values(config, section)
    check_together(config, section, {})
    values = section.values
    host, port = parse_endpoint(values["listen"], "listen")
    folder = Path(values["directory"])
    with at(config, section, "directory"):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder")
    rules = values.get("allow") or []
    if rules and not values.get("tls_dir"):
        with at(config, section, "allow"):
            raise ConfigError("allow needs tls_dir: without TLS a sender has no certificate name")
    security = _security(config, section, "receiver", host)
    state = values.get("state_dir") or f"{folder}/{RECEIVER_STATE_NAME}"
    allowed = ", ".join(rules) or "every certificate of the CA, every job"
    return [
        f"receiver: listen {host}:{port}, replicas in {folder}, state in {state}, {security}"
        f"{_metrics(values)}",
        f"  allow: {allowed}" if values.get("tls_dir") else "  allow: anyone who reaches the port",
    ]


def check_config_command(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(help="A send job file (a jobs.NAME table per job) or a receive config."),
    ],
) -> None:
    """Check a job file or receive config without running it (exit 0 usable, 3 not)."""
    try:
        if kind_of(file) == "send":
            config = load_send(file, _command(ctx, "send"))
            lines = [f"{file}: send job file, {len(config.sections)} job(s)"]
            for section in config.sections.values():
                lines += _check_send_job(config, section)
            check_jobs_apart(config, {})
        else:
            config = load_receive(file, _command(ctx, "receive"))
            lines = [f"{file}: receive config"]
            lines += _check_receive(config, config.sections[""])
    except ReplicatorError as exc:
        fail(exc)
    typer.echo("\n".join([*lines, "ok"]))
